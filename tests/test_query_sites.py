"""Where the decision attacks query the model: few places, each asking what the phase-by-phase loops asked.

XLA compiles one copy of the model for every place a program queries it (about 1 s each for a
ResNet-50 at 224x224), so the decision attacks ask from as few places as their algorithms allow.

``_common.ray_search`` (probe, then scaling, then bisection) and ``_common.opt_line_search`` (grow, then
shrink) each run as one ``live_while`` that asks one point per iteration, so a program holds one copy of
the model per search. The witnesses below are the phase-by-phase loops (one loop per phase, one after
the other). Both run on a noisy linear label model whose answer depends on each point's query number,
so a single point asked out of turn changes the answers: results, ``ok`` flags and offsets must be
bit-identical.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from rnd_jax.attacks import Context, make_attack
from rnd_jax.attacks.decision import _common as C
from rnd_jax.oracle import Oracle, live, live_while

SHAPE = (4, 4, 1)
D = 16


def _linear_noisy(w, p, x, keys):
    """Class 1 where ``<w, x> > 1`` (else 0), flipped with probability ``p`` by each point's key."""
    s = jnp.tensordot(x.reshape(x.shape[0], -1), w, axes=1) - 1.0
    top = (s > 0).astype(jnp.int32)
    flip = jax.vmap(lambda k: jax.random.uniform(k) < p)(keys)
    return jax.nn.one_hot(jnp.where(flip, 1 - top, top), 2)


def oracle(p=0.15):
    w = jnp.linspace(0.5, 1.5, D)
    return Oracle(Partial(_linear_noisy, w, jnp.float32(p)), "label")


# ---------------------------------------------------------------- witnesses: one loop per phase

def witness_ray_search(orc, offset, x0, theta, lam0, tol, max_scale, max_bisect, cls, targeted, expand):
    adv0, offset = C.ask(orc, offset, C.ray_point(x0, theta, lam0)[None], cls, targeted)
    adv0 = adv0[0]
    lam0 = jnp.asarray(lam0, jnp.float32)

    def scale_loop(factor, want_adv, start):
        def body(c):
            k, lam, _, _, off = c
            nxt = lam * factor
            a, off = C.ask(orc, off, C.ray_point(x0, theta, nxt)[None], cls, targeted)
            return k + 1, nxt, lam, a[0] == want_adv, off

        _, lam, prev, reached, off = live_while(lambda c: (c[0] < max_scale) & ~c[3], body,
                                                (jnp.zeros((), jnp.int32), lam0, lam0, jnp.zeros((), bool), start))
        return lam, prev, reached, off

    def shrink(c):
        lo, prev, reached, off = scale_loop(0.99, False, c[3])
        return jnp.where(reached, lo, 0.0), jnp.where(reached, prev, lo), jnp.ones((), bool), off

    def grow(c):
        hi, prev, reached, off = scale_loop(1.01, True, c[3])
        return prev, hi, reached, off

    carry = C.run_if(adv0, shrink, (lam0, lam0, adv0, offset))
    if expand:
        carry = C.run_if(~adv0, grow, carry)
    lo, hi, ok, offset = carry
    point = lambda lam: C.ray_point(x0, theta, lam)
    _, hi2, offset = C.run_if(ok, lambda c: C.bisect(orc, c[2], point, c[0], c[1], tol, max_bisect, cls, targeted),
                              (lo, hi, offset))
    return jnp.where(ok, hi2, hi), ok, offset


def witness_line_search(orc, offset, x0, theta, g, grad, alpha, tol, cls, targeted, max_trials, max_scale,
                        max_bisect, allowance):
    worst = 1 + max_scale + max_bisect

    def trial(a, g_ref, off):
        th = C.unit(theta - a * grad)
        g_new, ok, off = witness_ray_search(orc, off, x0, th, g_ref, tol, max_scale, max_bisect, cls, targeted,
                                            False)
        return th, jnp.where(ok, g_new, jnp.inf), off

    def up_body(c):
        k, a, th_best, g_best, _, off = c
        th, g_new, off = trial(a, g_best, off)
        better = g_new < g_best
        return k + 1, 2.0 * a, jnp.where(better, th, th_best), jnp.where(better, g_new, g_best), better, off

    init = (jnp.zeros((), jnp.int32), alpha, theta, g, jnp.ones((), bool), offset)
    _, alpha, th_best, g_best, _, offset = live_while(
        lambda c: (c[0] < max_trials) & c[4] & (c[5] + worst <= allowance), up_body, init)

    def down_body(c):
        k, a, th_best, g_best, _, off = c
        a = 0.25 * a
        th, g_new, off = trial(a, g, off)
        better = g_new < g
        return k + 1, a, jnp.where(better, th, th_best), jnp.where(better, g_new, g_best), better, off

    def down(c):
        return live_while(lambda c: (c[0] < max_trials) & ~c[4] & (c[5] + worst <= allowance), down_body, c)

    _, alpha, th_best, g_best, _, offset = C.run_if(
        ~(g_best < g), down, (jnp.zeros((), jnp.int32), alpha, th_best, g_best, jnp.zeros((), bool), offset))
    return th_best, g_best, alpha, offset


