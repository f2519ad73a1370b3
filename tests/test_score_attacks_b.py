"""Attack-specific checks of SignHunter, Bandits-TD, GenAttack and P-RGF.

The registry battery (test_attack_battery.py) runs every attack through success, budget, replay,
batching and retrace checks; here each algorithm's own mechanics are checked against what the paper
says it does, mostly on toy scorers whose loss is a known linear function of the image.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import as_np, keys
from rnd_jax import losses
from rnd_jax.attacks import ATTACKS, Context, driver, make_attack
from rnd_jax.attacks.score import bandits as bandits_mod
from rnd_jax.attacks.score import genattack as gen_mod
from rnd_jax.attacks.score import prgf as prgf_mod
from rnd_jax.attacks.score import signhunter as sh_mod
from rnd_jax.defenses import output_noise
from rnd_jax.oracle import Oracle

SHAPE = (2, 2, 1)  # a 4-pixel toy image
A = jnp.array([0.7, -1.3, 0.4, -0.2], jnp.float32).reshape(SHAPE)  # toy loss gradient


def linear_scorer(a=A, bias=5.0, k=3):
    """Probabilities whose untargeted margin for label 0 is exactly ``bias + a.x`` (linear in x)."""

    def scores(x, keys):
        z0 = bias + jnp.tensordot(x, a, axes=a.ndim)
        logits = jnp.concatenate([z0[:, None], jnp.zeros((x.shape[0], k - 1))], axis=1)
        return jax.nn.softmax(logits, axis=-1)

    return scores


def fast(fn, *args):
    """``jax.jit(fn)(*args)`` compiled at XLA backend optimisation level 0 (these tests are compile-bound)."""
    return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})(*args)


def toy_state(attack, x0=None, label=0, target=-1, key=0):
    x0 = jnp.full(SHAPE, 0.5, jnp.float32) if x0 is None else x0
    return attack.init(jax.random.key(key), x0, label, target)


def run_steps(attack, scorer, state, n, defense_key=1):
    """``n`` steps through a bound oracle numbered like the driver's, recording every Info."""
    oracle = Oracle(scorer, attack.output)

    def body(c, _):
        s, q = c
        bound = oracle.bind(jax.random.key(defense_key), q)
        s2, info = attack.step(s, bound)
        return (s2, q + driver._spent(attack, bound.used, info)), (s2, info)

    def go(state):
        (final, q), trail = jax.lax.scan(body, (state, jnp.zeros((), jnp.int32)), None, length=n)
        return final, q, trail

    return fast(go, state)


# ----------------------------------------------------------------------------------- SignHunter

def test_signhunter_chunks_of_each_level():
    n = 64
    for level, chunk, want in [(0, 0, (0, 64)), (1, 1, (32, 64)), (3, 2, (16, 24)), (6, 63, (63, 64))]:
        s, e = sh_mod.chunk_bounds(n, jnp.int32(level), jnp.int32(chunk))
        assert (int(s), int(e)) == want
    s, e = sh_mod.chunk_bounds(5, jnp.int32(1), jnp.int32(1))  # ceil(5/2) = 3: second chunk is [3, 5)
    assert (int(s), int(e)) == (3, 5)


def test_signhunter_flips_one_block_per_step_and_finds_the_linear_optimum():
    eps = 0.1
    attack = sh_mod.signhunter(sh_mod.SignHunterConfig(eps=eps, targeted=False, loss="margin"))  # linear here
    assert attack.cost == 1
    x0 = jnp.full(SHAPE, 0.5, jnp.float32)
    final, q, (states, infos) = run_steps(attack, linear_scorer(), toy_state(attack, x0), 8)
    assert int(q) == 8  # one counted point per step
    signs = np.asarray(states.sign).reshape(8, 4)
    # Pass start: the all-ones vertex; then level 0 (all 4), level 1 (2+2), level 2 (1+1+1+1).
    blocks = [None, (0, 4), (0, 2), (2, 4), (0, 1), (1, 2), (2, 3), (3, 4)]
    prev = np.ones(4)
    assert np.array_equal(signs[0], prev)
    for t in range(1, 8):
        cand = prev.copy()
        cand[blocks[t][0]:blocks[t][1]] *= -1
        want = cand if bool(infos.accepted[t]) else prev
        np.testing.assert_array_equal(signs[t], want)
        # the loss is linear, so a flip is kept exactly when it lowers a.x
        better = float(jnp.sum(A.reshape(4) * (cand - prev))) <= 0
        assert bool(infos.accepted[t]) == better
        prev = want
    # After one pass every coordinate has been tried alone: the sign is the optimum -sign(a).
    np.testing.assert_array_equal(signs[-1], -np.sign(np.asarray(A).reshape(4)))
    np.testing.assert_allclose(np.asarray(final.x), np.asarray(x0 - eps * np.sign(A)), atol=1e-6)
    np.testing.assert_allclose(float(final.best), 5.0 + float(jnp.sum(A * final.x)), atol=1e-5)
    # the pass ended: the center moved to the current point and the next step starts a new pass
    assert bool(final.fresh) and int(final.level) == 0
    np.testing.assert_array_equal(np.asarray(final.center), np.asarray(final.x))


