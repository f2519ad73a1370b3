"""ZOO, AutoZOOM, NES-PI, SimBA and Square: checks beyond the registry battery.

The battery (test_attack_battery.py) runs these attacks on the trained digits model. Here, on a
fixed random linear-softmax scorer (smooth, instant, no training), the properties that other
libraries have been reported to get wrong and the pieces the attacks are built from:

- Square never asks about the same point twice (ART issue 2307), and without its re-draws it would;
- SimBA runs a batch of images with per-image results equal to single-image runs (ART issue 855);
- ZOO's coordinate-wise symmetric differences match ``jax.grad`` of its objective; its coordinate
  Adam advances only the chosen coordinates' counters;
- the SimBA-DCT basis is orthonormal and equals the closed-form DCT-II basis;
- the Square p-schedule and window sides; AutoZOOM's bilinear estimate lives in the reduced space
  and averages to the reduced-space gradient;
- NES-PI starts from a pool image of the target class and needs that pool.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import as_np, keys
from rnd_jax.attacks import Context, driver, make_attack
from rnd_jax.attacks.score import autozoom as az
from rnd_jax.attacks.score import simba as sb
from rnd_jax.attacks.score import square as sq
from rnd_jax.attacks.score import zoo as zo
from rnd_jax.oracle import Oracle

SHAPE = (8, 8, 1)


def linear_scorer(seed=0, scale=3.0):
    """``softmax(W x + b)`` over 10 classes with fixed random ``W``: a smooth stand-in model."""
    kw, kb = jax.random.split(jax.random.key(seed))
    W = scale * jax.random.normal(kw, (math.prod(SHAPE), 10)) / math.sqrt(math.prod(SHAPE))
    b = 0.5 * jax.random.normal(kb, (10,))

    def scores(x, keys_):
        del keys_
        return jax.nn.softmax(x.reshape(x.shape[0], -1) @ W + b, axis=-1)

    return scores


@pytest.fixture(scope="module")
def toy():
    """Images, the linear scorer's labels for them, and targets != labels."""
    scorer = linear_scorer()
    x = jax.random.uniform(jax.random.key(1), (8,) + SHAPE)
    y = jnp.argmax(scorer(x, None), -1).astype(jnp.int32)
    t = ((y + 1 + jnp.arange(8) % 9) % 10).astype(jnp.int32)
    return scorer, np.asarray(x), np.asarray(y), np.asarray(t)


def recording(scorer):
    """A scorer that records, through a host callback, every point it is asked about."""
    seen = []

    def scores(x, keys_):
        jax.debug.callback(lambda a: seen.append(np.array(a)), x)
        return scorer(x, keys_)

    return scores, seen


# ------------------------------------------------------------------------------- Square: distinct
@pytest.mark.parametrize("name, eps, extra", [("square_linf", 0.02, dict(p_init=0.01)),
                                              ("square_l2", 0.1, {})])
def test_square_never_repeats_a_query(toy, name, eps, extra):
    """Every point of a long run (small eps: no success, many rejections) is asked exactly once."""
    scorer, x, y, t = toy
    budget = 300
    attack = make_attack(name, targeted=False, eps=eps, n_iters=budget, **extra)
    rec, seen = recording(scorer)
    run = jax.jit(lambda ka: driver.run_one(attack, Oracle(rec), x[0], y[0], t[0], ka, jax.random.key(9), budget))
    res = jax.block_until_ready(run(jax.random.key(3)))
    jax.effects_barrier()
    pts = np.concatenate(seen)
    assert len(pts) == int(res.queries) == budget  # one point per step, nothing uncounted
    assert len({p.tobytes() for p in pts}) == len(pts)
    d = (pts - x[0]).reshape(len(pts), -1)
    dist = np.abs(d).max(1) if name == "square_linf" else np.linalg.norm(d, axis=1)
    assert dist.max() <= eps + 1e-5 and pts.min() >= 0 and pts.max() <= 1