# ---------------------------------------------------------------- cases

N = 48


def cases(seed):
    """Per image: a start x0 (class 0), a unit direction, a defense key, and a distance guess around g."""
    r = np.random.default_rng(seed)
    x0 = r.uniform(0.0, 0.05, (N,) + SHAPE).astype(np.float32)
    theta = r.normal(size=(N,) + SHAPE).astype(np.float32) + 0.6  # mostly towards class 1
    theta /= np.linalg.norm(theta.reshape(N, -1), axis=1).reshape(N, 1, 1, 1)
    lam0 = r.uniform(0.05, 2.5, N).astype(np.float32)  # below and above the boundary
    grad = r.normal(size=(N,) + SHAPE).astype(np.float32)
    keys = jax.random.split(jax.random.key(seed), N)
    return jnp.asarray(x0), jnp.asarray(theta), jnp.asarray(lam0), jnp.asarray(grad), keys


def _ray(fn, orc, expand, max_scale, tol):
    def one(x0, theta, lam0, key):
        o = orc.bind(key, 0)
        return fn(o, jnp.zeros((), jnp.int32), x0, theta, lam0, tol, max_scale, 12, jnp.int32(0), False, expand)
    return jax.jit(jax.vmap(one))


def _line(fn, orc, allowance):
    def one(x0, theta, lam0, grad, key):
        o = orc.bind(key, 0)
        return fn(o, jnp.zeros((), jnp.int32), x0, theta, lam0, grad, jnp.float32(0.2), jnp.float32(1e-3),
                  jnp.int32(0), False, 6, 4, 12, allowance)
    return jax.jit(jax.vmap(one))


