"""The Subspace and evolutionary attacks' own parts, against closed forms (the battery runs both end to end).

- Subspace: the search direction is the drawn reference model's gradient of the objective (checked on
  linear-softmax references, whose gradient is ``W^T (e_t - p)``), through the input dropout mask by the
  chain rule; the first prior step points along it; the dropout schedule; and two reference weight sets of
  one structure run in one compiled program (the weights are arguments), each giving its own direction.
- Evolutionary: the covariance adaptation, the 1/5th success rule, the mutation's coordinate selection
  (exactly ``k`` kept, drawn with probability ~ ``C_ii``: Monte-Carlo), the offspring on the sphere of radius
  ``(1 - mu) D`` and the search-space sizes of the defaults.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from rnd_jax import pytree
from rnd_jax.attacks.decision import evolutionary as E
from rnd_jax.attacks.score import subspace as S

SHAPE = (8, 8, 1)
D = 64


def _linear_probs(w, b, x, keys):
    return jax.nn.softmax(x.reshape(x.shape[0], -1) @ w + b, axis=-1)


def linear(seed):
    """A linear-softmax scorer (a pytree: its weights are leaves)."""
    rng = np.random.default_rng(seed)
    return Partial(_linear_probs, jnp.asarray(rng.normal(size=(D, 10)), jnp.float32),
                   jnp.asarray(rng.normal(size=10), jnp.float32))


def closed_form_direction(scorer, x, t, mask=None):
    """Unit gradient of log p_t(ref(mask * x)) w.r.t. x for a linear-softmax reference: mask * W^T (e_t - p)."""
    w, b = (np.asarray(a, np.float64) for a in scorer.args)
    m = np.ones(D) if mask is None else np.asarray(mask, np.float64).reshape(-1)
    z = (m * np.asarray(x, np.float64).reshape(-1)) @ w + b
    p = np.exp(z - z.max())
    p /= p.sum()
    g = m * (w @ (np.eye(10)[t] - p))
    return (g / np.linalg.norm(g)).reshape(SHAPE)


@pytest.fixture(scope="module")
def point():
    return jnp.asarray(np.random.default_rng(3).uniform(0.2, 0.8, SHAPE), jnp.float32)


def objective(cfg):
    loss = S.losses.TARGETED[cfg.loss_name] if cfg.targeted else S.losses.UNTARGETED[cfg.loss_name]
    return lambda probs, cls: -loss(probs, cls)


def test_direction_is_the_reference_gradient_through_the_dropout_mask(point):
    cfg = S.SubspaceConfig(targeted=True, loss="xent")
    refs = (linear(1), linear(2))
    ones = jnp.ones(SHAPE)
    mask = jnp.asarray(np.random.default_rng(4).choice([0.0, 2.0], SHAPE), jnp.float32)  # p = 0.5, scaled
    for idx in (0, 1):
        for m in (ones, mask):
            u = S.reference_direction(refs, point, jnp.int32(3), m, jnp.int32(idx), objective(cfg))
            np.testing.assert_allclose(u, closed_form_direction(refs[idx], point, 3, m), atol=2e-5)
    other = S.reference_direction(refs, point, jnp.int32(3), ones, jnp.int32(1), objective(cfg))
    assert abs(float(jnp.vdot(other, closed_form_direction(refs[0], point, 3)))) < 0.9  # another model's


def test_dropout_schedule():
    cfg = S.SubspaceConfig()
    t = np.arange(0, 400, 7)
    want = np.where(t < 10, 0.0, 0.5 - 0.5 * np.exp(-(t - 10) * 0.01))
    np.testing.assert_allclose(np.asarray(S.drop_rate(cfg, t)), want, rtol=1e-5, atol=1e-7)
    assert float(S.drop_rate(cfg, 10_000)) == pytest.approx(0.5)


def _first_step(attack, x0, label, target, key, victim):
    state = attack.init(key, x0, label, target)
    return attack.step(state, lambda pts: victim(pts, None))


def test_two_weight_sets_share_one_program_and_the_first_prior_follows_the_drawn_reference(point):
    """At step 0 dropout is off, the prior is 0 and the l_1-normalised update makes the prior
    ``sign(Delta) u / ||u||_1``: parallel to the drawn reference's gradient. The reference weights are
    arguments: a second pair of the same shapes reuses the program."""
    cfg = S.SubspaceConfig(targeted=True, loss="xent")
    victim = linear(9)
    run = pytree.jit(chex.assert_max_traces(
        lambda attack, x0, key: _first_step(attack, x0, 0, 3, key, victim), n=1))
    static = None
    for seeds in ((1, 2), (5, 6)):
        refs = tuple(linear(s) for s in seeds)
        arrays, st = pytree.partition(S.subspace(cfg, refs))
        static = static or st  # the first attack's structure, carrying the second pair's weights
        attack = pytree.combine(arrays, static)
        seen = set()
        for k in range(12):
            state, info = run(attack, point, jax.random.key(k))
            idx = int(info.ref)
            seen.add(idx)
            u = closed_form_direction(refs[idx], point, 3)
            g = np.asarray(state.prior).reshape(-1)
            cos = float(g @ u.reshape(-1) / np.linalg.norm(g))
            assert abs(cos) == pytest.approx(1.0, abs=1e-5), (seeds, k, idx)
            assert float(np.abs(g).sum()) == pytest.approx(cfg.prior_lr, rel=1e-5)
            assert np.sign(cos) == np.sign(float(info.est_deriv))
        assert seen == {0, 1}, seeds  # both references get drawn


def test_one_reference_alone_is_not_switched(point):
    cfg = S.SubspaceConfig(targeted=True, loss="xent")
    ref = linear(1)
    u = S.reference_direction((ref,), point, jnp.int32(3), jnp.ones(SHAPE), jnp.int32(0), objective(cfg))
    np.testing.assert_allclose(u, closed_form_direction(ref, point, 3), atol=2e-5)
    with pytest.raises(ValueError):
        S.subspace(cfg, ())


# ---- evolutionary ----

def test_covariance_adaptation_closed_form():
    rng = np.random.default_rng(0)
    path, cov, z = rng.normal(size=(4, 4, 1)), rng.uniform(0.5, 2, (4, 4, 1)), rng.normal(size=(4, 4, 1))
    c_c, c_cov = 0.01, 0.001
    p2, c2 = E.evolve(jnp.asarray(path), jnp.asarray(cov), jnp.asarray(z), c_c, c_cov)
    want_p = (1 - c_c) * path + math.sqrt(c_c * (2 - c_c)) * z
    np.testing.assert_allclose(p2, want_p, rtol=1e-5)
    np.testing.assert_allclose(c2, (1 - c_cov) * cov + c_cov * want_p ** 2, rtol=1e-5)


def test_one_fifth_success_rule():
    mu, hits, trials = E.adapt_mu(jnp.float32(0.01), jnp.int32(9), jnp.int32(29), 30)
    assert (float(mu), int(hits), int(trials)) == (pytest.approx(0.01), 9, 29)  # window not full: unchanged
    for h in (0, 6, 15, 30):
        mu, hits, trials = E.adapt_mu(jnp.float32(0.01), jnp.int32(h), jnp.int32(30), 30)
        assert float(mu) == pytest.approx(0.01 * math.exp(h / 30 - 0.2), rel=1e-6)
        assert (int(hits), int(trials)) == (0, 0)
    assert float(E.adapt_mu(jnp.float32(0.01), jnp.int32(6), jnp.int32(30), 30)[0]) == pytest.approx(0.01)


def test_mutation_keeps_k_coordinates_drawn_in_proportion_to_the_covariance():
    cov = jnp.asarray([[4.0, 1.0], [2.0, 1.0]])[..., None]
    z = jax.vmap(lambda k: E.mutation(k, cov, 1))(jax.random.split(jax.random.key(0), 20_000))
    nz = np.asarray(z != 0).reshape(len(z), -1)
    assert (nz.sum(1) == 1).all()
    freq = nz.mean(0)
    want = np.asarray(cov).reshape(-1) / float(cov.sum())
    np.testing.assert_allclose(freq, want, atol=4 * np.sqrt(want * (1 - want) / len(z)).max())
    z3 = E.mutation(jax.random.key(1), jnp.ones((4, 4, 1)), 3)
    assert int((z3 != 0).sum()) == 3
    # the kept coordinates are sqrt(C_ii) xi: their spread scales with sqrt(C_ii)
    big = np.asarray(z).reshape(len(z), -1)[:, 0]
    small = np.asarray(z).reshape(len(z), -1)[:, 1]
    ratio = big[big != 0].std() / small[small != 0].std()
    assert ratio == pytest.approx(2.0, rel=0.08)


def test_offspring_lies_on_the_sphere_of_the_biased_point():
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.uniform(0.3, 0.7, SHAPE), jnp.float32)
    x = x0 + 0.05 * jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
    dist = jnp.linalg.norm((x - x0).reshape(-1))
    z = E.mutation(jax.random.key(2), jnp.ones((4, 4, 1)), 3)
    mu = 0.01
    cand = E.offspring(x, x0, z, 0.01, mu, dist, sphere=True)
    assert float(jnp.linalg.norm((cand - x0).reshape(-1))) == pytest.approx((1 - mu) * float(dist), rel=1e-5)
    plain = E.offspring(x, x0, z, 0.01, mu, dist, sphere=False)
    up = jax.image.resize(z, SHAPE, method="bilinear")
    want = x + 0.01 * dist * up / jnp.linalg.norm(up.reshape(-1)) + mu * (x0 - x)
    np.testing.assert_allclose(plain, want, atol=1e-6)


def test_default_search_space_scales_with_the_image():
    cfg = E.EvolutionaryConfig()
    assert cfg.grid((8, 8, 1)) == (4, 4, 1)
    assert cfg.grid((32, 32, 3)) == (13, 13, 3)
    assert cfg.grid((224, 224, 3)) == (90, 90, 3)
    assert cfg.grid((112, 112, 3)) == (45, 45, 3)  # the paper's 45x45x3 for 112x112 faces
    assert cfg.coords(16) == 1 and cfg.coords(45 * 45 * 3) == round(45 * 45 * 3 / 20)
    assert E.EvolutionaryConfig(reduced=3).grid((8, 8, 1)) == (3, 3, 1)
