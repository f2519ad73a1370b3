"""Machinery shared by the decision-based (hard-label) attacks.

Every decision attack sees only the top-1 label of a query (``Oracle(..., "label")``) and follows
the same life cycle, built from the pieces here:

1. **Starting point** (``search_start``). ``init`` gets no oracle, so the search happens inside the
   first step(s), and its queries are counted like any other. Targeted: ``start_candidates``
   training images of the target class, drawn without replacement from the pool by the step's key;
   untargeted: half uniform-noise images, half training images of other classes. All candidates go
   to the oracle in one batch; the adversarial one closest to ``x0`` (in the attack's norm) is kept.
   A step that finds none draws new candidates in the next step; after ``start_steps`` empty
   steps the image is marked ``failed`` and the driver stops it alone (the rest of the batch runs
   on). A targeted image whose target class has no pool image fails at once, without queries.
2. **Searches** along a path from ``x0`` to an adversarial point (``bisect``): an interval
   ``[lo, hi]`` of a path parameter with ``hi`` adversarial, halved until ``hi - lo <= tol`` or
   ``max_iter`` halvings. It is a ``lax.while_loop`` that asks one point per iteration through
   ``oracle.at``; the attack reports the points in ``Info.queries`` and declares the worst case as
   its cost, so the driver never lets a step start that could exceed the budget. Nothing divides by
   the interval width, so an interval that collapses to a point (``x0`` already adversarial, a
   distance of 0) simply stops the loop (cf. the 0/0 -> NaN of HSJA implementations when the
   search threshold ``dist * theta`` is 0).
3. **Best point.** ``State.x`` is the closest point the attack has seen answered adversarial
   (always in [0, 1]); ``done`` is "``x`` is adversarial (by the attack's own answers) and within
   ``eps``"; ``eps=None`` never stops early and minimizes the distance up to the budget.

Query numbering: a step asks all its points through ``oracle.at(offset, x)`` with ``offset``
counting from 0 (no plain calls), and reports the final offset as ``Info.queries``.

Exclusive phases of a step (search vs. attack iteration) run through :func:`run_if`, a
``while_loop`` of at most one iteration: under ``vmap`` a ``lax.cond`` would evaluate both branches
(and their model queries) for every image, while the loop costs nothing once no image needs it.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from rnd_jax.attacks.driver import Attack, run_if
from rnd_jax.oracle import live_while

NORMS = ("l2", "linf")
TINY = 1e-12


# ----------------------------------------------------------------------------- validation

def check_real(name: str, value, *, positive: bool = True, upper: float | None = None, none_ok: bool = False):
    """A finite real number (> 0 if ``positive``, else >= 0; <= ``upper`` if given)."""
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (positive and value <= 0) or (not positive and value < 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    if upper is not None and value > upper:
        raise ValueError(f"{name} must be <= {upper}, got {value!r}")


def check_int(name: str, value, minimum: int = 1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_common(cfg, norms=NORMS):
    """Fields of every decision config: eps, norm, targeted (and start_candidates, start_steps if present)."""
    if cfg.norm not in norms:
        raise ValueError(f"unsupported norm {cfg.norm!r} for this attack; choose one of {norms}")
    check_real("eps", cfg.eps, none_ok=True)
    if not isinstance(cfg.targeted, bool):
        raise ValueError(f"targeted must be a bool, got {cfg.targeted!r}")
    for name in ("start_candidates", "start_steps"):
        if hasattr(cfg, name):
            check_int(name, getattr(cfg, name), 1)


# ----------------------------------------------------------------------------- geometry

def flat_norm(v, norm: str):
    """The ``norm`` of ``v`` over all its axes."""
    v = jnp.reshape(v, (-1,))
    return jnp.max(jnp.abs(v)) if norm == "linf" else jnp.sqrt(jnp.sum(v * v))


def distance(x, x0, norm: str):
    return flat_norm(x - x0, norm)


def batch_norm(v, norm: str):
    """Per-row norm of ``v: [B, ...]``."""
    v = jnp.reshape(v, (v.shape[0], -1))
    return jnp.max(jnp.abs(v), axis=1) if norm == "linf" else jnp.sqrt(jnp.sum(v * v, axis=1))


def safe_div(a, b):
    """``a / b`` where ``|b| > TINY``, else 0 (no NaN from 0/0, no inf from x/0)."""
    ok = jnp.abs(b) > TINY
    return jnp.where(ok, a / jnp.where(ok, b, 1.0), 0.0)


def unit(v):
    """``v / ||v||_2``, or zeros when ``v`` is (numerically) zero."""
    return safe_div(v, jnp.sqrt(jnp.sum(v * v)))


def unit_rows(v):
    """Each row of ``v: [B, ...]`` scaled to unit l2 norm (zero rows stay zero)."""
    n = jnp.sqrt(jnp.sum(jnp.reshape(v * v, (v.shape[0], -1)), axis=1))
    return safe_div(v, n.reshape((-1,) + (1,) * (v.ndim - 1)))


def blend(x0, x, a):
    """The l2 path: ``(1 - a) x0 + a x`` (``a`` in [0, 1])."""
    return (1.0 - a) * x0 + a * x


def linf_clip(x0, x, a):
    """The l_inf path: ``x`` clipped to the l_inf ball of radius ``a`` around ``x0``."""
    return jnp.clip(x, x0 - a, x0 + a)


# ----------------------------------------------------------------------------- oracle helpers

def adversarial(labels, cls, targeted: bool):
    """Hard labels -> adversarial flags: ``label == target`` (targeted) or ``label != label0``."""
    return (labels == cls) if targeted else (labels != cls)


def ask(oracle, offset, x, cls, targeted: bool):
    """Ask the points ``x: [B, H, W, C]`` as this step's points ``offset..offset+B-1``.

    Returns (adversarial flags bool[B], the next offset)."""
    labels = oracle.at(offset, x)
    return adversarial(labels, cls, targeted), offset + x.shape[0]




def bisect(oracle, offset, point, lo, hi, tol, max_iter: int, cls, targeted: bool):
    """Bisection of a path parameter: ``point(hi)`` adversarial, ``point(lo)`` presumed not.

    Halves ``[lo, hi]`` while ``hi - lo > tol`` and fewer than ``max_iter`` halvings were made; one
    query per halving. Returns ``(lo, hi, offset)``; ``hi`` is always a parameter whose point was
    answered adversarial (or the initial ``hi``).
    """
    def cond(c):
        i, lo, hi, _ = c
        return (i < max_iter) & (hi - lo > tol)

    def body(c):
        i, lo, hi, off = c
        mid = 0.5 * (lo + hi)
        adv, off = ask(oracle, off, point(mid)[None], cls, targeted)
        adv = adv[0]
        return i + 1, jnp.where(adv, lo, mid), jnp.where(adv, mid, hi), off

    lo = jnp.asarray(lo, jnp.float32)
    hi = jnp.asarray(hi, jnp.float32)
    _, lo, hi, offset = live_while(cond, body, (jnp.zeros((), jnp.int32), lo, hi, offset))
    return lo, hi, offset


def boundary(oracle, offset, x0, x_adv, norm: str, rel_tol: float, max_iter: int, cls, targeted: bool):
    """Bisection from ``x_adv`` (adversarial) towards ``x0`` along the ``norm``'s path.

    l2: the segment ``(1 - a) x0 + a x_adv``, ``a`` in [0, 1], stopped at ``a``-width ``rel_tol``.
    l_inf: ``x_adv`` clipped to the l_inf ball of radius ``a`` in [0, ||x_adv - x0||_inf], stopped at
    width ``rel_tol * min(1, ||x_adv - x0||_inf)`` (HopSkipJump's choice). Returns
    ``(x_boundary, offset)`` with ``x_boundary`` the adversarial end.
    """
    point, lo, hi, tol = boundary_path(x0, x_adv, norm, rel_tol)
    _, hi, offset = bisect(oracle, offset, point, lo, hi, tol, max_iter, cls, targeted)
    return jnp.clip(point(hi), 0.0, 1.0), offset


def boundary_path(x0, x_adv, norm: str, rel_tol: float):
    """The bisection of :func:`boundary`: ``(point(a), lo, hi, tol)`` of its path parameter ``a``."""
    if norm == "l2":
        return (lambda a: blend(x0, x_adv, a)), 0.0, 1.0, rel_tol
    d = distance(x_adv, x0, "linf")
    return (lambda a: linf_clip(x0, x_adv, a)), 0.0, d, rel_tol * jnp.minimum(d, 1.0)


class OnePoint(NamedTuple):
    """A search that asks one point per iteration, as pure functions of its carry (see :func:`then_boundary`).

    ``going(c)``: it asks another point; ``point(c)``: that point ``[H, W, C]``; ``update(c, adv)``: the
    carry after the answer; ``result(c) -> (x_adv, found)``: the point to bisect, and whether it was found.
    """

    going: Any
    point: Any
    update: Any
    result: Any


_PRE, _BIS, _END = 0, 1, 2  # phases of then_boundary


def then_boundary(oracle, offset, x0, norm: str, rel_tol: float, max_iter: int, cls, targeted: bool,
                  pre: OnePoint, pre_carry, run_pre, x_adv, bisect):
    """``pre`` (when ``run_pre``), then :func:`boundary` from its result (when found), as one loop.

    When ``run_pre`` is false, ``x_adv`` is bisected to the boundary if ``bisect`` holds (a start
    found by a search step). One point per iteration and one oracle call in the program: each image
    asks the points it would ask in ``pre``'s loop followed by :func:`boundary`'s, in that order, and
    under ``vmap`` images in different phases share an iteration. Returns ``(x_boundary, bisected,
    pre's final carry, offset)``; ``x_boundary`` is the point to bisect itself when it was not bisected.
    """
    f32 = jnp.float32

    def setup(x_adv):  # boundary()'s interval and width, as arrays (a loop carry)
        _, lo, hi, tol = boundary_path(x0, x_adv, norm, rel_tol)
        return tuple(jnp.asarray(v, f32) for v in (lo, hi, tol))

    def path(x_adv, a):
        return boundary_path(x0, x_adv, norm, rel_tol)[0](a)

    def settle(c):
        phase, pc, xa, lo, hi, tol, i, bis, off = c
        pre_over = (phase == _PRE) & ~pre.going(pc)
        x_found, found = pre.result(pc)
        lo_f, hi_f, tol_f = setup(x_found)
        xa, lo, hi, tol = (jnp.where(pre_over, a, b) for a, b in ((x_found, xa), (lo_f, lo), (hi_f, hi), (tol_f, tol)))
        bis = jnp.where(pre_over, found, bis)
        phase = jnp.where(pre_over, jnp.where(found, _BIS, _END), phase)
        bis_over = (phase == _BIS) & ~((i < max_iter) & (hi - lo > tol))
        return jnp.where(bis_over, _END, phase), pc, xa, lo, hi, tol, i, bis, off

    def body(c):
        phase, pc, xa, lo, hi, tol, i, bis, off = c
        in_pre = phase == _PRE
        mid = 0.5 * (lo + hi)
        adv, off = ask(oracle, off, jnp.where(in_pre, pre.point(pc), path(xa, mid))[None], cls, targeted)
        adv = adv[0]
        pc = jax.tree.map(lambda a, b: jnp.where(in_pre, a, b), pre.update(pc, adv), pc)
        lo, hi, i = (jnp.where(in_pre, old, new) for old, new in
                     ((lo, jnp.where(adv, lo, mid)), (hi, jnp.where(adv, mid, hi)), (i, i + 1)))
        return settle((phase, pc, xa, lo, hi, tol, i, bis, off))

    run_pre, bisect = jnp.asarray(run_pre, bool), jnp.asarray(bisect, bool)
    x_adv = jnp.asarray(x_adv, f32)
    lo, hi, tol = setup(x_adv)
    init = (jnp.where(run_pre, _PRE, jnp.where(bisect, _BIS, _END)).astype(jnp.int32), pre_carry, x_adv, lo, hi,
            tol, jnp.zeros((), jnp.int32), bisect & ~run_pre, jnp.asarray(offset, jnp.int32))
    phase, pc, xa, lo, hi, tol, i, bis, off = live_while(lambda c: c[0] != _END, body, settle(init))
    return jnp.where(bis, jnp.clip(path(xa, hi), 0.0, 1.0), xa), bis, pc, off


def halvings(rel_tol: float) -> int:
    """Bisection iterations that shrink a unit interval below ``rel_tol``."""
    return max(1, math.ceil(math.log2(1.0 / rel_tol)))


# ----------------------------------------------------------------------------- starting points

class Pool(NamedTuple):
    """Training images to start from (``None`` fields when the attack was built without them)."""

    images: Any  # f32[N, H, W, C]
    labels: Any  # i32[N]


def make_pool(ctx) -> Pool:
    if ctx is None or ctx.train_images is None or ctx.train_labels is None:
        return Pool(None, None)
    images = jnp.asarray(ctx.train_images, jnp.float32)
    labels = jnp.asarray(ctx.train_labels, jnp.int32)
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ValueError(f"train_images must be [N, H, W, C] with train_labels [N]; got {images.shape}, "
                         f"{labels.shape}")
    return Pool(images, labels)


def _pick(key, mask, n: int):
    """``n`` distinct indices where ``mask`` holds, in key-random order (valid flags for shortfalls)."""
    score = jnp.where(mask, jax.random.uniform(key, mask.shape), -1.0)
    top, idx = jax.lax.top_k(score, n)
    return idx, top >= 0.0


def candidates(key, x0, cls, targeted: bool, pool: Pool, n: int):
    """Starting candidates ``[n, H, W, C]`` and their validity flags ``bool[n]``."""
    k_pool, k_noise = jax.random.split(key)
    if targeted:
        if pool.images is None:
            raise ValueError("a targeted decision attack needs train_images/train_labels to start from")
        idx, valid = _pick(k_pool, pool.labels == cls, n)
        return pool.images[idx].astype(x0.dtype), valid
    n_noise = n if pool.images is None else (n + 1) // 2
    noise = jax.random.uniform(k_noise, (n_noise,) + x0.shape, x0.dtype)
    if n_noise == n:
        return noise, jnp.ones((n,), bool)
    idx, valid = _pick(k_pool, pool.labels != cls, n - n_noise)
    return (jnp.concatenate([noise, pool.images[idx].astype(x0.dtype)]),
            jnp.concatenate([jnp.ones((n_noise,), bool), valid]))


def search_start(oracle, offset, key, x0, cls, targeted: bool, pool: Pool, n: int, norm: str):
    """One round of the starting-point search (``n`` queries, or none when no candidate is valid).

    Returns ``(found, x_start, any_valid, offset)``: the adversarial candidate closest to ``x0``."""
    cand, valid = candidates(key, x0, cls, targeted, pool, n)

    def query(c):
        _, off = c
        adv, off = ask(oracle, off, cand, cls, targeted)
        return adv & valid, off

    adv, offset = run_if(jnp.any(valid), query, (jnp.zeros((n,), bool), offset))
    d = jnp.where(adv, batch_norm(cand - x0[None], norm), jnp.inf)
    best = jnp.argmin(d)
    return jnp.any(adv), cand[best], jnp.any(valid), offset


class Start(NamedTuple):
    """Outcome of a search step: whether a start was found, and the bookkeeping for failure."""

    found: jax.Array
    failed: jax.Array
    tries: jax.Array
    x: jax.Array


def start_step(oracle, offset, key, x0, cls, tries, cfg, pool: Pool):
    """One search step with the config's ``start_candidates``/``start_steps``: ``(Start, offset)``."""
    found, xs, any_valid, offset = search_start(oracle, offset, key, x0, cls, cfg.targeted, pool,
                                                cfg.start_candidates, cfg.norm)
    tries = tries + 1
    failed = ~found & ((tries >= cfg.start_steps) | ~any_valid)
    return Start(found, failed, tries, jnp.where(found, xs, x0)), offset


def after_boundary(iterating, st, x_b, bisected, distance_of):
    """The fields ``xb, dist_b, x, dist`` after a step's one boundary search (HSJA, GeoDA).

    A step either searched a start (``iterating`` false: ``x_b`` is the start bisected to the boundary,
    or ``x0`` when none was found) or iterated (``x_b`` is the point it moved to, bisected to the
    boundary, when ``bisected``; else the boundary point stays). ``st`` holds the fields before the
    search; ``distance_of(x)`` is a point's distance to ``x0``.
    """
    d_b = distance_of(x_b)
    started = dict(xb=x_b, dist_b=jnp.where(bisected, d_b, jnp.inf), x=jnp.where(bisected, x_b, st.x),
                   dist=jnp.where(bisected, d_b, st.dist))
    xb_next = jnp.where(bisected, x_b, st.xb)
    db_next = distance_of(xb_next)
    x, dist = keep_best(st.x, st.dist, xb_next, db_next, bisected)
    iterated = dict(xb=xb_next, dist_b=db_next, x=x, dist=dist)
    return {k: jnp.where(iterating, iterated[k], started[k]) for k in started}


def is_done(found, dist, eps):
    """The attack's own success: a start was found and the best distance is within ``eps``."""
    if eps is None:
        return jnp.zeros((), bool)
    return found & (dist <= eps)


def keep_best(x_best, d_best, x_new, d_new, ok):
    """The closer of the best point and a new point answered adversarial (``ok``)."""
    better = ok & (d_new < d_best)
    return jnp.where(better, x_new, x_best), jnp.where(better, d_new, d_best)


# ----------------------------------------------------------------------------- ray searches (OPT family)

def ray_point(x0, theta, lam):
    """The point at distance parameter ``lam`` along the unit direction ``theta``, kept in [0, 1]."""
    return jnp.clip(x0 + lam * theta, 0.0, 1.0)


_PROBE, _SCALE, _BISECT, _DONE = 0, 1, 2, 3  # phases of a ray search


class _Ray(NamedTuple):
    """The carry of :func:`ray_search`'s one loop."""

    phase: jax.Array
    k: jax.Array  # scaling queries made
    lam: jax.Array  # the scaled end (last tried)
    prev: jax.Array  # the end before it
    reached: jax.Array  # the scaled end got the wanted answer
    grow: jax.Array  # scaling up (1.01) rather than down (0.99)
    lo: jax.Array
    hi: jax.Array
    ok: jax.Array
    i: jax.Array  # bisection queries made
    offset: jax.Array


def _ray_init(lam0, offset) -> _Ray:
    i32, b, z = jnp.int32, jnp.zeros((), bool), jnp.zeros((), jnp.float32)
    return _Ray(jnp.asarray(_PROBE, i32), jnp.zeros((), i32), lam0, lam0, b, b, z, z, b, jnp.zeros((), i32),
                jnp.asarray(offset, i32))


def _ray_lam(c: _Ray, lam0):
    """The distance parameter the search asks next: ``lam0`` (probe), the scaled end, or the midpoint."""
    factor = jnp.where(c.grow, jnp.asarray(1.01, jnp.float32), jnp.asarray(0.99, jnp.float32))
    return jnp.where(c.phase == _PROBE, lam0, jnp.where(c.phase == _SCALE, c.lam * factor, 0.5 * (c.lo + c.hi)))


def _ray_update(c: _Ray, lam, adv, lam0, tol, max_scale: int, max_bisect: int, expand: bool) -> _Ray:
    """The search after the answer ``adv`` at ``lam`` (:func:`_ray_lam`), moved on to the phase it asks next."""
    probing, scaling = c.phase == _PROBE, c.phase == _SCALE
    b = jnp.zeros((), bool)
    # probe: adversarial -> shrink; else grow (expand) or stop with lo = hi = lam0
    after_probe = c._replace(phase=jnp.where(adv | expand, _SCALE, _DONE), grow=~adv, k=jnp.zeros((), jnp.int32),
                             lam=lam0, prev=lam0, reached=b, lo=lam0, hi=lam0, ok=b)
    after_scale = c._replace(k=c.k + 1, lam=lam, prev=c.lam, reached=adv == c.grow)
    after_bisect = c._replace(i=c.i + 1, lo=jnp.where(adv, c.lo, lam), hi=jnp.where(adv, lam, c.hi))
    c = jax.tree.map(lambda p, s, q: jnp.where(probing, p, jnp.where(scaling, s, q)),
                     after_probe, after_scale, after_bisect)
    # a phase whose loop condition fails moves on (before asking anything): scaling -> bisection -> done
    scale_over = (c.phase == _SCALE) & ~((c.k < max_scale) & ~c.reached)
    lo = jnp.where(c.grow, c.prev, jnp.where(c.reached, c.lam, 0.0))
    hi = jnp.where(c.grow, c.lam, jnp.where(c.reached, c.prev, c.lam))
    ok = jnp.where(c.grow, c.reached, True)
    c = c._replace(lo=jnp.where(scale_over, lo, c.lo), hi=jnp.where(scale_over, hi, c.hi),
                   ok=jnp.where(scale_over, ok, c.ok),
                   phase=jnp.where(scale_over, jnp.where(ok, _BISECT, _DONE), c.phase))
    bisect_over = (c.phase == _BISECT) & ~((c.i < max_bisect) & (c.hi - c.lo > tol))
    return c._replace(phase=jnp.where(bisect_over, _DONE, c.phase))


def ray_search(oracle, offset, x0, theta, lam0, tol, max_scale: int, max_bisect: int, cls, targeted: bool,
               expand: bool):
    """``g(theta)``: the smallest ``lam`` whose ray point is adversarial, searched locally around ``lam0``.

    The fine-grained local search of Cheng et al. (OPT, ICLR 2019, Alg. 2): one query at ``lam0``;
    if adversarial, shrink ``lo = lam0 * 0.99^k`` until it is not (at most ``max_scale`` queries, then
    ``lo = 0``); if not adversarial and ``expand``, grow ``hi = lam0 * 1.01^k`` until it is (at most
    ``max_scale`` queries); then bisect ``[lo, hi]`` to width ``tol`` (at most ``max_bisect``
    queries). With ``expand=False`` a non-adversarial ``lam0`` ends the search at once: the caller
    only needs ``g(theta)`` when it is below ``lam0`` (the line searches). Worst case
    ``1 + max_scale + max_bisect`` queries. Returns ``(g, ok, offset)``; ``ok`` is false when no
    adversarial point was seen (then ``g`` is the last upper end tried).

    The three phases (probe, scaling, bisection) run as one loop that asks one point per iteration:
    a program holds one copy of the model for the whole search instead of three, and under ``vmap``
    images in different phases share an iteration. Each image asks the same points in the same order
    as three loops one after the other would.
    """
    lam0 = jnp.asarray(lam0, jnp.float32)

    def body(c: _Ray) -> _Ray:
        lam = _ray_lam(c, lam0)
        adv, off = ask(oracle, c.offset, ray_point(x0, theta, lam)[None], cls, targeted)
        return _ray_update(c, lam, adv[0], lam0, tol, max_scale, max_bisect, expand)._replace(offset=off)

    c = live_while(lambda c: c.phase != _DONE, body, _ray_init(lam0, offset))
    return c.hi, c.ok, c.offset


def ray_searches(oracle, offset, x0, thetas, lam0, tol, max_scale: int, max_bisect: int, cls, targeted: bool,
                 expand: bool):
    """:func:`ray_search` along each direction of ``thetas: [n, H, W, C]`` at once, in lock-step.

    One loop asks, per iteration, the next point of every search still going, in one oracle call;
    the loop runs as long as the longest search instead of the sum of all. Each search asks the
    points it would ask alone. The points are numbered in the order they are asked: iteration by
    iteration, and within an iteration in direction order (so under a noisy defense the answers are
    drawn otherwise than by searches one after the other; without noise the results are the same).
    Returns ``(g[n], ok[n], offset)``.
    """
    n = thetas.shape[0]
    lam0 = jnp.asarray(lam0, jnp.float32)
    init = jax.vmap(lambda _: _ray_init(lam0, 0))(jnp.arange(n))

    def body(c):
        rays, off = c
        going = rays.phase != _DONE
        lam = jax.vmap(_ray_lam, in_axes=(0, None))(rays, lam0)
        points = jax.vmap(lambda th, lm: ray_point(x0, th, lm))(thetas, lam)
        number = off + jnp.cumsum(going.astype(jnp.int32)) - 1  # the going searches' points, in order
        adv = adversarial(oracle.numbered(number, points, going), cls, targeted)
        new = jax.vmap(_ray_update, in_axes=(0, 0, 0, None, None, None, None, None))(
            rays, lam, adv, lam0, tol, max_scale, max_bisect, expand)
        rays = jax.tree.map(lambda a, b: jnp.where(going.reshape((n,) + (1,) * (a.ndim - 1)), a, b), new, rays)
        return rays, off + jnp.sum(going.astype(jnp.int32))

    rays, offset = live_while(lambda c: jnp.any(c[0].phase != _DONE), body, (init, jnp.asarray(offset, jnp.int32)))
    return rays.hi, rays.ok, offset


class LineSearch(NamedTuple):
    theta: jax.Array  # best direction found
    g: jax.Array  # its g value
    alpha: jax.Array  # step size after the search
    offset: jax.Array


_GROW, _SHRINK, _STOP = 0, 1, 2  # phases of a line search


def opt_line_search(oracle, offset, x0, theta, g, grad, alpha, tol, cls, targeted: bool, max_trials: int,
                    max_scale: int, max_bisect: int, allowance):
    """The step-size search of OPT / Sign-OPT (Cheng et al. 2019, 2020; reference implementation).

    Grow: ``theta' = unit(theta - alpha grad)``, accept while ``g(theta')`` improves, doubling
    ``alpha`` after every trial. If the first trial already failed, shrink: ``alpha <- alpha / 4``
    until ``g(theta')`` beats ``g`` (at most ``max_trials`` trials each). A trial runs only while the
    step's ``allowance`` (an absolute offset) can still pay its worst case, so the caller's
    declared cost holds. Returns the best (theta, g) (the inputs when nothing improved) and alpha.

    Both phases run as one loop of trials (one :func:`ray_search` in the program, so one copy of the
    model); each image makes the same trials in the same order as two loops one after the other.
    """
    trial_worst = 1 + max_scale + max_bisect
    g = jnp.asarray(g, jnp.float32)

    def settle(c):
        phase, k, a, th_best, g_best, flag, off = c
        room = off + trial_worst <= allowance
        grow_over = (phase == _GROW) & ~((k < max_trials) & flag & room)
        improved = g_best < g
        phase = jnp.where(grow_over, jnp.where(improved, _STOP, _SHRINK), phase)
        k = jnp.where(grow_over, 0, k)
        flag = jnp.where(grow_over, False, flag)
        shrink_over = (phase == _SHRINK) & ~((k < max_trials) & ~flag & room)
        return jnp.where(shrink_over, _STOP, phase), k, a, th_best, g_best, flag, off

    def body(c):
        phase, k, a, th_best, g_best, _, off = c
        growing = phase == _GROW
        a_trial = jnp.where(growing, a, 0.25 * a)
        g_ref = jnp.where(growing, g_best, g)
        th = unit(theta - a_trial * grad)
        g_new, ok, off = ray_search(oracle, off, x0, th, g_ref, tol, max_scale, max_bisect, cls, targeted, False)
        g_new = jnp.where(ok, g_new, jnp.inf)
        better = g_new < g_ref
        a = jnp.where(growing, 2.0 * a_trial, a_trial)
        return settle((phase, k + 1, a, jnp.where(better, th, th_best), jnp.where(better, g_new, g_best), better,
                       off))

    init = settle((jnp.asarray(_GROW, jnp.int32), jnp.zeros((), jnp.int32), jnp.asarray(alpha, jnp.float32), theta,
                   g, jnp.ones((), bool), jnp.asarray(offset, jnp.int32)))
    _, _, alpha, th_best, g_best, _, offset = live_while(lambda c: c[0] != _STOP, body, init)
    return LineSearch(th_best, g_best, alpha, offset)


class RayState(NamedTuple):
    """State of the OPT family (OPT, Sign-OPT)."""
    x: jax.Array  # best adversarial point
    x0: jax.Array
    cls: jax.Array
    key: jax.Array
    step: jax.Array
    done: jax.Array
    failed: jax.Array
    found: jax.Array
    tries: jax.Array
    dist: jax.Array  # l2 distance of x
    theta: jax.Array  # unit search direction
    g: jax.Array  # g(theta)
    alpha: jax.Array
    beta: jax.Array


class RayInfo(NamedTuple):
    loss: jax.Array  # distance of the best point
    queries: jax.Array
    g: jax.Array  # g(theta) after the step


def start_ray(oracle, offset, key, st, cfg, pool, tol):
    """Start of the OPT family: find a start, bisect along its ray: ``(start, theta, g, offset)``."""
    s, offset = start_step(oracle, offset, key, st.x0, st.cls, st.tries, cfg, pool)
    lam_s = distance(s.x, st.x0, "l2")
    theta = unit(s.x - st.x0)
    point = lambda lam: ray_point(st.x0, theta, lam)
    n_bisect = halvings(tol / 8.0) + 3  # enough for distances up to 8 (the l2 diameter of an 8x8 image)
    _, g, offset = run_if(s.found, lambda c: bisect(oracle, c[2], point, c[0], c[1], tol, n_bisect, st.cls,
                                                     cfg.targeted), (jnp.zeros(()), lam_s, offset))
    return s, theta, g, offset


def ray_attack(cfg, pool, estimate, estimate_cost: int, tolerance=None):
    """The OPT family's attack around a direction estimate (OPT: finite differences; Sign-OPT: signs).

    A step either searches a start (``start_ray``) or iterates: ``estimate(oracle, offset, key, x0,
    theta, g, beta, tol, cls) -> (direction, offset, g_probe, theta_probe)`` with at most
    ``estimate_cost`` queries, then ``opt_line_search`` along ``-direction`` (``ls_queries``
    allowance); the best probe (``g_probe < inf``) replaces the line-search result when it is
    better, and ``alpha < 1e-4`` resets ``alpha`` to 1 and shrinks ``beta`` tenfold (floored at
    ``min_beta``). ``tolerance(beta, g)`` is the width of the step's local searches (default: the
    reference's ``beta / 500``, floored at ``cfg.min_tol``). ``cfg`` needs ``targeted, eps, alpha,
    beta, min_tol, min_beta, start_tol, start_candidates, start_steps, max_trials, max_scale,
    max_bisect, ls_queries``.
    """
    targeted = cfg.targeted
    n_start = halvings(cfg.start_tol / 8.0) + 3
    if tolerance is None:
        tolerance = lambda beta, g: jnp.maximum(beta / 500.0, cfg.min_tol)

    def init(key, x0, label, target):
        x0 = jnp.asarray(x0, jnp.float32)
        cls = jnp.asarray(target if targeted else label, jnp.int32)
        z, f, inf = jnp.zeros((), jnp.int32), jnp.zeros((), bool), jnp.asarray(jnp.inf, jnp.float32)
        return RayState(x0, x0, cls, key, z, f, f, f, z, inf, jnp.zeros_like(x0), inf,
                        jnp.asarray(cfg.alpha, jnp.float32), jnp.asarray(cfg.beta, jnp.float32))

    def step(pool, state: RayState, oracle):
        k_start, k_u = jax.random.split(jax.random.fold_in(state.key, state.step))
        x0, cls = state.x0, state.cls

        def search(c):
            st, off = c
            s, theta, g, off = start_ray(oracle, off, k_start, st, cfg, pool, cfg.start_tol)
            x = ray_point(x0, theta, g)
            d = distance(x, x0, "l2")
            st = st._replace(found=s.found, failed=s.failed, tries=s.tries,
                             theta=jnp.where(s.found, theta, st.theta), g=jnp.where(s.found, g, st.g),
                             x=jnp.where(s.found, x, st.x), dist=jnp.where(s.found, d, st.dist))
            return st, off

        def iterate(c):
            st, off = c
            theta, g, beta = st.theta, st.g, st.beta
            tol = tolerance(beta, g)
            direction, off, g_probe, th_probe = estimate(oracle, off, k_u, x0, theta, g, beta, tol, cls)
            ls = opt_line_search(oracle, off, x0, theta, g, direction, st.alpha, tol, cls, targeted, cfg.max_trials,
                                 cfg.max_scale, cfg.max_bisect, off + cfg.ls_queries)
            use_probe = g_probe < ls.g
            theta_n = jnp.where(use_probe, th_probe, ls.theta)
            g_n = jnp.where(use_probe, g_probe, ls.g)
            reset = ls.alpha < 1e-4
            x_new = ray_point(x0, theta_n, g_n)
            x, dist = keep_best(st.x, st.dist, x_new, distance(x_new, x0, "l2"), g_n < g)
            st = st._replace(theta=theta_n, g=g_n, alpha=jnp.where(reset, 1.0, ls.alpha),
                             beta=jnp.where(reset, jnp.maximum(0.1 * beta, cfg.min_beta), beta), x=x, dist=dist)
            return st, ls.offset

        zero = jnp.zeros((), jnp.int32)
        st, off = run_if(~state.found, search, (state, zero))
        st, off = run_if(state.found, iterate, (st, off))
        st = st._replace(step=state.step + 1, done=is_done(st.found, st.dist, cfg.eps))
        return st, RayInfo(loss=st.dist, queries=off, g=st.g)

    cost = max(cfg.start_candidates + n_start, estimate_cost + cfg.ls_queries)
    return Attack(init=init, step=Partial(step, pool), cost=cost, output="label", targeted=targeted)