def test_square_without_redraws_would_repeat(toy):
    """The failure the re-draws prevent is real: one draw per step repeats points on 8x8 images."""
    scorer, x, y, t = toy
    budget = 300
    attack = make_attack("square_linf", targeted=False, eps=0.02, p_init=0.01, n_iters=budget, max_tries=1)
    rec, seen = recording(scorer)
    run = jax.jit(lambda ka: driver.run_one(attack, Oracle(rec), x[0], y[0], t[0], ka, jax.random.key(9), budget))
    jax.block_until_ready(run(jax.random.key(3)))
    jax.effects_barrier()
    pts = np.concatenate(seen)
    assert len({p.tobytes() for p in pts}) < len(pts)


def test_square_p_schedule_and_sides():
    p0 = 0.8
    # (iteration of a 10 000-iteration run, divisor of p_init): the paper's piecewise-constant schedule
    table = [(0, 1), (10, 1), (11, 2), (50, 2), (51, 4), (200, 4), (201, 8), (500, 8), (501, 16), (1000, 16),
             (1001, 32), (2000, 32), (2001, 64), (4000, 64), (4001, 128), (6000, 128), (6001, 256), (8000, 256),
             (8001, 512), (10_000, 512), (10_001, 512), (50_000, 512)]  # past the end: the smallest window
    for it, div in table:
        np.testing.assert_allclose(float(sq.p_schedule(p0, it, 10_000)), p0 / div, rtol=1e-6, err_msg=str(it))
    # stretched over 1000 iterations: iteration i behaves like 10*i of the full run
    for it, div in [(1, 1), (2, 2), (5, 2), (6, 4), (20, 4), (21, 8), (1000, 512), (1001, 512)]:
        np.testing.assert_allclose(float(sq.p_schedule(p0, it, 1000)), p0 / div, rtol=1e-6, err_msg=str(it))
    # window sides on 8x8x1: round(sqrt(p * 64)), within [1, 7]; l2 odd and >= 3
    assert [int(sq.side(p, 8, 8, 1, "linf")) for p in (0.8, 0.4, 0.05, 0.025, 0.001, 1.0)] == [7, 5, 2, 1, 1, 7]
    assert [int(sq.side(p, 8, 8, 1, "l2")) for p in (0.8, 0.4, 0.1, 0.001)] == [7, 5, 3, 3]


def test_square_l2_pattern_is_the_papers_bump():
    """eta for s = 5: rows 0-1 positive, 2-4 negative, concentric 1/m^2 rectangles, unit norm."""
    table = sq._inv_sq_cumsum(12)
    a, b = np.arange(5)[:, None], np.arange(5)[None, :]
    eta = np.asarray(sq.meta_pattern(jnp.asarray(a), jnp.asarray(b), 5, False, table))
    np.testing.assert_allclose(np.sum(eta ** 2), 1.0, rtol=1e-5)
    assert np.all(eta[:2] > 0) and np.all(eta[2:] < 0)
    # bottom block (3 x 5, centre (1, 2)): Chebyshev rings with values sum_{m=r+1..3} 1/m^2
    ring = lambda r: sum(1 / m ** 2 for m in range(r + 1, 4))
    bottom = -np.array([[ring(max(abs(i - 1), abs(j - 2))) for j in range(5)] for i in range(3)])
    np.testing.assert_allclose(eta[2:] / np.linalg.norm(eta[2:]), bottom / np.linalg.norm(bottom), rtol=1e-5)
    eta_t = np.asarray(sq.meta_pattern(jnp.asarray(a), jnp.asarray(b), 5, True, table))
    np.testing.assert_allclose(eta_t, eta.T, atol=1e-7)