def test_signhunter_success_check_is_the_counted_candidate_query(clean_scorer, attack_set):
    attack = make_attack("signhunter", targeted=True)
    n = 4
    res = as_np(fast(lambda x, y, t, ka, kd: driver.run(attack, Oracle(clean_scorer), x, y, t, ka, kd, 1_000),
                     attack_set.images[:n], attack_set.labels[:n], attack_set.targets[:n], keys(0, n), keys(1, n)))
    # one counted point per step, the last of which is the success check of the returned point
    np.testing.assert_array_equal(res.queries, res.steps)
    assert res.lucky.all()
    pred = np.asarray(jnp.argmax(clean_scorer(jnp.asarray(res.x_adv), None), -1))
    np.testing.assert_array_equal(pred, attack_set.targets[:n])


# ------------------------------------------------------------------------------------- Bandits

@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_bandits_prior_update_matches_the_finite_difference_closed_form(norm):
    cfg = bandits_mod.BanditsConfig(eps=0.3 if norm == "linf" else 1.0, norm=norm, targeted=False, tile=1,
                                    fd_eta=0.05, loss="margin")  # a probe long enough for float32 differences
    attack = bandits_mod.bandits(cfg)
    s0 = toy_state(attack)
    s1, info = fast(lambda s: attack.step(s, Oracle(linear_scorer()).bind(jax.random.key(1), 0)), s0)
    h, eta, delta, prior_lr = cfg.resolved(4)
    u = jax.random.normal(jax.random.fold_in(s0.key, 0), SHAPE)
    e = delta * u / 2.0  # sqrt(dim) = 2 for a 2x2x1 grid
    # loss = 5 + a.x exactly, so the finite difference is a.(q2/|q2| - q1/|q1|) / delta (prior 0: q = +-e)
    want = float(jnp.sum(A * (-e / jnp.linalg.norm(e) - e / jnp.linalg.norm(e)))) / delta
    np.testing.assert_allclose(float(info.est_deriv), want, rtol=2e-3)
    g = want * e
    prior = np.tanh(prior_lr * g) if norm == "linf" else prior_lr * g  # artanh(0) = 0
    np.testing.assert_allclose(np.asarray(s1.prior), np.asarray(prior), rtol=2e-3, atol=1e-7)
    move = np.sign(prior) * h if norm == "linf" else h * prior / np.linalg.norm(prior)
    np.testing.assert_allclose(np.asarray(s1.x), np.clip(0.5 + move, 0.2, 0.8) if norm == "linf" else 0.5 + move,
                               atol=1e-5)


def test_bandits_eg_step_is_the_exponentiated_gradient_update():
    v, g, lr = jnp.array([-0.9, -0.2, 0.0, 0.5, 0.99]), jnp.array([0.3, -1.0, 2.0, 0.1, -0.4]), 0.7
    p = (v + 1) / 2
    ref = p * jnp.exp(lr * g) / (p * jnp.exp(lr * g) + (1 - p) * jnp.exp(-lr * g)) * 2 - 1
    np.testing.assert_allclose(np.asarray(bandits_mod.eg_step(v, g, lr)), np.asarray(ref), rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(bandits_mod.eg_step(jnp.ones(3), jnp.full(3, 1e6), 100.0))))


