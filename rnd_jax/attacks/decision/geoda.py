"""GeoDA: geometric decision-based attack with low-frequency normal estimates (l_2).

Rahmati, Moosavi-Dezfooli, Frossard & Dai, "GeoDA: a geometric framework for black-box
adversarial attacks", CVPR 2020 (arXiv:2003.06468), Alg. 1 with the l_2 update of Sec. 4.

The decision boundary near a data point has small curvature, so it is locally a hyperplane whose
normal ``w`` can be estimated at a boundary point ``x_b`` from label answers alone:

    w ~ sum_i z_i eta_i,   z_i = +1 if x_b + sigma eta_i is adversarial else -1   (their eq. 9),

with ``eta_i`` Gaussian in the low-frequency DCT subspace (the top-left ``sub_dim x sub_dim``
coefficients of each channel, their Sec. 5). The estimates of all iterations are summed. The
closest point of the hyperplane lies along ``w`` from ``x0`` (the l_2 solution of their eq. 5): the
attack walks ``x0 + k s w/||w||``, ``k = 1, 2, ...`` (at most ``max_go`` steps) until adversarial and
bisects back towards ``x0`` to get the next boundary point. The number of probes grows
geometrically over iterations, ``N_i = N_0 mu^(-2i/3)`` (the allocation of their Sec. 4.3 with
``mu = 0.6``), capped at ``max_probes`` and rounded up to whole chunks of ``chunk`` probes.

Scaled to 64-pixel digits: the paper uses ``sub_dim = 75`` of 224 (a third of the side) — here
``sub_dim = 6`` of 8 (on 8x8 digits a 4x4 block reached ~10-20% larger distances than the full
space at 2000 queries, 6x6 nearly matches it while keeping the low-frequency prior);
``sigma = 2e-4`` as there (a pixel-scale probe radius); the first iteration
has ``N_0 = 20`` probes (50-80 in the reference allocation for 3x224x224 images, 16 subspace
dimensions here). The paper walks in fixed steps of 5 (normalized ImageNet scale); here the step is
``go_step`` times the current boundary distance (up to ``max_go`` times), which adapts to any scale.
Boundary bisections stop at width ``tol = 1e-4`` of the segment parameter (the paper's tolerance,
there in distance units).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.tree_util import Partial
from jax.scipy.fft import idctn

from rnd_jax.attacks.decision import _common as C
from rnd_jax.attacks.driver import Attack
from rnd_jax.attacks.registry import BATTERY_EPS, AttackSpec, register
from rnd_jax.oracle import live_while


@dataclasses.dataclass(frozen=True)
class GeoDAConfig:
    eps: float | None = None  # stop once the best adversarial point is within eps; None: run to budget
    norm: str = "l2"  # the l2 variant of GeoDA
    targeted: bool = False
    sub_dim: int | None = 6  # low-frequency DCT block side (None: the full pixel space)
    sigma: float = 2e-4  # probe radius
    init_probes: int = 20  # N_0
    mu: float = 0.6  # probe growth N_i = N_0 mu^(-2i/3)
    max_probes: int = 200
    chunk: int = 10
    go_step: float = 0.1  # walk step along the normal, relative to the current distance
    max_go: int = 20
    tol: float = 1e-4  # bisection width (segment parameter)
    start_candidates: int = 10
    start_steps: int = 5

    def __post_init__(self):
        C.check_common(self, norms=("l2",))
        if self.sub_dim is not None:
            C.check_int("sub_dim", self.sub_dim)
        C.check_real("sigma", self.sigma)
        C.check_real("mu", self.mu, upper=1.0)
        if self.mu == 1.0:
            raise ValueError("mu must be < 1 (the probe count must grow)")
        for name in ("init_probes", "max_probes", "chunk", "max_go"):
            C.check_int(name, getattr(self, name))
        if self.max_probes < self.init_probes:
            raise ValueError(f"max_probes ({self.max_probes}) must be >= init_probes ({self.init_probes})")
        C.check_real("go_step", self.go_step)
        C.check_real("tol", self.tol, upper=0.5)


class GeoDAState(NamedTuple):
    x: jax.Array
    x0: jax.Array
    cls: jax.Array
    key: jax.Array
    step: jax.Array
    done: jax.Array
    failed: jax.Array
    found: jax.Array
    tries: jax.Array
    dist: jax.Array
    xb: jax.Array  # current boundary point
    dist_b: jax.Array
    w: jax.Array  # accumulated normal estimate
    it: jax.Array  # GeoDA iteration (0-based)


class GeoDAInfo(NamedTuple):
    loss: jax.Array
    queries: jax.Array
    probes: jax.Array


def low_freq_noise(key, n: int, shape, sub_dim):
    """``n`` Gaussian images of the low-frequency DCT subspace (orthonormal inverse DCT per channel)."""
    if sub_dim is None:
        return jax.random.normal(key, (n,) + shape)
    h, w = shape[0], shape[1]
    s_h, s_w = min(sub_dim, h), min(sub_dim, w)
    coef = jax.random.normal(key, (n, s_h, s_w) + shape[2:])
    coef = jnp.pad(coef, ((0, 0), (0, h - s_h), (0, w - s_w)) + ((0, 0),) * (len(shape) - 2))
    return idctn(coef, axes=(1, 2), norm="ortho")


def geoda(cfg: GeoDAConfig, pool: C.Pool = C.Pool(None, None)) -> Attack:
    """Build GeoDA for ``cfg``; ``pool`` holds training images for starting points."""
    targeted = cfg.targeted
    n_bisect = C.halvings(cfg.tol) + 1
    max_chunks = math.ceil(cfg.max_probes / cfg.chunk)
    growth = cfg.mu ** (-2.0 / 3.0)

    def init(key, x0, label, target):
        x0 = jnp.asarray(x0, jnp.float32)
        cls = jnp.asarray(target if targeted else label, jnp.int32)
        z, f, inf = jnp.zeros((), jnp.int32), jnp.zeros((), bool), jnp.asarray(jnp.inf, jnp.float32)
        return GeoDAState(x0, x0, cls, key, z, f, f, f, z, inf, x0, inf, jnp.zeros_like(x0), z)

    def step(pool, state: GeoDAState, oracle):
        k = jax.random.fold_in(state.key, state.step)
        k_start, k_probe = jax.random.split(k)
        x0, cls = state.x0, state.cls

        def search(c):
            st, off, probes, _, _, pc = c
            s, off = C.start_step(oracle, off, k_start, x0, cls, st.tries, cfg, pool)
            st = st._replace(found=s.found, failed=s.failed, tries=s.tries)
            return st, off, probes, s.x, s.found, pc  # the start, to bisect to the boundary when found

        def iterate(c):
            st, off, _, x_q, bisect, _ = c
            xb, db = st.xb, st.dist_b
            n_i = jnp.ceil(cfg.init_probes * growth ** st.it.astype(jnp.float32) / cfg.chunk)
            n_chunks = jnp.minimum(n_i, max_chunks).astype(jnp.int32)

            def chunk_body(cc):
                i, off, w = cc
                eta = low_freq_noise(jax.random.fold_in(k_probe, i), cfg.chunk, xb.shape, cfg.sub_dim)
                adv, off = C.ask(oracle, off, jnp.clip(xb[None] + cfg.sigma * eta, 0.0, 1.0), cls, targeted)
                return i + 1, off, w + jnp.tensordot(jnp.where(adv, 1.0, -1.0), eta, axes=1)

            n, off, w_i = live_while(lambda cc: cc[0] < n_chunks, chunk_body,
                                             (jnp.zeros((), jnp.int32), off, jnp.zeros_like(xb)))
            w = st.w + C.safe_div(w_i, (n * cfg.chunk).astype(jnp.float32))
            direction = C.unit(w)
            step_len = cfg.go_step * db

            # the search along the direction runs in the boundary search's loop (below)
            return (st._replace(w=w, it=st.it + 1), off, n * cfg.chunk, x_q, bisect,
                    (jnp.zeros((), jnp.int32), jnp.zeros((), bool), step_len, direction))

        # out from x0 along the direction in steps of go_step * d until adversarial (carry: j, ok, step, direction)
        go_search = C.OnePoint(
            going=lambda c: (c[0] < cfg.max_go) & ~c[1],
            point=lambda c: jnp.clip(x0 + (c[0] + 1) * c[2] * c[3], 0.0, 1.0),
            update=lambda c, adv: (c[0] + 1, adv, c[2], c[3]),
            result=lambda c: (jnp.clip(x0 + c[0] * c[2] * c[3], 0.0, 1.0), c[1]))
        # one loop asks the go search's points and one boundary search's, for both phases (one copy of the model)
        zero, no = jnp.zeros((), jnp.int32), jnp.zeros((), bool)
        idle = (zero, no, jnp.zeros((), jnp.float32), jnp.zeros_like(x0))
        carry = C.run_if(~state.found, search, (state, zero, zero, x0, no, idle))
        st, off, probes, x_q, bisect, pc = C.run_if(state.found, iterate, carry)
        x_b, bisected, _, off = C.then_boundary(oracle, off, x0, "l2", cfg.tol, n_bisect, cls, targeted, go_search, pc,
                                                state.found, x_q, bisect)
        st = st._replace(**C.after_boundary(state.found, st, x_b, bisected, lambda x: C.distance(x, x0, "l2")))
        st = st._replace(step=state.step + 1, done=C.is_done(st.found, st.dist, cfg.eps))
        return st, GeoDAInfo(loss=st.dist, queries=off, probes=probes)

    cost = max(cfg.start_candidates, max_chunks * cfg.chunk + cfg.max_go) + n_bisect
    return Attack(init=init, step=Partial(step, pool), cost=cost, output="label", targeted=targeted)


register(AttackSpec(
    name="geoda", config=GeoDAConfig, build=lambda cfg, ctx: geoda(cfg, C.make_pool(ctx)), family="decision",
    needs=("train_images", "train_labels"),
    battery=dict(norm="l2", eps=BATTERY_EPS["l2"], budget=2_000),
    bad_configs=(dict(norm="linf"), dict(eps=float("inf")), dict(sub_dim=0), dict(sigma=0.0), dict(mu=1.0),
                 dict(mu=1.5), dict(init_probes=0), dict(max_probes=5), dict(go_step=-0.1), dict(tol=1.0))))
