"""White-box attacks: the gradient query, PGD, C&W and EOT over gradients.

- the ``"gradient"`` oracle's answer is the closed-form gradient of a linear softmax model, and under a
  defense it is ``jax.grad`` through the defended scorer with the query's own key ``fold_in(dkey, q)``;
- EOT averages M single-draw gradients, and its estimate agrees with an independent Monte-Carlo mean;
- gradient queries through a compacted scorer (``custom_vmap``) give the plain scorer's run bit for bit;
- C&W's minimum-distortion mode finds the closed-form smallest l_2 adversarial of a linear model;
- PGD (C&W with -m slow) fools every undefended digits image of the battery set within 10 gradient
  queries (untargeted l_inf 0.3), where the score attacks' battery budget is 10 000 queries and NES needs
  hundreds to thousands; one image alone under output noise replays its row of the noisy batch and a
  host-side tap sees exactly the driver's count; the noisy batch replays bit for bit;
- the eager ``QueryCounter`` witness of eot(PGD, 2) (-m slow; about 200 single-op compiles);
- bad configs, oracles and losses raise ``ValueError``.

The registry battery (tests/test_attack_battery.py) runs PGD and C&W targeted on the same images.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import as_np, keys
from rnd_jax import losses, pytree
from rnd_jax.attacks import driver, make_attack
from rnd_jax.attacks.adaptive import RepeatedOracle, eot
from rnd_jax.attacks.whitebox._common import expected_gradient, random_start
from rnd_jax.compact import compacted
from rnd_jax.defenses import input_noise, output_noise
from rnd_jax.evaluate import QueryTap, tap_scorer
from rnd_jax.oracle import Gradient, Oracle, QueryCounter, loss_gradient, query_keys

SHAPE = (2, 3, 1)  # a tiny image for the linear model
K = 3


def linear_params(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"w": jax.random.normal(k1, (int(np.prod(SHAPE)), K)), "b": 0.1 * jax.random.normal(k2, (K,))}


def linear_scorer(params):
    """softmax(W vec(x) + b), its weights pytree leaves (a Partial)."""
    return jax.tree_util.Partial(_linear, params)


def _linear(params, x, keys):
    return jax.nn.softmax(x.reshape(x.shape[0], -1) @ params["w"] + params["b"])


@jax.jit
def _closed_form_case(params, x, y, dkey):
    """Gradient answers of the clean and two defended linear models, and jax.grad references, in one program."""
    q0 = 11
    out = {}
    ans = Oracle(linear_scorer(params), "gradient").bind(dkey, q0)(x)
    out["probs"] = ans.probs
    out["xent"] = loss_gradient(ans, lambda pr: losses.untargeted_xent(pr, y))
    out["margin"] = loss_gradient(ans, lambda pr: losses.margin(pr, y))[1]
    for name, defended in (("output", output_noise(linear_scorer(params), 0.05)),
                           ("input", input_noise(linear_scorer(params), 0.3))):
        ans = Oracle(defended, "gradient").bind(dkey, q0)(x)
        ks = query_keys(dkey, q0, x.shape[0])
        grad = lambda kk: jax.grad(lambda z: jnp.sum(losses.untargeted_xent(defended(z, kk), y)))(x)
        out[name] = (loss_gradient(ans, lambda pr: losses.untargeted_xent(pr, y))[1], ans.probs, grad(ks),
                     defended(x, ks), grad(query_keys(dkey, q0 + 1, x.shape[0])))
    return out


def test_gradient_query_is_the_closed_form_and_grad_through_the_defense():
    params = linear_params()
    w = np.asarray(params["w"])
    x = jax.random.uniform(jax.random.key(1), (4,) + SHAPE)
    y = jnp.asarray([0, 1, 2, 1])
    out = jax.tree.map(np.asarray, _closed_form_case(params, x, y, jax.random.key(5)))
    assert isinstance(Oracle(linear_scorer(params), "gradient").bind(jax.random.key(5), 0)(x), Gradient)
    # clean: d log p_y / dx = W (e_y - p), d margin / dx = W (e_y - e_j*) with j* the runner-up
    p, e_y = np.asarray(_linear(params, x, None)), np.eye(K)[np.asarray(y)]
    np.testing.assert_allclose(out["probs"], p, rtol=1e-6)
    value, g = out["xent"]
    want = (e_y - p) @ w.T
    np.testing.assert_allclose(g.reshape(4, -1), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(value, np.log(p[np.arange(4), np.asarray(y)]), rtol=1e-6)
    other = np.where(e_y > 0, -np.inf, p).argmax(1)
    np.testing.assert_allclose(out["margin"].reshape(4, -1), (e_y - np.eye(K)[other]) @ w.T, rtol=1e-5, atol=1e-6)
    # defended: jax.grad through the defended scorer with the keys fold_in(dkey, q0 + i), one per point
    for name in ("output", "input"):
        g, probs, ref, ref_probs, shifted = out[name]
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(probs, ref_probs, rtol=1e-6)
        assert not np.allclose(g, shifted)  # the noise is the query's own
        assert not np.allclose(g.reshape(4, -1), want, atol=1e-3)  # and it is there


@functools.partial(jax.jit, static_argnums=(4, 5))
def _eot_case(params, x, y, dkey, m, n_mc):
    defended = input_noise(linear_scorer(params), 0.5)
    loss = lambda pr: losses.untargeted_xent(pr, y)
    q0 = 3
    bound = Oracle(defended, "gradient").bind(dkey, q0)
    eot_probs, _, eot_grad = expected_gradient(RepeatedOracle(bound, m), x, loss)
    assert bound.used == m  # M queries of the one point, in one call
    one = lambda k: jax.grad(lambda z: loss(defended(z, k[None]))[0])(x)[0]
    singles = jax.vmap(one)(query_keys(dkey, q0, m))  # jax.grad with each query's key, one at a time
    mc = jax.vmap(one)(query_keys(jax.random.key(77), 0, n_mc))  # an independent Monte-Carlo sample
    probs = defended(jnp.repeat(x, m, 0), query_keys(dkey, q0, m))
    return eot_probs, eot_grad[0], singles, mc, probs


def test_eot_gradient_is_the_mean_of_single_draws_and_the_monte_carlo_mean():
    params = linear_params(1)
    x = jax.random.uniform(jax.random.key(2), (1,) + SHAPE)
    m, n_mc = 400, 4000
    eot_probs, g, singles, mc, probs = map(np.asarray, _eot_case(params, x, jnp.asarray([1]), jax.random.key(9), m,
                                                                  n_mc))
    np.testing.assert_allclose(g, singles.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(eot_probs, probs.mean(0, keepdims=True), rtol=1e-5)
    # the EOT estimate of E[grad] is within 5 standard errors of an independent Monte-Carlo mean
    se = np.sqrt(singles.var(0) / m + mc.var(0) / n_mc)
    assert np.all(np.abs(g - mc.mean(0)) <= 5 * se + 1e-7)
    assert float(np.abs(singles[0] - singles.mean(0)).max()) > 10 * float(se.max())  # one draw is far off


def test_gradient_path_through_a_compacted_scorer_equals_the_plain_one():
    """PGD under vmap on a compacted (custom_vmap) defended scorer: the gradient path evaluates its wrapped
    scorer, and the run equals the uncompacted one bit for bit."""
    params = linear_params(2)
    x0 = jax.random.uniform(jax.random.key(3), (3,) + SHAPE, minval=0.3, maxval=0.7)
    y = jnp.asarray(np.asarray(_linear(params, x0, None)).argmax(1), jnp.int32)
    attack = make_attack("pgd", eps=0.3, norm="linf")
    defended = output_noise(linear_scorer(params), 0.01)
    out = []
    for s in (defended, compacted(defended, 2)):
        run = pytree.jit(lambda sc, *a: driver.run(attack, Oracle(sc, "gradient"), *a, 12))
        out.append(as_np(run(s, x0, y, None, keys(0, 3), keys(1, 3))))
    for a, b in zip(out[0], out[1]):
        if a is not None:
            np.testing.assert_array_equal(a, b)
    assert len(set(out[0].queries.tolist())) > 1  # images stop at different steps (compaction has work to do)


def test_cw_finds_the_smallest_l2_adversarial_of_a_linear_model():
    """Two classes, logits W x + b: the smallest l_2 perturbation that flips the label is margin / ||w_y - w_o||
    (box constraints inactive around x0 = 0.5). C&W's minimum-distortion mode gets within 10% of it."""
    params = linear_params(3)
    params = {"w": params["w"][:, :2], "b": params["b"][:2]}
    x0 = jnp.full((1,) + SHAPE, 0.5) + 0.05 * jax.random.normal(jax.random.key(4), (1,) + SHAPE)
    z = np.asarray(x0.reshape(1, -1) @ params["w"] + params["b"])[0]
    y = int(z.argmax())
    dw = np.asarray(params["w"][:, y] - params["w"][:, 1 - y])
    d_star = (z[y] - z[1 - y]) / np.linalg.norm(dw)
    assert 0.05 < d_star < 0.3  # the box [0, 1] is not in the way
    attack = make_attack("cw", eps=None, steps=100, search_steps=8)
    budget = 800
    run = pytree.jit(lambda sc, *a: driver.run_one(attack, Oracle(sc, "gradient"), *a, budget))
    res = run(linear_scorer(params), x0[0], jnp.int32(y), None, jax.random.key(0), jax.random.key(1))
    assert bool(res.success) and int(res.queries) == budget and int(res.steps) == budget
    d = float(jnp.linalg.norm((res.x_adv - x0[0]).ravel()))
    pred = int(jnp.argmax(_linear(params, res.x_adv[None], None)[0]))
    assert pred != y and d_star <= d <= 1.1 * d_star, (d, d_star)