def test_bandits_time_prior_learns_the_gradient_direction():
    attack = bandits_mod.bandits(bandits_mod.BanditsConfig(eps=10.0, norm="l2", targeted=False, tile=1, fd_eta=0.05,
                                                           loss="margin"))
    final, _, _ = run_steps(attack, linear_scorer(), toy_state(attack), 200)
    p = np.asarray(final.prior).ravel()
    cos = p @ -np.asarray(A).ravel() / np.linalg.norm(p) / np.linalg.norm(A)
    assert cos > 0.9, cos  # the prior points down the loss


def test_bandits_success_check_is_counted():
    attack = bandits_mod.bandits(bandits_mod.BanditsConfig(eps=0.3, targeted=False))
    x0 = jnp.full(SHAPE, 0.5, jnp.float32)
    go = lambda label, budget: fast(lambda x: driver.run_one(attack, Oracle(linear_scorer()), x, label, -1,
                                                             jax.random.key(0), jax.random.key(1), budget), x0)
    # The toy model says class 0; an untargeted attack on "label" 1 starts out adversarial: the very
    # first point of the first step (x itself) detects it, is counted, and the attack stops there.
    res = go(1, 300)
    assert bool(res.lucky) and int(res.queries) == 3 and int(res.steps) == 1
    np.testing.assert_array_equal(np.asarray(res.x_adv), np.asarray(x0))
    # Otherwise every step costs its 3 points, success check included (budget 10: three steps).
    res = go(0, 10)
    assert int(res.queries) == 9 and int(res.steps) == 3 and not bool(res.lucky)
    # (the battery's eager QueryCounter run witnesses that these counts are the points the model saw)


# ------------------------------------------------------------------------------------ GenAttack

