"""Evolutionary attack: a (1+1)-ES with a diagonal covariance in a reduced search space (l_2).

Dong, Su, Wu, Li, Liu, Zhang & Zhu, "Efficient Decision-based Black-box Adversarial Attacks on Face
Recognition", CVPR 2019, Algorithm 1 (Sec. 3.2-3.3).

From the best adversarial point ``x*`` (distance ``D = ||x* - x0||_2``) each step makes ONE offspring
and asks ONE query:

1. **Mutation in a low-dimensional space.** ``z = sqrt(C) xi``, ``xi ~ N(0, I_m)``, on a grid of
   ``m = r x r x channels`` cells (``r = reduced``), with ``C`` the diagonal covariance (``C = I`` at
   the start).
2. **Stochastic coordinate selection.** Only ``k`` coordinates of ``z`` are kept, drawn without
   replacement with probabilities proportional to ``C_ii`` (the Gumbel top-``k`` draw); the others are
   set to 0.
3. **Upsampling** of ``z`` to the image by bilinear interpolation: ``z~``, scaled to l_2 length
   ``sigma D``.
4. **A step towards the original image**: the offspring is ``x' = x* + z~ + mu (x0 - x*)``; with
   ``sphere`` (default) it is then moved along the ray from ``x0`` to the distance
   ``(1 - mu) D`` of the biased point ``x* + mu (x0 - x*)``; clipped to [0, 1].
5. **Selection.** ``x'`` replaces ``x*`` if it is adversarial and closer to ``x0`` (the paper's
   ``L(x') < L(x*)``, ``L = D`` on adversarial points and infinite elsewhere).
6. **Covariance adaptation** after a success, from the evolution path ``p_c``:
   ``p_c <- (1 - c_c) p_c + sqrt(c_c (2 - c_c)) z`` and ``C_ii <- (1 - c_cov) C_ii + c_cov p_c,i^2``.
7. **Step-size adaptation** by the success rate (the 1/5th success rule): after every ``window``
   offspring, ``mu <- mu exp(P_success - 1/5)`` with ``P_success`` the share of them that replaced
   ``x*``.

Defaults: the paper's constants ``c_c = 0.01``, ``c_cov = 0.001``, ``sigma = 0.01`` (relative to the
current distance ``D``), ``mu = 0.01`` (initial), ``k = m / 20``, and a search space of 45x45 cells for
112x112 faces: ``reduced=None`` takes ``ceil(H * 45 / 112)`` cells per side (4 on the 8x8 digits, 13 on
32x32, 90 on 224x224), with ``k = max(1, round(m / 20))`` (1 of 16 on digits). ``P_success`` is measured
over windows of ``window = 30`` offspring, the value of the authors' implementation in their ARES library
(the paper says "several past trials"); that implementation also scales the mutation to ``sigma D`` as
here, and moves the offspring back onto the sphere of radius ``(1 - mu) D`` around ``x0``
(``sphere=True``, default). Without that projection (``sphere=False``, Algorithm 1 as printed) an
offspring is closer only while ``mu`` exceeds about ``sigma^2 / 2``; after runs of rejected offspring the
1/5th rule takes ``mu`` below it and the search freezes (on digits one targeted battery image stayed at
distance 2.18 from 2 000 to 5 000 queries; with the projection every battery image, targeted, reaches
l_2 2.0 within 940 queries; with the 3x3 grid of ``round(8 * 45 / 112)`` one needs 2 137).

Start (``_common``): training images of the target class (targeted) or uniform noise and training
images of other classes (untargeted), the closest adversarial one bisected towards ``x0`` along the
segment to width ``start_tol`` (as for the Boundary Attack; the paper starts from any adversarial
image, e.g. the target face). The start step asks at most ``start_candidates + log2(1/start_tol) + 1``
queries (the declared cost; counts are reported in ``Info.queries``), every later step exactly one.
``done`` is "the best point is within ``eps``"; ``eps=None`` runs to the budget.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from rnd_jax.attacks.decision import _common as C
from rnd_jax.attacks.driver import Attack
from rnd_jax.attacks.registry import BATTERY_EPS, AttackSpec, register

FACE_SIDE, FACE_GRID = 112, 45  # the paper's 45x45x3 search space for 112x112x3 faces


@dataclasses.dataclass(frozen=True)
class EvolutionaryConfig:
    """Evolutionary attack hyper-parameters (module docstring)."""

    eps: float | None = None  # stop once the best adversarial point is within eps; None: run to budget
    norm: str = "l2"  # the evolutionary attack minimizes the l2 distance
    targeted: bool = False
    reduced: int | None = None  # cells per side of the search space (None: ceil(H * 45 / 112))
    coord_fraction: float = 0.05  # k = max(1, round(m * coord_fraction)) coordinates per mutation (m / 20)
    sigma: float = 0.01  # l2 length of the mutation, relative to the current distance
    mu: float = 0.01  # initial step towards x0, relative to the current difference x0 - x*
    c_c: float = 0.01  # evolution-path rate
    c_cov: float = 0.001  # covariance learning rate
    window: int = 30  # offspring per success-rate estimate (the mu update)
    sphere: bool = True  # the ARES implementation's projection of the offspring (module docstring)
    start_tol: float = 1e-3  # width of the initial bisection (segment parameter)
    start_candidates: int = 10
    start_steps: int = 5

    def __post_init__(self):
        C.check_common(self, norms=("l2",))
        if self.reduced is not None:
            C.check_int("reduced", self.reduced)
        C.check_real("coord_fraction", self.coord_fraction, upper=1.0)
        C.check_real("sigma", self.sigma)
        C.check_real("mu", self.mu, upper=1.0)
        C.check_real("c_c", self.c_c, upper=1.0)
        C.check_real("c_cov", self.c_cov, upper=1.0)
        C.check_int("window", self.window)
        C.check_real("start_tol", self.start_tol, upper=1.0)

    def grid(self, shape) -> tuple[int, int, int]:
        """Shape ``(r, r', channels)`` of the search space for images of ``shape = (H, W, C)``."""
        h, w, c = shape
        if self.reduced is not None:
            return (min(self.reduced, h), min(self.reduced, w), c)
        return (max(1, math.ceil(h * FACE_GRID / FACE_SIDE)), max(1, math.ceil(w * FACE_GRID / FACE_SIDE)), c)

    def coords(self, m: int) -> int:
        """``k``: coordinates kept per mutation in a search space of ``m`` cells."""
        return min(m, max(1, round(m * self.coord_fraction)))


class EvolutionaryState(NamedTuple):
    x: jax.Array  # best (= current) adversarial point x*
    x0: jax.Array
    cls: jax.Array
    key: jax.Array
    step: jax.Array
    done: jax.Array
    failed: jax.Array
    found: jax.Array
    tries: jax.Array
    dist: jax.Array
    cov: jax.Array  # diag(C): f32[r, r', channels]
    path: jax.Array  # evolution path p_c: f32[r, r', channels]
    mu: jax.Array  # current step towards x0
    hits: jax.Array  # i32: offspring of the current window that replaced x*
    trials: jax.Array  # i32: offspring of the current window


class EvolutionaryInfo(NamedTuple):
    loss: jax.Array  # distance of the best adversarial point (inf before a start is found)
    queries: jax.Array  # points asked this step
    mu: jax.Array
    accepted: jax.Array  # bool: this step's offspring replaced x*


def mutation(key, cov, k: int):
    """``z = sqrt(C) xi`` with all but ``k`` coordinates zeroed, those drawn with probability ~ ``C_ii``."""
    k_sel, k_xi = jax.random.split(key)
    flat = cov.reshape(-1)
    gumbel = jax.random.gumbel(k_sel, flat.shape, flat.dtype)
    _, idx = jax.lax.top_k(jnp.log(jnp.maximum(flat, 1e-30)) + gumbel, k)
    keep = jnp.zeros(flat.shape, flat.dtype).at[idx].set(1.0).reshape(cov.shape)
    return keep * jnp.sqrt(cov) * jax.random.normal(k_xi, cov.shape, cov.dtype)


def evolve(path, cov, z, c_c: float, c_cov: float):
    """The covariance adaptation after a success: the new ``(p_c, diag C)``."""
    path = (1.0 - c_c) * path + math.sqrt(c_c * (2.0 - c_c)) * z
    return path, (1.0 - c_cov) * cov + c_cov * path * path


def adapt_mu(mu, hits, trials, window: int):
    """The 1/5th success rule: ``(mu, hits, trials)`` after a window is full (``mu exp(P - 1/5)``, reset)."""
    full = trials >= window
    rate = hits.astype(jnp.float32) / window
    return (jnp.where(full, mu * jnp.exp(rate - 0.2), mu), jnp.where(full, 0, hits), jnp.where(full, 0, trials))


def offspring(x, x0, z, sigma: float, mu, dist, sphere: bool = False):
    """``clip(x* + sigma D up(z)/||up(z)|| + mu (x0 - x*))``: the candidate of one step (``sphere``: moved
    along the ray from ``x0`` to the distance ``(1 - mu) D`` of the biased point before clipping)."""
    up = jax.image.resize(z, x.shape, method="bilinear")
    cand = x + sigma * dist * C.unit(up) + mu * (x0 - x)
    if sphere:
        cand = x0 + (1.0 - mu) * dist * C.unit(cand - x0)
    return jnp.clip(cand, 0.0, 1.0)


def evolutionary(cfg: EvolutionaryConfig, pool: C.Pool = C.Pool(None, None)) -> Attack:
    """Build the evolutionary attack for ``cfg``; ``pool`` holds training images for starting points."""
    targeted = cfg.targeted
    n_start = C.halvings(cfg.start_tol) + 1

    def init(key, x0, label, target):
        x0 = jnp.asarray(x0, jnp.float32)
        cls = jnp.asarray(target if targeted else label, jnp.int32)
        z, f, inf = jnp.zeros((), jnp.int32), jnp.zeros((), bool), jnp.asarray(jnp.inf, jnp.float32)
        shape = cfg.grid(x0.shape)
        return EvolutionaryState(x0, x0, cls, key, z, f, f, f, z, inf, jnp.ones(shape, jnp.float32),
                                 jnp.zeros(shape, jnp.float32), jnp.asarray(cfg.mu, jnp.float32), z, z)

    def step(pool, state: EvolutionaryState, oracle):
        k_start, k_z = jax.random.split(jax.random.fold_in(state.key, state.step))
        x0, cls = state.x0, state.cls
        k = cfg.coords(state.cov.size)

        def search(c):
            st, off, _ = c
            s, off = C.start_step(oracle, off, k_start, x0, cls, st.tries, cfg, pool)
            xb, off = C.run_if(s.found, lambda cc: C.boundary(oracle, cc[1], x0, cc[0], "l2", cfg.start_tol, n_start,
                                                               cls, targeted), (s.x, off))
            st = st._replace(found=s.found, failed=s.failed, tries=s.tries, x=jnp.where(s.found, xb, st.x),
                             dist=jnp.where(s.found, C.distance(xb, x0, "l2"), st.dist))
            return st, off, jnp.zeros((), bool)

        def evolve_step(c):
            st, off, _ = c
            z = mutation(k_z, st.cov, k)
            cand = offspring(st.x, x0, z, cfg.sigma, st.mu, st.dist, cfg.sphere)
            adv, off = C.ask(oracle, off, cand[None], cls, targeted)
            d = C.distance(cand, x0, "l2")
            ok = adv[0] & (d < st.dist)
            path, cov = evolve(st.path, st.cov, z, cfg.c_c, cfg.c_cov)
            mu, hits, trials = adapt_mu(st.mu, st.hits + ok.astype(jnp.int32), st.trials + 1, cfg.window)
            st = st._replace(x=jnp.where(ok, cand, st.x), dist=jnp.where(ok, d, st.dist),
                             path=jnp.where(ok, path, st.path), cov=jnp.where(ok, cov, st.cov), mu=mu, hits=hits,
                             trials=trials)
            return st, off, ok

        zero = jnp.zeros((), jnp.int32)
        st, off, _ = C.run_if(~state.found, search, (state, zero, jnp.zeros((), bool)))
        st, off, ok = C.run_if(state.found, evolve_step, (st, off, jnp.zeros((), bool)))
        st = st._replace(step=state.step + 1, done=C.is_done(st.found, st.dist, cfg.eps))
        return st, EvolutionaryInfo(loss=st.dist, queries=off, mu=st.mu, accepted=ok)

    cost = max(cfg.start_candidates + n_start, 1)
    return Attack(init=init, step=Partial(step, pool), cost=cost, output="label", targeted=targeted)


register(AttackSpec(
    name="evolutionary", config=EvolutionaryConfig, build=lambda cfg, ctx: evolutionary(cfg, C.make_pool(ctx)),
    family="decision", needs=("train_images", "train_labels"),
    battery=dict(norm="l2", eps=BATTERY_EPS["l2"], budget=2_000),
    bad_configs=(dict(norm="linf"), dict(eps=0.0), dict(reduced=0), dict(coord_fraction=0.0),
                 dict(coord_fraction=1.5), dict(sigma=-0.01), dict(mu=0.0), dict(c_c=2.0), dict(c_cov=float("nan")),
                 dict(window=0), dict(start_tol=0.0), dict(start_candidates=0), dict(sphere=1))))
