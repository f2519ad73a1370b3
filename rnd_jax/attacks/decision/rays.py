"""RayS: hierarchical search over sign directions for the l_inf boundary distance.

Chen & Gu, "RayS: A Ray Searching Method for Hard-label Adversarial Attack", KDD 2020
(arXiv:2006.12792), Alg. 2-3.

The attack searches ray directions ``d in {-1, +1}^D`` (``D = H*W*C``) for the one whose ray from
``x0`` meets the decision boundary closest: ``g(d) = min {r : clip(x0 + r d/||d||_2) adversarial}``,
so the l_inf distance of the point is at most ``g(d)/sqrt(D)``. Hierarchically (their Alg. 3):
at level ``s`` the coordinates are cut into ``2^s`` consecutive blocks; block by block, the signs
of the current best direction are flipped in the block and the result is tried. The *fast check*
asks one point, at the current best radius: if it is not adversarial, the flipped direction
cannot be better and is dropped with that single query; otherwise a bisection on ``[0, r_best]``
down to width ``tol`` finds its radius, and it becomes the best direction. Levels go on down to
single coordinates, then cycle through them.

One step here is one block: ``1 + (bisection)`` queries, the bisection at most ``max_bisect``
halvings. The first direction tried is ``-1`` everywhere (the reference flips the whole of the
initial ``+1`` direction at level 0), and until a first adversarial direction is known the radius
is ``sqrt(D)`` (the corner of the image box, ``||.||_inf = 1``). If none of the blocks of the first
``start_levels`` levels gives an adversarial direction (``2^start_levels - 1`` queries), the image is
marked ``failed``.

Defaults: the reference's ``tol = 1e-3`` (in units of the unit-l2 direction, as there). RayS is
untargeted in the paper and here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnd_jax.attacks.decision import _common as C
from rnd_jax.attacks.driver import Attack
from rnd_jax.attacks.registry import BATTERY_EPS, AttackSpec, register


@dataclasses.dataclass(frozen=True)
class RaySConfig:
    eps: float | None = None  # stop once the best adversarial point is within eps (l_inf); None: run to budget
    norm: str = "linf"  # RayS is an l_inf attack
    targeted: bool = False  # untargeted only
    tol: float = 1e-3  # bisection width (radius along the unit-l2 direction)
    max_bisect: int = 25  # halvings per block (needs log2(sqrt(D)/tol): 13 at D = 64)
    start_levels: int = 6  # levels searched without any adversarial direction before the image fails

    def __post_init__(self):
        C.check_common(self, norms=("linf",))
        if self.targeted:
            raise ValueError("RayS is an untargeted attack (targeted=True is not supported)")
        C.check_real("tol", self.tol)
        C.check_int("max_bisect", self.max_bisect)
        C.check_int("start_levels", self.start_levels, 1)


class RaySState(NamedTuple):
    x: jax.Array  # best adversarial point (x0 until one is found)
    x0: jax.Array
    cls: jax.Array
    key: jax.Array
    step: jax.Array
    done: jax.Array
    failed: jax.Array
    sgn: jax.Array  # best direction, +-1 [H, W, C]
    r: jax.Array  # its radius g(sgn) (inf until found)
    dist: jax.Array  # l_inf distance of x
    level: jax.Array
    block: jax.Array


class RaySInfo(NamedTuple):
    loss: jax.Array
    queries: jax.Array
    level: jax.Array


def rays(cfg: RaySConfig) -> Attack:
    """Build RayS for ``cfg``."""

    def init(key, x0, label, target):
        x0 = jnp.asarray(x0, jnp.float32)
        z, f, inf = jnp.zeros((), jnp.int32), jnp.zeros((), bool), jnp.asarray(jnp.inf, jnp.float32)
        return RaySState(x0, x0, jnp.asarray(label, jnp.int32), key, z, f, f, jnp.ones_like(x0), inf, inf, z, z)

    def step(state: RaySState, oracle):
        x0, cls = state.x0, state.cls
        D = math.prod(x0.shape)
        top = max(0, math.ceil(math.log2(D)))  # level of single-coordinate blocks
        r_max = math.sqrt(D)
        n = jnp.left_shift(jnp.ones((), jnp.int32), state.level)  # blocks at this level
        size = (D + n - 1) // n
        start = state.block * size
        end = jnp.minimum(D, start + size)
        idx = jnp.arange(D).reshape(x0.shape)
        attempt = jnp.where((idx >= start) & (idx < end), -state.sgn, state.sgn)
        u = attempt / r_max
        point = lambda r: jnp.clip(x0 + r * u, 0.0, 1.0)
        r_ref = jnp.minimum(state.r, r_max)
        adv, off = C.ask(oracle, jnp.zeros((), jnp.int32), point(r_ref)[None], cls, False)
        _, r_new, off = C.run_if(adv[0], lambda c: C.bisect(oracle, c[2], point, c[0], c[1], cfg.tol, cfg.max_bisect,
                                                             cls, False), (jnp.zeros(()), r_ref, off))
        better = adv[0] & (r_new < state.r)
        x_new = point(r_new)
        sgn = jnp.where(better, attempt, state.sgn)
        r = jnp.where(better, r_new, state.r)
        x, dist = C.keep_best(state.x, state.dist, x_new, C.distance(x_new, x0, "linf"), better)
        nxt = state.block + 1
        wrap = (nxt == n) | (end == D)
        level = jnp.where(wrap, jnp.minimum(state.level + 1, top), state.level)
        block = jnp.where(wrap, 0, nxt)
        failed = jnp.isinf(r) & wrap & (state.level >= cfg.start_levels - 1)
        found = jnp.isfinite(r)
        st = state._replace(x=x, step=state.step + 1, sgn=sgn, r=r, dist=dist, level=level, block=block,
                            failed=failed, done=C.is_done(found, dist, cfg.eps))
        return st, RaySInfo(loss=dist, queries=off, level=state.level)

    return Attack(init=init, step=step, cost=1 + cfg.max_bisect, output="label", targeted=False)


register(AttackSpec(
    name="rays", config=RaySConfig, build=lambda cfg, ctx: rays(cfg), family="decision", supports_targeted=False,
    battery=dict(norm="linf", eps=BATTERY_EPS["linf"], budget=2_000),
    bad_configs=(dict(norm="l2"), dict(targeted=True), dict(eps=-0.1), dict(tol=0.0), dict(max_bisect=0),
                 dict(start_levels=0))))