def test_genattack_fitness_and_margin_closed_forms():
    p = jnp.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    np.testing.assert_allclose(np.asarray(gen_mod.fitness(p, 1, True)), np.log([0.3 / 0.7, 0.5 / 0.5]), rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_allclose(np.asarray(gen_mod.fitness(p, 0, False)), np.log([0.4 / 0.6, 0.8 / 0.2]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gen_mod.win_margin(p, 1, True)), [-0.3, 0.0], atol=1e-7)
    np.testing.assert_allclose(np.asarray(gen_mod.win_margin(p, 0, False)), [-0.3, 0.0], atol=1e-7)
    # noisy answers (zeros, values that do not sum to one) stay finite
    assert np.all(np.isfinite(np.asarray(gen_mod.fitness(jnp.array([[0.0, 1.0, 1.0]]), 0, True))))


def test_genattack_population_shapes_ball_and_elite():
    cfg = gen_mod.GenAttackConfig(eps=0.1, targeted=True)
    attack = gen_mod.genattack(cfg)
    assert attack.cost == 6
    x0 = jnp.linspace(0.0, 1.0, 4, dtype=jnp.float32).reshape(SHAPE)
    s0 = attack.init(jax.random.key(0), x0, 0, 2)
    assert s0.pop.shape == (6,) + SHAPE
    final, q, (states, infos) = run_steps(attack, linear_scorer(), s0, 5)
    assert int(q) == 5 * 6
    pops = np.asarray(states.pop)
    assert pops.shape == (5, 6) + SHAPE
    d = pops - np.asarray(x0)
    assert np.abs(d).max() <= 0.1 + 1e-6 and pops.min() >= 0.0 and pops.max() <= 1.0
    # the elite of each generation is the returned point and survives as member 0 of the next one
    np.testing.assert_array_equal(pops[:, 0], np.asarray(states.x))
    # the elite is the fittest member of the generation that was evaluated
    prev = np.concatenate([np.asarray(s0.pop)[None], pops[:-1]])
    scorer = linear_scorer()
    for t in range(5):
        fit = np.asarray(gen_mod.fitness(scorer(jnp.asarray(prev[t]), None), 2, True))
        np.testing.assert_array_equal(np.asarray(states.x[t]), prev[t][np.argmax(fit)])


def test_genattack_cold_selection_copies_the_fittest_parent():
    # tau -> 0 and no mutation: every parent is the fittest member, so every child equals it
    cfg = gen_mod.GenAttackConfig(eps=0.2, targeted=False, temp=1e-6, adaptive=False, rho_min=1e-9, alpha_min=1e-9)
    attack = gen_mod.genattack(cfg)
    s0 = toy_state(attack)
    final, _, (states, _) = run_steps(attack, linear_scorer(), s0, 1)
    pop = np.asarray(final.pop)
    for child in pop[1:]:
        np.testing.assert_allclose(child, pop[0], atol=1e-6)


def test_genattack_adaptive_schedule_after_a_plateau():
    flat = lambda x, keys: jnp.full((x.shape[0], 3), 1.0 / 3)  # nothing ever improves after step 0
    attack = gen_mod.genattack(gen_mod.GenAttackConfig(eps=0.1, targeted=True))
    _, _, (states, infos) = run_steps(attack, flat, toy_state(attack, target=2), 103)
    rho, alpha = np.asarray(infos.rho), np.asarray(infos.alpha)
    # margin 0 > -0.4: a plateau after more than 100 stalled generations
    np.testing.assert_allclose(rho[:101], 0.5)
    np.testing.assert_allclose(alpha[:101], 0.4)
    np.testing.assert_allclose(rho[-1], 0.45, rtol=1e-6)
    np.testing.assert_allclose(alpha[-1], 0.36, rtol=1e-6)


# ---------------------------------------------------------------------------------------- P-RGF

def test_prgf_optimal_lambda_closed_form():
    d, q = 64, 10
    m = d + 2 * q - 2
    lo, hi = np.sqrt(1 / m), np.sqrt((2 * q - 1) / m)
    alphas = np.array([0.0, 0.5 * lo, lo * 0.999, lo * 1.001, 0.3, 0.4, hi * 0.999, hi * 1.001, 0.9, 1.0, 1.3])
    lam = np.asarray(prgf_mod.optimal_lambda(jnp.asarray(alphas, jnp.float32), d, q))
    a2 = alphas ** 2
    mid = (1 - a2) * (a2 * m - 1) / (2 * a2 * d * q - a2 ** 2 * d * m - 1)
    want = np.where(a2 <= 1 / m, 0.0, np.where(a2 >= (2 * q - 1) / m, 1.0, mid))
    want[alphas >= 1] = 1.0
    np.testing.assert_allclose(lam, want, atol=1e-5)
    assert np.all(np.diff(lam) >= -1e-6)  # more trust in the prior as it aligns better
    assert lam[2] == 0 and lam[7] == 1
    # the middle branch is continuous with both ends: 0 at alpha^2 = 1/m, 1 at alpha^2 = (2q-1)/m
    ends = [(1 - e) * (e * m - 1) / (2 * e * d * q - e * e * d * m - 1) for e in (1 / m, (2 * q - 1) / m)]
    np.testing.assert_allclose(ends, [0.0, 1.0], atol=1e-12)


def test_prgf_prior_guided_estimate_matches_its_expectation():
    """E[(a.u) u] = lam (a.v) v + (1 - lam) d/(d-1) P_perp a for the directions of Algorithm 1."""
    d, lam, n = 16, 0.3, 20_000
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    a = jax.random.normal(k1, (d,))
    v = prgf_mod.rms_normalize(jax.random.normal(k2, (d,)))
    u = fast(lambda k: prgf_mod.prior_guided_directions(jax.random.normal(k, (n, d)), v, lam), k3)
    np.testing.assert_allclose(np.asarray(jnp.sqrt(jnp.mean(u * u, 1))), 1.0, rtol=1e-5)  # unit RMS
    samples = np.asarray((u @ a)[:, None] * u)  # one single-direction estimate per row
    vn = np.asarray(v) / np.linalg.norm(v)
    a_np = np.asarray(a)
    perp = a_np - (a_np @ vn) * vn
    want = lam * (a_np @ np.asarray(v)) * np.asarray(v) + (1 - lam) * d / (d - 1) * perp
    se = samples.std(0) / np.sqrt(n)
    assert np.all(np.abs(samples.mean(0) - want) <= 4.5 * se + 1e-6), (samples.mean(0) - want) / se


def test_prgf_alpha_estimate_and_query_pattern():
    """Linear loss: alpha estimates the true cosine (tolerance from the norm estimate's standard error);
    a perfect prior gives lambda* = 1 and asks no search directions; a useless one gives pure RGF."""
    S = 1_000
    aligned = linear_scorer(a=A)

    def run(surrogate, steps=2):
        cfg = prgf_mod.PRGFConfig(eps=0.3, norm="l2", targeted=False, samples=8, norm_samples=S, sigma=1e-3,
                                  loss="margin")  # the toy margin is linear
        attack = prgf_mod.prgf(cfg, surrogate)
        return attack, run_steps(attack, aligned, toy_state(attack), steps)

    attack, (_, q, (_, infos)) = run(aligned)  # surrogate == model: cosine 1
    assert attack.cost == 2 + S + 8
    tol = 4 * 0.5 * np.sqrt(2 / S)  # relative error of sqrt(norm estimate) ~ 0.5*sqrt(2/S)
    assert abs(float(infos.alpha[0]) - 1.0) <= tol
    np.testing.assert_array_equal(np.asarray(infos.lam), 1.0)
    np.testing.assert_array_equal(np.asarray(infos.queries), [S, 0])  # norm probes at step 0 only
    assert int(q) == 2 * 2 + S

    b = jnp.array([-1.3, -0.7, 0.2, 0.4], jnp.float32).reshape(SHAPE)  # b.A = 0: orthogonal prior
    attack, (_, q, (_, infos)) = run(linear_scorer(a=b))
    assert float(infos.alpha[0]) <= tol
    np.testing.assert_array_equal(np.asarray(infos.lam), 0.0)
    np.testing.assert_array_equal(np.asarray(infos.queries), [S + 8, 8])


def test_prgf_transfer_prior_is_the_surrogate_gradient(clean_scorer, surrogate_scorer, attack_set):
    attack = make_attack("prgf", Context(surrogate=surrogate_scorer), targeted=False)
    x, y = attack_set.images[0], attack_set.labels[0]
    s0 = attack.init(jax.random.key(0), x, y, -1)
    s1, info = fast(lambda s, k: attack.step(s, Oracle(clean_scorer).bind(k, 0)), s0, jax.random.key(1))
    g = fast(jax.grad(lambda z: -losses.untargeted_xent(surrogate_scorer(z[None], None)[0], y)), x)  # the default loss
    v = g / jnp.sqrt(jnp.mean(g * g))
    # the step moves along a direction positively correlated with the surrogate's ascent direction
    move = np.asarray(s1.x - x).ravel()
    assert move @ np.asarray(v).ravel() > 0
    assert 0.0 <= float(info.lam) <= 1.0 and np.isfinite(float(info.alpha))
    with pytest.raises(ValueError, match="surrogate"):
        make_attack("prgf", Context())


# ---------------------------------------------------------------------------- all four, noisy

@pytest.mark.parametrize("name", ["signhunter", "bandits_td", "genattack", "prgf"])
def test_points_stay_in_the_ball_and_finite_under_heavy_noise(name, clean_scorer, surrogate_scorer, attack_set):
    spec = ATTACKS[name]
    cfg = {k: v for k, v in spec.battery.items() if k != "budget"}
    attack = make_attack(name, Context(surrogate=surrogate_scorer), targeted=False, **cfg)
    oracle = Oracle(output_noise(clean_scorer, 1.0), attack.output)
    n, budget = 3, 25 * attack.cost
    res = as_np(fast(lambda x, y, t, ka, kd: driver.run(attack, oracle, x, y, t, ka, kd, budget),
                     attack_set.images[:n], attack_set.labels[:n], attack_set.targets[:n], keys(0, n), keys(1, n)))
    d = (res.x_adv - attack_set.images[:n]).reshape(n, -1)
    dist = np.abs(d).max(1) if cfg["norm"] == "linf" else np.linalg.norm(d, axis=1)
    assert np.all(np.isfinite(res.x_adv)) and np.all(dist <= cfg["eps"] + 1e-5)
    assert res.x_adv.min() >= 0.0 and res.x_adv.max() <= 1.0 and np.all(res.queries <= budget)
    rec = res.trace_queries >= 0
    assert np.all(np.isfinite(res.trace_loss[rec]))