# ------------------------------------------------------------------------------ SimBA: batching
@pytest.mark.parametrize("name", ["simba_pixel", "simba_dct"])
def test_simba_batch_equals_single_runs(toy, name):
    scorer, x, y, t = toy
    budget, n = 120, 6
    attack = make_attack(name, targeted=True, eps=2.0)
    o = Oracle(scorer)
    batch = as_np(jax.jit(lambda *a: driver.run(attack, o, *a, budget))(x[:n], y[:n], t[:n], keys(0, n), keys(1, n)))
    one = jax.jit(lambda *a: driver.run_one(attack, o, *a, budget))
    for i in range(n):
        r = as_np(one(x[i], y[i], t[i], keys(0, n)[i], keys(1, n)[i]))
        assert r.queries == batch.queries[i] and r.lucky == batch.lucky[i] and r.steps == batch.steps[i]
        np.testing.assert_allclose(r.x_adv, batch.x_adv[i], atol=1e-6)
    assert batch.lucky.mean() >= 0.5 and np.all(batch.queries % 2 == 0)


def test_simba_dct_basis_is_orthonormal_dct_ii():
    H, W, C = 8, 8, 2
    B = np.asarray(jax.jit(jax.vmap(lambda i: sb.dct_basis_vector(i, (H, W, C)).reshape(-1)))(jnp.arange(H * W * C)))
    np.testing.assert_allclose(B @ B.T, np.eye(H * W * C), atol=1e-5)
    alpha = lambda k, n: math.sqrt((1 if k == 0 else 2) / n)
    for idx in (0, 1, 2 * C + 1, 9 * C, H * W * C - 1):
        u, v, c = np.unravel_index(idx, (H, W, C))
        i, j = np.arange(H)[:, None], np.arange(W)[None, :]
        closed = alpha(u, H) * alpha(v, W) * np.cos(np.pi * (2 * i + 1) * u / (2 * H)) * np.cos(
            np.pi * (2 * j + 1) * v / (2 * W))
        want = np.zeros((H, W, C))
        want[..., c] = closed
        np.testing.assert_allclose(B[idx].reshape(H, W, C), want, atol=1e-6)


def test_simba_dct_order_goes_low_frequency_first():
    bands = sb.frequency_bands((8, 8, 1), 2, 2)
    order = np.asarray(sb.basis_order(jax.random.key(0), bands))
    assert sorted(order.tolist()) == list(range(64))
    got = np.asarray(bands)[order]
    assert np.all(np.diff(got) >= 0) and got[0] == 0 and set(order[:4].tolist()) == {0, 1, 8, 9}


# ---------------------------------------------------------------------------------------- ZOO
def test_zoo_symmetric_differences_match_autodiff():
    scorer = linear_scorer(scale=1.0)
    x0 = jnp.full(SHAPE, 0.5)
    x = x0 + 0.1 * jax.random.normal(jax.random.key(2), SHAPE)
    cls, c = 3, 0.5

    def F(z):
        return zo.objective(scorer(z[None], None)[0], z, x0, cls, c, 1e3, False)

    @jax.jit
    def both(x):
        pts = zo.coordinate_probes(x, jnp.arange(64), 1e-4)
        vals = zo.objective(scorer(pts, None), pts, x0, cls, c, 1e3, False)
        return zo.symmetric_difference(vals, 1e-4), jax.grad(F)(x).reshape(-1)

    est, true = map(np.asarray, both(x))
    # float32 objective of size ~1 differenced over 2h = 2e-4: rounding error ~ 1e-7 / 2e-4 ~ 1e-3
    np.testing.assert_allclose(est, true, atol=3e-3 + 1e-2 * np.abs(true).max())


def test_zoo_coordinate_adam_moves_only_chosen_coordinates(toy):
    scorer, x, y, t = toy
    attack = make_attack("zoo", targeted=False, coords=8)
    s0 = attack.init(jax.random.key(0), x[0], y[0], t[0])
    s1, info = jax.jit(lambda s: attack.step(s, Oracle(scorer).bind(jax.random.key(1), 0)))(s0)
    counts = np.asarray(s1.opt_state[0].count)
    assert counts.sum() == 8 and set(np.unique(counts)) <= {0, 1}
    moved = np.flatnonzero(np.asarray(s1.x != s0.x).reshape(-1))
    assert set(moved.tolist()) <= set(np.flatnonzero(counts).tolist()) and attack.cost == 17