@pytest.fixture(scope="module")
def programs(clean_scorer):
    """(batch program, one-image program with a host-side tap) of an attack: output noise ``sigma`` is an argument
    (0 = undefended), so the undefended and the noisy runs share a program."""
    def make(attack, budget, tap):
        def batch(bundle, x, y, t, ka, kd, sigma):
            a, clean = bundle
            return driver.run(a, Oracle(output_noise(clean, sigma), "gradient"), x, y, t, ka, kd, budget)

        def alone(bundle, x, y, t, ka, kd, sigma):
            a, clean = bundle
            return driver.run_one(a, Oracle(tap_scorer(output_noise(clean, sigma), clean, tap), "gradient"), x, y, t,
                                  ka, kd, budget)
        return (functools.partial(pytree.jit(batch), (attack, clean_scorer)),
                functools.partial(pytree.jit(alone), (attack, clean_scorer)))
    return make


CASES = {  # config, budget: PGD at Park's 10 steps; C&W with c0 = 1 (its first stages at 1e-3 skipped)
    "pgd": (dict(norm="linf", eps=0.3), 10),
    "cw": (dict(eps=2.0, c0=1.0, steps=30, search_steps=2), 60),
}


@pytest.mark.parametrize("name", ["pgd", pytest.param("cw", marks=pytest.mark.slow)])
def test_succeeds_undefended_alone_equals_batch_and_replays(name, programs, clean_scorer, attack_set):
    """Untargeted (the battery runs the targeted goal), undefended: every image fooled within the budget. One image
    alone (not vmapped) under output noise replays its row of the noisy batch, and a host-side tap of that run
    sees exactly the driver's count; the noisy batch replays bit for bit."""
    cfg, budget = CASES[name]
    attack = make_attack(name, targeted=False, **cfg)
    sel, n = attack_set, len(attack_set.labels)
    tap = QueryTap()
    batch, alone = programs(attack, budget, tap)
    args = (sel.images, sel.labels, sel.targets, keys(0, n), keys(1, n))
    res = as_np(batch(*args, 0.0))
    pred = np.asarray(jnp.argmax(clean_scorer(res.x_adv, None), -1))
    d = (res.x_adv - sel.images).reshape(n, -1)
    dist = np.abs(d).max(1) if cfg.get("norm", "l2") == "linf" else np.linalg.norm(d, axis=1)
    assert np.all(pred != sel.labels) and np.all(res.success) and np.all(dist <= cfg["eps"] + 1e-5), (name, pred)
    assert res.queries.max() <= budget
    noisy = as_np(batch(*args, 0.05))
    again = as_np(batch(*args, 0.05))
    for u, v in zip(noisy, again):
        if u is not None:
            np.testing.assert_array_equal(u, v)
    assert not np.array_equal(noisy.trace_loss, res.trace_loss)  # the noisy answers were used
    for i in (int(np.argmax(noisy.queries)), 0):
        tap.reset()
        one = as_np(alone(*(a[i] for a in args), 0.05))
        jax.effects_barrier()
        assert tap.n == one.queries == noisy.queries[i] and one.success == noisy.success[i], (name, i, tap.n)
        np.testing.assert_allclose(one.x_adv, noisy.x_adv[i], atol=1e-5 if name == "cw" else 1e-6)