def _same(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.parametrize("expand,max_scale,tol", [(True, 10, 1e-3), (False, 10, 1e-3), (True, 2, 1e-4),
                                                  (False, 0, 1e-3), (True, 5, 10.0)])
def test_ray_search_asks_what_phase_by_phase_loops_ask(expand, max_scale, tol):
    x0, theta, lam0, _, keys = cases(1)
    orc = oracle()
    got = _ray(C.ray_search, orc, expand, max_scale, tol)(x0, theta, lam0, keys)
    want = _ray(witness_ray_search, orc, expand, max_scale, tol)(x0, theta, lam0, keys)
    _same(got, want)
    g, ok, off = map(np.asarray, got)
    assert 0 < ok.sum() < N or not expand  # both outcomes occur
    assert np.all(off >= 1) and np.all(off <= 1 + max_scale + 12)
    if expand and tol < 1:
        assert len(np.unique(off)) > 3  # the cases take different paths through the phases


@pytest.mark.parametrize("allowance", [200, 40, 17])
def test_line_search_makes_the_trials_grow_then_shrink_loops_make(allowance):
    x0, theta, lam0, grad, keys = cases(2)
    orc = oracle()
    got = _line(C.opt_line_search, orc, allowance)(x0, theta, lam0, grad, keys)
    want = _line(witness_line_search, orc, allowance)(x0, theta, lam0, grad, keys)
    _same((got.theta, got.g, got.alpha, got.offset), want)
    alpha = np.asarray(got.alpha)
    if allowance >= 100:
        assert np.any(alpha > 0.4) and np.any(alpha < 0.2)  # grow trials, and shrink trials
    if allowance < 2 * 17:
        assert np.all(alpha == 0.4)  # room for one (grow) trial only
    assert np.all(np.asarray(got.offset) <= allowance)


def test_each_search_asks_the_model_from_one_place():
    """One traced oracle call per search: one copy of the model in a compiled program."""
    traced = []

    def counting(x, keys):
        traced.append(x.shape)
        return _linear_noisy(jnp.ones(D), 0.0, x, keys)

    orc = Oracle(counting, "label")
    x0, theta, lam0, grad, keys = cases(3)
    o = orc.bind(keys[0], 0)
    jax.make_jaxpr(lambda *a: C.ray_search(o, 0, *a, 1e-3, 10, 12, jnp.int32(0), False, True))(x0[0], theta[0],
                                                                                             lam0[0])
    assert len(traced) == 1
    traced.clear()
    jax.make_jaxpr(lambda *a: C.opt_line_search(o, 0, *a, jnp.float32(0.2), 1e-3, jnp.int32(0), False, 6, 4, 12,
                                                200))(x0[0], theta[0], lam0[0], grad[0])
    assert len(traced) == 1


# ---------------------------------------------------------------- a one-point search, then the boundary search

HALVING = C.OnePoint(  # HSJA's geometric step-size search (carry: j, xi, ok, xb, v)
    going=lambda c: (c[0] <= 6) & ~c[2],
    point=lambda c: jnp.clip(c[3] + c[1] * c[4], 0.0, 1.0),
    update=lambda c, adv: (c[0] + 1, jnp.where(adv, c[1], 0.5 * c[1]), adv, c[3], c[4]),
    result=lambda c: (jnp.clip(c[3] + c[1] * c[4], 0.0, 1.0), c[2]))


def witness_then_boundary(orc, offset, x0, norm, rel_tol, max_iter, pre, pc, run_pre, x_adv, bisect):
    def run(c):
        pc, off = c

        def body(cc):
            pc, off = cc
            adv, off = C.ask(orc, off, pre.point(pc)[None], jnp.int32(0), False)
            return pre.update(pc, adv[0]), off

        return live_while(lambda cc: pre.going(cc[0]), body, (pc, off))

    pc, offset = C.run_if(run_pre, run, (pc, offset))
    x_found, found = pre.result(pc)
    x_q, bis = jnp.where(run_pre, x_found, x_adv), jnp.where(run_pre, found, bisect)
    x_b, offset = C.run_if(bis, lambda c: C.boundary(orc, c[1], x0, c[0], norm, rel_tol, max_iter, jnp.int32(0), False),
                           (x_q, offset))
    return x_b, bis, pc, offset


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_a_search_then_the_boundary_search_in_one_loop_asks_what_two_loops_ask(norm):
    x0, theta, lam0, _, keys = cases(5)
    r = np.random.default_rng(5)
    run_pre = jnp.asarray(r.uniform(size=N) < 0.7)  # iterating images; the others bisect a start (if found)
    bisect = jnp.asarray(r.uniform(size=N) < 0.8)
    x_start = jnp.clip(x0 + 2.0 * theta, 0.0, 1.0)  # mostly adversarial
    xb = jnp.clip(x0 + lam0[:, None, None, None] * theta, 0.0, 1.0)
    v = C.unit_rows(jnp.asarray(r.normal(size=(N,) + SHAPE), jnp.float32))
    xi = jnp.asarray(r.uniform(0.1, 2.0, N), jnp.float32)
    orc = oracle()

    def go(fn):
        def one(x0, key, rp, bi, xs, xb, v, xi):
            pc = (jnp.zeros((), jnp.int32), xi, jnp.zeros((), bool), xb, v)
            return fn(orc.bind(key, 0), jnp.zeros((), jnp.int32), x0, norm, 1e-3, 14, HALVING, pc, rp, xs, bi)
        return jax.jit(jax.vmap(one))(x0, keys, run_pre, bisect, x_start, xb, v, xi)

    got = go(lambda o, off, x0, norm, tol, n, pre, pc, rp, xs, bi: C.then_boundary(
        o, off, x0, norm, tol, n, jnp.int32(0), False, pre, pc, rp, xs, bi))
    want = go(witness_then_boundary)
    _same(got, want)
    bis, off = np.asarray(got[1]), np.asarray(got[3])
    assert 0 < bis.sum() < N and len(np.unique(off)) > 4  # bisected or not; paths of many lengths


# ---------------------------------------------------------------- places per step

SITES = {"hsja": 3, "hsja_linf": 3, "geoda": 3, "signopt": 4, "opt": 4}  # see the test's docstring


@pytest.mark.parametrize("name", sorted(SITES))
def test_a_step_queries_the_model_from_few_places(name):
    """HSJA, GeoDA: start candidates, the estimate, and one loop for the step search (the geometric step-size
    search; GeoDA's search along the normal) and one boundary search, which serves both phases. OPT, Sign-OPT:
    start candidates, the start's ray bisection, the estimate, and the line search (one ray search). Before,
    HSJA and GeoDA held 5 copies of the model, OPT 12 and Sign-OPT 9 (a ray search split into its phases)."""
    traced = []

    def counting(x, keys):
        traced.append(x.shape)
        return _linear_noisy(jnp.ones(D), 0.0, x, keys)

    pool = jnp.asarray(np.random.default_rng(0).uniform(size=(30,) + SHAPE), jnp.float32)
    attack = make_attack(name, Context(pool, jnp.arange(30, dtype=jnp.int32) % 2, 2))
    x0 = jnp.full(SHAPE, 0.1)
    state = attack.init(jax.random.key(0), x0, jnp.int32(0), jnp.int32(-1))
    jax.make_jaxpr(lambda st: attack.step(st, Oracle(counting, "label").bind(jax.random.key(1), 0, 10_000)))(state)
    assert len(traced) == SITES[name], traced


# ---------------------------------------------------------------- searches in lock-step

def _numbering_scorer(seen):
    """The noise-free linear model, recording the key data of every live point it is asked (in order)."""
    w = jnp.linspace(0.5, 1.5, D)

    def record(kd, live):
        seen.extend(map(tuple, np.asarray(kd)[np.asarray(live, bool)].tolist()))
        return np.zeros((), np.int32)

    def scorer(x, keys):
        pred = live()
        live_mask = jnp.ones(x.shape[:1], bool) if pred is None else jnp.broadcast_to(pred, x.shape[:1])
        token = jax.pure_callback(record, jax.ShapeDtypeStruct((), jnp.int32), jax.random.key_data(keys), live_mask)
        return _linear_noisy(w, 0.0, x, keys) + 0.0 * token

    return scorer


def test_searches_in_lock_step_ask_each_search_s_points_numbered_in_the_order_asked():
    x0, theta, lam0, _, keys = cases(4)
    n = 12
    thetas, x, g0 = theta[:n], x0[0], lam0[0]
    # the same searches one by one (without noise the answers do not depend on the query numbers)
    one = jax.jit(jax.vmap(lambda th: C.ray_search(oracle(0.0).bind(keys[0], 0), 0, x, th, g0, 1e-3, 10, 12,
                                                   jnp.int32(0), False, True)))(thetas)
    seen = []
    dk = keys[1]
    orc = Oracle(_numbering_scorer(seen), "label")
    g, ok, off = jax.jit(lambda t: C.ray_searches(orc.bind(dk, 5), 3, x, t, g0, 1e-3, 10, 12, jnp.int32(0), False,
                                                  True))(thetas)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(one[0]))
    np.testing.assert_array_equal(np.asarray(ok), np.asarray(one[1]))
    total = int(np.sum(one[2]))
    assert int(off) == 3 + total  # every point counted once
    # numbered 3, 4, ... after the step's first 3 points (the oracle bound at query 5): no gap, no repeat
    want = [tuple(np.asarray(jax.random.key_data(jax.random.fold_in(dk, 5 + 3 + i))).tolist()) for i in range(total)]
    assert seen == want
    assert max(np.asarray(one[2])) < total / 3  # the loop ran as long as the longest search, not the sum