# ----------------------------------------------------------------------------------- AutoZOOM
def test_autozoom_bilinear_estimate_is_in_the_reduced_space():
    scorer = linear_scorer(scale=1.0)
    x0 = jnp.full(SHAPE, 0.5)
    cfg = az.AutoZOOMBiConfig(targeted=False)
    attack = az.autozoom(cfg)
    s = attack.init(jax.random.key(0), x0, 3, -1)
    assert s.delta.shape == (4, 4, 1) and az.decode(s.delta, SHAPE).shape == SHAPE
    q, beta = 4000, 1e-3
    u = az.unit_directions(jax.random.key(1), q, s.delta.shape)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(u).reshape(q, -1), axis=1), 1.0, rtol=1e-5)

    def F(delta):  # the attack's objective as a function of the reduced perturbation
        z = x0 + az.decode(delta, SHAPE)
        return zo.objective(scorer(z[None], None)[0], z, x0, 3, 1.0, 1e3, False)

    delta = 0.05 * jax.random.normal(jax.random.key(2), s.delta.shape)

    @jax.jit
    def both(delta, u):
        f = jax.vmap(lambda d: F(delta + beta * d))(u)
        return az.random_vector_estimate(F(delta), f, u, beta), jax.grad(F)(delta)

    g, true = both(delta, u)
    assert g.shape == (4, 4, 1)
    # E[(u.grad) u] = grad/d' for u uniform on the sphere, so the sum over q directions ~ (q/d') grad
    cos = float(jnp.vdot(g, true) / (jnp.linalg.norm(g) * jnp.linalg.norm(true)))
    assert cos > 0.95, cos
    np.testing.assert_allclose(np.asarray(g) * 16 / q, np.asarray(true), atol=0.15 * float(jnp.abs(true).max()))


# ------------------------------------------------------------------------------------- NES-PI
def test_nes_pi_starts_from_a_target_image_and_needs_the_pool(toy):
    scorer, x, y, t = toy
    pool = np.asarray(jax.random.uniform(jax.random.key(5), (30,) + SHAPE))
    labels = np.arange(30) % 5  # classes 0..4 only
    attack = make_attack("nes_pi", Context(train_images=pool, train_labels=labels))
    s = attack.init(jax.random.key(0), x[0], y[0], 3)
    hits = [i for i in range(30) if np.allclose(pool[i], np.asarray(s.adv))]
    assert hits and labels[hits[0]] == 3 and not bool(s.failed) and float(s.eps_t) == 1.0
    d = np.abs(np.asarray(s.x) - x[0]).max()
    assert d <= 0.3 + 1e-6  # the returned point is always inside the goal ball
    assert bool(attack.init(jax.random.key(0), x[0], y[0], 7).failed)  # no image of class 7
    with pytest.raises(ValueError):
        make_attack("nes_pi")  # no pool in the Context
    with pytest.raises(ValueError):
        make_attack("nes_pi", Context(train_images=pool, train_labels=labels), targeted=False)


def test_nes_pi_line_search_is_counted(toy):
    """Top-1 oracle; every point the model sees (line-search points included) is in the count."""
    scorer, x, y, t = toy
    pool = np.asarray(x)
    # a goal ball too small to reach: every step runs its line search
    attack = make_attack("nes_pi", Context(train_images=pool, train_labels=np.asarray(y)), samples=2, eps=0.01)
    rec, seen = recording(scorer)
    src = int(np.flatnonzero(y != y[0])[0])
    budget = 3 * attack.cost
    run = jax.jit(lambda: driver.run_one(attack, Oracle(rec, "top1"), x[0], y[0], y[src], jax.random.key(0),
                                         jax.random.key(1), budget))
    res = jax.block_until_ready(run())
    jax.effects_barrier()
    asked = sum(len(p) for p in seen)
    # under jit the line search's oracle call runs once per loop iteration, so the recorder sees
    # exactly the points asked; the plain calls are 1 + J = 3 points per step
    assert asked == int(res.queries) <= budget
    assert asked > 3 * int(res.steps) >= 6