@pytest.mark.slow  # ~200 single-op compiles of an eager run; the fast digits test counts on the host (tap_scorer)
def test_query_count_equals_the_eager_witness_with_eot():
    """eot(PGD, 2) on the linear model under output noise, eagerly: every step asks its point twice in one call,
    and the counter sees what the driver counts (a budget that is not a whole number of steps)."""
    attack = eot(make_attack("pgd", eps=0.05, targeted=False), 2)
    assert attack.cost == 2 and attack.output == "gradient"
    params = linear_params(4)
    counter = QueryCounter(output_noise(linear_scorer(params), 0.01))
    x0 = jnp.full(SHAPE, 0.5)
    y = int(np.asarray(_linear(params, x0[None], None)).argmax())
    with jax.disable_jit():
        res = driver.run_one(attack, Oracle(counter, "gradient"), x0, y, None, jax.random.key(0), jax.random.key(1), 5)
    assert not bool(res.success)  # eps = 0.05 is too small to flip it: the budget ends the run
    assert int(res.steps) == 2 and int(res.queries) == counter.count == 4 and counter.calls == 2


def test_pgd_restarts_from_a_fresh_random_start_each_round():
    """``steps=k``: round 0 is the plain run; after every k steps without success the iterate is the random
    start of ``fold_in(key, round)``."""
    params = linear_params()
    x0 = jnp.full(SHAPE, 0.5)
    y = int(jnp.argmax(_linear(params, x0[None], None)))
    k, eps = 3, 0.01
    attack = make_attack("pgd", eps=eps, lr=1e-3, steps=k)
    plain = make_attack("pgd", eps=eps, lr=1e-3)
    key = jax.random.key(4)
    st, sp = attack.init(key, x0, y, None), plain.init(key, x0, y, None)
    bound = Oracle(linear_scorer(params), "gradient").bind(jax.random.key(0), 0)
    starts = []
    for t in range(1, 3 * k + 1):
        st, _ = attack.step(st, bound)
        sp, _ = plain.step(sp, bound)
        if t < k:
            np.testing.assert_array_equal(st.x, sp.x)
        if t % k == 0:
            np.testing.assert_array_equal(st.x, random_start(jax.random.fold_in(key, t // k), x0, eps, "linf"))
            starts.append(np.asarray(st.x))
        assert float(jnp.abs(st.x - x0).max()) <= eps + 1e-6
    assert not st.done and not np.array_equal(starts[0], starts[1])


def test_cw_abort_early_ends_a_stage_whose_loss_stopped_falling():
    """Each stage ends after ``steps`` steps or, with ``abort_early``, at the first check (every
    ``steps // 10`` steps of the stage, step 0 included) whose loss exceeds 0.9999 x the previous check's:
    recomputed here from the losses the attack reports. Without it every stage is ``steps`` long."""
    params = linear_params(1)
    x0 = jnp.full(SHAPE, 0.5)
    y = int(jnp.argmax(_linear(params, x0[None], None)))
    bound = Oracle(linear_scorer(params), "gradient").bind(jax.random.key(0), 0)
    steps, period = 20, 2
    for abort in (False, True):
        attack = make_attack("cw", eps=None, steps=steps, search_steps=4, lr=0.5, abort_early=abort)
        st = attack.init(jax.random.key(0), x0, y, None)
        i, prev = 0, np.inf
        for _ in range(80):
            stage = int(st.stage)
            st, info = attack.step(st, bound)
            loss = float(info.loss)
            want_end = i + 1 == steps
            if abort and i % period == 0:
                want_end |= loss > 0.9999 * prev
                prev = loss
            assert (int(st.stage) == stage + 1) == want_end, (abort, stage, i)
            i = 0 if want_end else i + 1
            if want_end:
                prev = np.inf
        if not abort:
            assert int(st.stage) == 4
        else:
            assert int(st.stage) > 4  # stages ended early: more of them in the same 80 steps


def test_bad_configs_and_oracles_raise():
    for kw in (dict(eps=-0.1), dict(eps=float("nan")), dict(lr=0.0), dict(norm="l1"), dict(loss="cw"),
               dict(targeted=True, loss="margin"), dict(random_start="yes")):
        with pytest.raises(ValueError):
            make_attack("pgd", **kw)
    for kw in (dict(norm="linf"), dict(eps=-1.0), dict(steps=0), dict(search_steps=0), dict(lr=float("inf")),
               dict(c0=0.0), dict(kappa=-1.0), dict(kappa=float("nan")), dict(steps=1.5)):
        with pytest.raises(ValueError):
            make_attack("cw", **kw)
    params = linear_params()
    x0 = jnp.full(SHAPE, 0.5)
    attack = make_attack("pgd")
    with pytest.raises(ValueError, match="'gradient' oracle"):  # a white-box attack on a score oracle
        driver.run_one(attack, Oracle(linear_scorer(params), "scores"), x0, 0, None, jax.random.key(0),
                       jax.random.key(1), 5)
    with pytest.raises(ValueError, match="got a 'gradient' one"):  # a score attack on a gradient oracle
        driver.run_one(make_attack("nes", targeted=False, samples=2), Oracle(linear_scorer(params), "gradient"),
                       x0, 0, None, jax.random.key(0), jax.random.key(1), 6)
    ans = Oracle(linear_scorer(params), "gradient").bind(jax.random.key(0), 0)(x0[None])
    with pytest.raises(ValueError, match="one value per point"):
        loss_gradient(ans, lambda p: p)
    with pytest.raises(ValueError):
        loss_gradient(ans.probs, lambda p: p[:, 0])
    with pytest.raises(ValueError):
        Oracle(linear_scorer(params), "gradient").answer(ans.probs)
    with pytest.raises(ValueError, match="'gradient' oracle"):
        expected_gradient(Oracle(linear_scorer(params), "scores").bind(jax.random.key(0), 0), x0[None],
                          lambda p: p[:, 0])
    with pytest.raises(ValueError):
        Oracle(linear_scorer(params), "grad")