def test_opt_in_lock_step_is_opt_without_noise_in_fewer_host_calls():
    from rnd_jax.attacks import driver
    from rnd_jax.foreign import HostModel, host_scorer

    w = np.linspace(0.5, 1.5, D).astype(np.float32)

    def predict(xs):
        top = (xs.reshape(len(xs), -1) @ w > 1.0).astype(int)
        return np.eye(2, dtype=np.float32)[top]

    pool = jnp.asarray(np.random.default_rng(0).uniform(size=(30,) + SHAPE), jnp.float32)
    ctx = Context(pool, jnp.asarray((pool.reshape(30, -1) @ w > 1.0).astype(np.int32)), 2)
    x0 = jnp.asarray(np.random.default_rng(1).uniform(0, 0.08, (3,) + SHAPE), jnp.float32)
    y = jnp.zeros(3, jnp.int32)
    ka, kd = jax.random.split(jax.random.key(0), 3), jax.random.split(jax.random.key(1), 3)
    out = {}
    for lockstep in (False, True):
        model = HostModel(predict, 2)
        attack = make_attack("opt", ctx, lockstep=lockstep)
        res = jax.jit(lambda *a: driver.run(attack, Oracle(host_scorer(model), "label"), *a, budget=1500))(
            x0, y, None, ka, kd)
        out[lockstep] = (jax.tree.map(np.asarray, res), model.points, model.calls)
    (r0, p0, c0), (r1, p1, c1) = out[False], out[True]
    for a, b in zip(jax.tree.leaves(r0), jax.tree.leaves(r1)):
        np.testing.assert_array_equal(a, b)
    assert p1 == p0 == int(r1.queries.sum())  # the host was asked exactly the counted points
    start = np.asarray(ctx.train_images)[np.asarray(ctx.train_labels) == 1]  # the closest start it could draw
    d_start = np.linalg.norm((start[None] - np.asarray(x0)[:, None]).reshape(3, len(start), -1), axis=2).min(1)
    d_end = np.linalg.norm((r1.x_adv - np.asarray(x0)).reshape(3, -1), axis=1)
    assert np.all(predict(r1.x_adv)[:, 1] == 1) and np.all(d_end < 0.5 * d_start)  # it did attack
    assert c1 < 0.5 * c0, (c0, c1)
