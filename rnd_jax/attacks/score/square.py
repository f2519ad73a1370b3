"""Square attack: random search with square-shaped updates, l_inf and l_2.

Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box adversarial
attack via random search", ECCV 2020 (arXiv:1912.00049). Algorithm 1 (random search), Algorithm 2
(the l_inf proposal) and Algorithm 3 (the l_2 proposal).

The attack keeps the best point ``x`` and its loss ``L`` (untargeted: the margin
``log F_y - max_{j!=y} log F_j``; targeted: the cross-entropy ``-log F_t``, as in the paper). Each
step proposes ONE candidate and asks the oracle about it; the candidate replaces ``x`` iff its loss
is lower. So a step costs exactly one query and ``done`` is the verdict of the answer that
accepted ``x`` -- the attack never re-asks about a point it has an answer for. (The paper's
algorithm spends one query per iteration too; it is inherently a 1-point-per-oracle-call attack,
and only batching across images fills the device.)

Proposals. At iteration ``i`` (the first step asks about the initial point, iteration 0 is the
second step) the square side is ``s = round(sqrt(p_i * n / c))`` for ``n = h*w*c`` with the
piecewise-constant schedule :func:`p_schedule`: ``p_init`` halved at iterations 10, 50, 200, 500,
1000, 2000, 4000, 6000 and 8000 of a run rescaled to 10 000 iterations, stretched over ``n_iters``
iterations. As in the reference implementation, ``n_iters`` is the run's query budget: with
``n_iters=None`` (the default) it is the budget of the run the step belongs to (``oracle.budget``,
which under :func:`~rnd_jax.attacks.adaptive.eot` is already divided by the repeats), and the
iteration is the number of queries spent before the step minus one (``oracle.spent - 1``; in a
plain run that is ``step - 1``), so the schedule reaches its last, smallest window as the budget
runs out whatever the budget. An explicit ``n_iters`` stretches the schedule over that many
iterations instead. Past ``n_iters`` the window stays at its smallest size (the reference returns
to ``p_init`` there, which it never reaches with ``n_iters`` = the budget; a window that jumps back
to its initial size late in a run would undo the schedule). An oracle bound outside the driver has
no budget: then the iteration is ``step - 1`` and ``n_iters`` defaults to
:data:`DEFAULT_N_ITERS` (the paper's 10 000).

- ``square_linf``: start from vertical stripes ``x0 + eps * (+-1 per column and channel)``; a
  proposal sets a random ``s x s`` window (``1 <= s <= min(h, w) - 1``) to ``x0 + eps * (+-1 per
  channel)``, re-drawing the signs while the window would not change (up to 8 sign draws per
  window, then the window itself is re-drawn).
- ``square_l2``: start from a grid of ``h//5``-sized tiles of the paper's pseudo-Gaussian pattern
  ``eta`` (random sign and orientation per tile), scaled to norm ``eps``; a proposal
  (``s >= 3``, odd) moves the mass of a random window ``W2`` into a random window ``W1``, adds a
  fresh ``+-eta`` there, rescales to use the whole budget and renormalises to ``||delta|| = eps``.

Every candidate is clipped to [0, 1] and lies in the eps-ball.

Distinct queries. Nothing in the paper's random search prevents proposing a point that was already
asked about (after a rejection the same window and sign can be drawn again, and small images have
few windows). Such a query would only repeat a known answer, so the proposal is re-drawn when it
equals the current point or any of the last ``memory`` queried points (compared through two
exact integer hashes of the float bits); after half of ``max_tries`` draws the window size is also
drawn at random. Only if every draw fails is a repeated point sent.

Defaults. The paper's standard ``p_init`` is 0.05 (l_inf) and 0.1 (l_2) with ``n_iters`` = the
query budget (10 000 in its tables); ``p`` is a fraction of the image, so it needs no rescaling,
but the window sides are small integers on 8x8 digits. Window positions are uniform over all ``(h - s + 1)^2`` placements (the reference
code draws from ``h - s`` of them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnd_jax import compact, losses
from rnd_jax import oracle as _oracle
from rnd_jax.attacks.driver import Attack
from rnd_jax.attacks.registry import BATTERY_EPS, AttackSpec, register
from rnd_jax.attacks.score.nes import is_adversarial

SIGN_DRAWS = 8  # l_inf: sign vectors drawn at once for one window (the paper re-draws until one changes it)

# Iterations (of a run rescaled to 10 000) after which p is halved again (the paper's schedule).
P_SCHEDULE_STEPS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
DEFAULT_N_ITERS = 10_000  # schedule length when neither the config nor the oracle gives one


def p_schedule(p_init, it, n_iters: int):
    """The paper's fraction ``p`` of pixels changed at iteration ``it`` (0-based) of ``n_iters``.

    ``it`` (traced or not) is rescaled to a 10 000-iteration run, ``t = floor(it * 10 000 /
    n_iters)``; ``p = p_init / 2^k`` where ``k`` counts the schedule points ``t`` has passed.
    ``n_iters`` is a static int: the rescaled breakpoints are exact integer thresholds on ``it``
    (no overflow for any budget). Past ``n_iters`` ``p`` stays at its last value ``p_init / 512``
    (module docstring).
    """
    if isinstance(n_iters, bool) or not isinstance(n_iters, (int, np.integer)) or n_iters < 1:
        raise ValueError(f"Square n_iters must be an int >= 1, got {n_iters!r}")
    n_iters = int(n_iters)
    # floor(it * 10_000 / n_iters) > b  <=>  it >= ceil((b + 1) * n_iters / 10_000)
    thresholds = jnp.asarray([-(-(b + 1) * n_iters // 10_000) for b in P_SCHEDULE_STEPS], jnp.int32)
    k = jnp.sum(jnp.asarray(it, jnp.int32) >= thresholds)
    return jnp.asarray(p_init, jnp.float32) / (2.0 ** k.astype(jnp.float32))


def schedule_position(oracle, step, n_iters: int | None):
    """(iteration, schedule length) of a step: see the module docstring.

    With a budget on the oracle (bound by the driver) the iteration is ``oracle.spent - 1`` and the
    default length the budget; without one, ``step - 1`` and :data:`DEFAULT_N_ITERS`.
    """
    budget = getattr(oracle, "budget", None)
    if budget is None:
        it = step - 1
        length = DEFAULT_N_ITERS
    else:
        it = jnp.asarray(oracle.spent, jnp.int32) - 1
        length = int(budget)
    return it, (n_iters if n_iters is not None else max(1, length))


def _check_common(cfg, want_norm: str):
    name = type(cfg).__name__
    if cfg.norm != want_norm:
        raise ValueError(f"{name} is the {want_norm} Square attack; got norm {cfg.norm!r}")
    for f in ("eps", "p_init"):
        v = getattr(cfg, f)
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
            raise ValueError(f"Square {f} must be a finite number > 0, got {v!r}")
    if cfg.p_init > 1:
        raise ValueError(f"Square p_init is a fraction of the image, must be <= 1, got {cfg.p_init!r}")
    for f in ("n_iters", "memory", "max_tries"):
        v = getattr(cfg, f)
        if v is None and f == "n_iters":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"Square {f} must be an int >= 1{' or None' if f == 'n_iters' else ''}, got {v!r}")
    if not isinstance(cfg.targeted, bool):
        raise ValueError(f"Square targeted must be a bool, got {cfg.targeted!r}")


@dataclasses.dataclass(frozen=True)
class SquareLinfConfig:
    """l_inf Square attack (Algorithm 2)."""

    eps: float = 0.3
    norm: str = "linf"
    targeted: bool = True
    p_init: float = 0.05  # initial fraction of pixels in the square
    n_iters: int | None = None  # iterations the p-schedule is stretched over; None: the run's budget
    memory: int = 1024  # last queried points a proposal must differ from
    max_tries: int = 64  # proposal re-draws per step

    def __post_init__(self):
        _check_common(self, "linf")


@dataclasses.dataclass(frozen=True)
class SquareL2Config:
    """l_2 Square attack (Algorithm 3)."""

    eps: float = 2.0
    norm: str = "l2"
    targeted: bool = True
    p_init: float = 0.1
    n_iters: int | None = None  # None: the run's budget
    memory: int = 1024
    max_tries: int = 64

    def __post_init__(self):
        _check_common(self, "l2")


class SquareState(NamedTuple):
    x: jax.Array  # best point so far f32[H, W, C] (x0 before the first step)
    x0: jax.Array
    loss: jax.Array  # f32: loss of x from the answer that accepted it (+inf before the first step)
    cls: jax.Array  # i32: target class if targeted, else true label
    key: jax.Array
    step: jax.Array  # i32
    done: jax.Array  # bool: the answer that accepted x was adversarial
    seen: jax.Array  # u32[memory, 2]: hashes of the last queried points (ring buffer)
    n_seen: jax.Array  # i32: points queried so far


class SquareInfo(NamedTuple):
    loss: jax.Array  # best loss after the step
    size: jax.Array  # i32: side of the square proposed this step
    tries: jax.Array  # i32: proposals drawn this step (1 unless re-drawn)
    p: jax.Array  # f32: the schedule's fraction p at this step (p_init at the first step)


# --------------------------------------------------------------------------------------------- hashing
def point_hash(x):
    """Two order-independent integer hashes ``u32[2]`` of the exact float32 bits of ``x``.

    ``sum_i bits_i * m_i (mod 2^32)`` with odd multipliers: points that differ in one coordinate
    always hash differently, and sums of integers do not depend on the reduction order.
    """
    bits = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32).reshape(-1)
    i = jnp.arange(bits.shape[0], dtype=jnp.uint32)
    m1 = (i * jnp.uint32(2654435761) + jnp.uint32(0x9E3779B9)) | jnp.uint32(1)
    m2 = (i * jnp.uint32(2246822519) + jnp.uint32(0x85EBCA6B)) | jnp.uint32(1)
    rot = (bits << 13) | (bits >> 19)
    return jnp.stack([jnp.sum(bits * m1, dtype=jnp.uint32), jnp.sum(rot * m2, dtype=jnp.uint32)])


def _was_seen(h, seen, n_seen):
    valid = jnp.arange(seen.shape[0]) < n_seen
    return jnp.any(valid & jnp.all(seen == h, axis=-1))


# ----------------------------------------------------------------------------------- l2 patterns
def _inv_sq_cumsum(n: int, xp=jnp):
    """``S[k] = sum_{m=1..k} 1/m^2`` for ``k = 0..n``."""
    return xp.concatenate([xp.zeros((1,)), xp.cumsum(1.0 / xp.arange(1, n + 1, dtype=xp.float32) ** 2)])


def _rectangle(a, b, rows, cols, table, xp=jnp):
    """The paper's pseudo-Gaussian bump on a ``rows x cols`` rectangle at offsets ``(a, b)``.

    Concentric rectangles around the centre ``(rows//2, cols//2)``: the value at Chebyshev distance
    ``r`` from the centre is ``sum_{m=r+1..N} 1/m^2`` with ``N = max(rows//2, cols//2) + 1``; zero
    outside the rectangle.
    """
    inside = (a >= 0) & (a < rows) & (b >= 0) & (b < cols)
    r = xp.maximum(xp.abs(a - rows // 2), xp.abs(b - cols // 2))
    n = xp.maximum(rows // 2, cols // 2) + 1
    v = table[xp.clip(n, 0, table.shape[0] - 1)] - table[xp.clip(r, 0, table.shape[0] - 1)]
    return xp.where(inside, v, 0.0)


def _unit(v, xp=jnp):
    n = xp.sqrt(xp.sum(v * v))
    return xp.where(n > 0, v / xp.where(n > 0, n, 1.0), 0.0)


def meta_pattern(a, b, s, transpose, table, xp=jnp):
    """The l_2 update ``eta`` of side ``s`` at window offsets ``(a, b)`` (a grid covering the window).

    Two stacked bumps of opposite sign (rows ``[0, s//2)`` positive, ``[s//2, s)`` negative), each
    of unit norm, the whole of unit norm, optionally transposed. ``xp=numpy`` evaluates it for a
    static size (the initialisation), ``jnp`` for a traced one (the proposals).
    """
    a, b = xp.where(transpose, b, a), xp.where(transpose, a, b)
    top = _unit(_rectangle(a, b, s // 2, s, table, xp), xp)
    bottom = _unit(_rectangle(a - s // 2, b, s - s // 2, s, table, xp), xp)
    return _unit(top - bottom, xp)


def _grid(h, w, xp=jnp):
    return xp.arange(h)[:, None], xp.arange(w)[None, :]


def l2_init(key, x0, eps: float):
    """Tiles of side ``max(1, h//5)`` with random-sign, random-orientation patterns; norm ``eps``.

    The tiling and the pattern depend only on the (static) image shape and are computed once with
    numpy; the random part is one sign per tile and channel and one orientation per tile.
    """
    h, w, c = x0.shape
    t = max(1, h // 5)
    off = (h - 5 * t) // 2
    nt_h, nt_w = max(1, h // t), max(1, w // t)
    table = _inv_sq_cumsum(t + 2, np)
    ta, tb = _grid(t, t, np)
    pat = np.stack([meta_pattern(ta, tb, t, False, table, np), meta_pattern(ta, tb, t, True, table, np)])
    ri, rj = np.broadcast_to(np.arange(h)[:, None] - off, (h, w)), np.broadcast_to(np.arange(w)[None] - off, (h, w))
    ti, tj = ri // t, rj // t
    valid = (ri >= 0) & (rj >= 0) & (ti < nt_h) & (tj < nt_w)
    tile = np.where(valid, np.clip(ti, 0, nt_h - 1) * nt_w + np.clip(tj, 0, nt_w - 1), 0)  # [h, w]
    plain, turned = (np.where(valid, pat[o, ri % t, rj % t], 0.0).astype(np.float32) for o in (0, 1))
    u = jax.random.uniform(key, (nt_h * nt_w, c + 1))
    val = jnp.where(u[tile, 0] < 0.5, turned, plain)  # [h, w]
    delta = val[..., None] * _signs(u[tile, 1:])
    delta = _unit(delta) * eps
    return jnp.clip(x0 + delta, 0.0, 1.0)


# --------------------------------------------------------------------------------------- proposals
def _window(u_r, u_c, h, w, s):
    """The ``s x s`` window at a uniformly random position (from uniforms ``u_r, u_c`` in [0, 1))."""
    r = jnp.minimum((u_r * (h - s + 1)).astype(jnp.int32), h - s)
    c = jnp.minimum((u_c * (w - s + 1)).astype(jnp.int32), w - s)
    i, j = _grid(h, w)
    return r, c, (i >= r) & (i < r + s) & (j >= c) & (j < c + s)


def _signs(u):
    return jnp.where(u < 0.5, -1.0, 1.0)


def linf_proposal(u_pos, u_signs, x, x0, eps: float, s):
    """Set an ``s x s`` window of ``x`` to ``x0 + eps * sign`` (one sign per channel).

    ``u_pos: [2]`` uniforms place the window. As in the paper, the signs are re-drawn while the
    window would not change: ``u_signs: [SIGN_DRAWS, C]`` uniforms give that many sign vectors and
    the first one that changes the window is used (the first one if none does).
    """
    h, w, c = x.shape
    _, _, mask = _window(u_pos[0], u_pos[1], h, w, s)
    m = mask[..., None]
    up, down = jnp.clip(x0 + eps, 0.0, 1.0), jnp.clip(x0 - eps, 0.0, 1.0)
    changes_up = jnp.any(m & (up != x), axis=(0, 1))  # [C]: would +eps change channel c of the window?
    changes_down = jnp.any(m & (down != x), axis=(0, 1))
    signs = _signs(u_signs)  # [SIGN_DRAWS, C]
    changes = jnp.any(jnp.where(signs > 0, changes_up, changes_down), axis=1)
    sign = signs[jnp.argmax(changes)]
    return jnp.where(m, jnp.where(sign > 0, up, down), x)


def l2_proposal(u, u_sign, x, x0, eps: float, s, table):
    """Algorithm 3: move the mass of window ``W2`` into ``W1`` with a fresh pattern; ``||delta|| = eps``.

    ``u: [5]`` uniforms place ``W1``, ``W2`` and pick the orientation; ``u_sign: [C]`` the signs.
    """
    h, w, c = x.shape
    r1, c1, m1 = _window(u[0], u[1], h, w, s)
    _, _, m2 = _window(u[2], u[3], h, w, s)
    delta = x - x0
    m1c, m12c = m1[..., None], (m1 | m2)[..., None]
    norm_w1 = jnp.sqrt(jnp.sum(jnp.where(m1c, delta, 0.0) ** 2, axis=(0, 1)))  # per channel
    norm_img = jnp.sqrt(jnp.sum(delta * delta))
    norm_w12 = jnp.sqrt(jnp.sum(jnp.where(m12c, delta, 0.0) ** 2, axis=(0, 1)))
    i, j = _grid(h, w)
    eta = meta_pattern(i - r1, j - c1, s, u[4] < 0.5, table)  # [h, w], zero outside W1
    new = eta[..., None] * _signs(u_sign) + jnp.where(m1c, delta, 0.0) / (1e-10 + norm_w1)
    new_norm = jnp.sqrt(jnp.sum(jnp.where(m1c, new, 0.0) ** 2, axis=(0, 1)))
    budget = jnp.sqrt(jnp.maximum(eps ** 2 - norm_img ** 2, 0.0) / c + norm_w12 ** 2)
    new = new / jnp.maximum(new_norm, 1e-12) * budget
    delta = jnp.where(m2[..., None], 0.0, delta)
    delta = jnp.where(m1c, new, delta)
    delta = delta / jnp.maximum(jnp.sqrt(jnp.sum(delta * delta)), 1e-12) * eps
    return jnp.clip(x0 + delta, 0.0, 1.0)


def side_range(h: int, w: int, norm: str) -> tuple[int, int]:
    """Smallest and largest window side: ``[1, min(h, w) - 1]``; l_2 sides are odd and >= 3."""
    hi = max(1, min(h, w) - 1)
    if norm == "linf":
        return 1, hi
    hi = hi if hi % 2 == 1 else max(1, hi - 1)
    return min(3, hi), hi


def side(p, h: int, w: int, c: int, norm: str):
    """Window side for fraction ``p``: ``round(sqrt(p*n/c))`` within :func:`side_range`."""
    s = jnp.round(jnp.sqrt(p * (h * w * c) / c)).astype(jnp.int32)
    lo, hi = side_range(h, w, norm)
    if norm == "l2":
        s = jnp.where(s % 2 == 0, s + 1, s)
    return jnp.clip(s, lo, hi)


TRY_CHUNK = 8  # proposals drawn together after a first one that repeats a point (tries 1.., chunk by chunk)


def draw_proposal(cfg, state: SquareState, k, p, t):
    """Proposal ``t`` (0-based try) of a step: ``(candidate, window side)``; a function of ``(k, t)`` only.

    Tries ``t >= max_tries // 2`` draw the window side at random instead of the schedule's.
    """
    linf = cfg.norm == "linf"
    h, w, c = state.x.shape
    s_sched = side(p, h, w, c, cfg.norm)
    s_lo, s_hi = side_range(h, w, cfg.norm)
    u = jax.random.uniform(jax.random.fold_in(k, t), (6 + SIGN_DRAWS * c,))
    rand_s = s_lo + jnp.minimum((u[0] * (s_hi - s_lo + 1)).astype(jnp.int32), s_hi - s_lo)
    if not linf:
        rand_s = jnp.where(rand_s % 2 == 0, rand_s - 1, rand_s)
    s = jnp.where(t < cfg.max_tries // 2, s_sched, rand_s)
    if linf:
        cand = linf_proposal(u[1:3], u[6:].reshape(SIGN_DRAWS, c), state.x, state.x0, cfg.eps, s)
    else:
        cand = l2_proposal(u[1:6], u[6:6 + c], state.x, state.x0, cfg.eps, s, _inv_sq_cumsum(max(h, w) + 2))
    return cand, s


def repeats(state: SquareState, cand):
    """Whether ``cand`` would repeat a known answer: it is the current point or one of the remembered ones."""
    return jnp.all(cand == state.x) | _was_seen(point_hash(cand), state.seen, state.n_seen)


def draw_distinct(cfg, state: SquareState, k, p):
    """The first of the tries ``t = 0, 1, ..., max_tries - 1`` that does not repeat a point (module docstring).

    Returns ``(candidate, side, tries)``; if every try repeats one, the last try's candidate. Try 0 is
    drawn alone (usually it is new); the others :data:`TRY_CHUNK` at a time, vectorised, so a step whose
    proposals keep repeating (one-pixel windows late in a run) costs a few loop iterations, not one per
    try (l_inf; l_2 proposals one at a time). The result is the same as drawing the tries one by one: each
    is a function of ``(k, t)`` alone. Inside a driver loop under ``vmap`` the l_inf tries are drawn for
    the live images only (:func:`rnd_jax.compact.on_live`: their draws are integer and elementwise work,
    the same bits in a batch of any size); an image whose step is discarded draws try 0 only.
    """
    if cfg.norm == "linf":
        return compact.on_live(lambda live, st, k_, p_: _first_fresh(cfg, live, st, k_, p_), state, k, p)
    return _first_fresh(cfg, _oracle.live(), state, k, p)


def _first_fresh(cfg, live, state: SquareState, k, p):
    """The loop of :func:`draw_distinct`: ``(candidate, side, tries)`` of the first try that repeats no point.

    ``live`` (``None``: true): whether the image's step is really taken; if not, the loop ends at once.
    """
    zero = jnp.zeros((), jnp.int32)
    cand0, s0 = draw_proposal(cfg, state, k, p, zero)
    if cfg.max_tries == 1:
        return cand0, s0, jnp.ones((), jnp.int32)
    # l_2 proposals sum over the window: drawn several at once (vmapped) their float sums may round
    # differently, so they keep one try per iteration (they rarely repeat: their values are continuous)
    width = min(TRY_CHUNK if cfg.norm == "linf" else 1, cfg.max_tries - 1)
    last = jnp.int32(cfg.max_tries - 1)

    def cond(c):
        start, found = c[0], c[1]
        return ~found & (start <= last)

    def body(c):
        start = c[0]
        ts = start + jnp.arange(width, dtype=jnp.int32)
        ts_in = jnp.minimum(ts, last)
        if width == 1:
            cand, side_ = draw_proposal(cfg, state, k, p, ts_in[0])
            cands, sides, fresh = cand[None], side_[None], ~repeats(state, cand)[None]
        else:
            cands, sides = jax.vmap(lambda t: draw_proposal(cfg, state, k, p, t))(ts_in)
            fresh = ~jax.vmap(lambda x: repeats(state, x))(cands)
        fresh = fresh & (ts <= last)
        j = jnp.where(jnp.any(fresh), jnp.argmax(fresh), jnp.argmax(ts_in))  # first fresh, else the last try
        return start + width, jnp.any(fresh) | (start + width > last), cands[j], sides[j], ts_in[j]

    found = ~repeats(state, cand0)
    if live is not None:
        found = found | ~jnp.asarray(live, bool)
    _, _, cand, s, t = jax.lax.while_loop(cond, body, (jnp.ones((), jnp.int32), found, cand0, s0, zero))
    return cand, s, t + 1


def square(cfg) -> Attack:
    """Build the Square attack (l_inf for :class:`SquareLinfConfig`, l_2 for :class:`SquareL2Config`)."""
    loss_fn = losses.targeted_xent if cfg.targeted else losses.margin
    linf = cfg.norm == "linf"

    def init(key, x0, label, target):
        x0 = jnp.asarray(x0, jnp.float32)
        cls = jnp.asarray(target if cfg.targeted else label, jnp.int32)
        return SquareState(x0, x0, jnp.asarray(jnp.inf, jnp.float32), cls, key, jnp.zeros((), jnp.int32),
                           jnp.zeros((), bool), jnp.zeros((cfg.memory, 2), jnp.uint32), jnp.zeros((), jnp.int32))

    def first_point(k, x0):
        if linf:
            h, w, c = x0.shape
            stripes = jax.random.rademacher(k, (1, w, c), jnp.float32)
            return jnp.clip(x0 + cfg.eps * stripes, 0.0, 1.0)
        return l2_init(k, x0, cfg.eps)

    def propose(state: SquareState, k, p):
        return draw_distinct(cfg, state, k, p)

    def step(state: SquareState, oracle):
        k = jax.random.fold_in(state.key, state.step)
        first = state.step == 0
        it, n_iters = schedule_position(oracle, state.step, cfg.n_iters)
        p = p_schedule(cfg.p_init, jnp.maximum(it, 0), n_iters)
        cand, s, tries = jax.lax.cond(
            first, lambda: (first_point(k, state.x0), jnp.zeros((), jnp.int32), jnp.ones((), jnp.int32)),
            lambda: propose(state, k, p))
        probs = oracle(cand[None])[0]
        loss = loss_fn(probs, state.cls)
        accept = first | (loss < state.loss)
        adv = is_adversarial(probs, state.cls, cfg.targeted)
        seen = state.seen.at[state.n_seen % cfg.memory].set(point_hash(cand))
        new = SquareState(
            x=jnp.where(accept, cand, state.x), x0=state.x0, loss=jnp.where(accept, loss, state.loss),
            cls=state.cls, key=state.key, step=state.step + 1, done=jnp.where(accept, adv, state.done),
            seen=seen, n_seen=state.n_seen + 1)
        return new, SquareInfo(loss=new.loss, size=s, tries=tries, p=p)

    return Attack(init=init, step=step, cost=1, output="scores", targeted=cfg.targeted)


register(AttackSpec(
    name="square_linf", config=SquareLinfConfig, build=lambda cfg, ctx: square(cfg), family="score",
    battery=dict(norm="linf", eps=BATTERY_EPS["linf"], budget=1_000),
    bad_configs=(dict(norm="l2"), dict(p_init=0.0), dict(p_init=1.5), dict(eps=-0.1), dict(n_iters=0),
                 dict(memory=0), dict(max_tries=0))))

register(AttackSpec(
    name="square_l2", config=SquareL2Config, build=lambda cfg, ctx: square(cfg), family="score",
    battery=dict(norm="l2", eps=BATTERY_EPS["l2"], budget=1_000),
    bad_configs=(dict(norm="linf"), dict(p_init=-0.1), dict(eps=float("inf")), dict(n_iters=1.5),
                 dict(memory=-1), dict(max_tries=0))))
