"""Boundary Attack: a rejection-sampling random walk along the decision boundary (l_2).

Brendel, Rauber & Bethge, "Decision-Based Adversarial Attacks: Reliable Attacks Against Black-Box
Machine Learning Models", ICLR 2018 (arXiv:1712.04248), Sec. 3.

From an adversarial point ``x`` at distance ``d = ||x - x0||_2`` each proposal (their Sec. 3.2):

1. draws ``eta ~ N(0, I)``, removes its component along ``x0 - x``, and scales it to
   ``||eta|| = delta * d`` (the orthogonal step), then projects ``x + eta`` back onto the sphere of
   radius ``d`` around ``x0`` (the *spherical candidate*);
2. moves the spherical candidate towards ``x0`` by ``epsilon * d`` (the source step): the
   *candidate*, at distance ``(1 - epsilon) d`` (before clipping to [0, 1]).

A candidate answered adversarial replaces ``x``. Each step sends ``proposals`` spherical candidates
and their candidates to the oracle in one batch (``2 * proposals`` queries) and moves to the
closest adversarial candidate. Step sizes adapt as the paper prescribes (Sec. 3.3): the
orthogonal step towards a ~50% success rate of spherical candidates, the source step with the
success rate of candidates. Concretely, every ``adapt_every`` steps, with ``p_s`` the spherical and
``p_c`` the candidate success rate since the last adaptation: ``p_s > 0.5`` multiplies both steps
by ``adaptation``, ``p_s < 0.2`` divides both; ``p_c > 0.25`` multiplies ``epsilon``, ``p_c < 0.1``
divides it (the thresholds of Foolbox's implementation). Steps are kept within
``[1e-6, 1]`` so that they neither vanish nor leave the sphere's neighbourhood.

Start: a training image of another class / of the target class or a uniform-noise image
(``_common``), bisected towards ``x0`` along the segment to width ``1e-3`` (the blended start of
the reference implementation searches the same segment). Defaults: the paper's initial
``delta = epsilon = 0.01`` and adaptation factor 1.5; 5 proposals per step. The attack has no
inner loop of unbounded length: each step costs exactly ``2 * proposals`` queries after the start.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnd_jax.attacks.decision import _common as C
from rnd_jax.attacks.driver import Attack
from rnd_jax.attacks.registry import BATTERY_EPS, AttackSpec, register


@dataclasses.dataclass(frozen=True)
class BoundaryConfig:
    eps: float | None = None  # stop once the best adversarial point is within eps; None: run to budget
    norm: str = "l2"  # the Boundary Attack minimizes the l2 distance
    targeted: bool = False
    proposals: int = 5  # proposals per step (2 queries each)
    spherical_step: float = 0.01  # delta (initial)
    source_step: float = 0.01  # epsilon (initial)
    adaptation: float = 1.5
    adapt_every: int = 2  # steps between step-size adaptations
    start_tol: float = 1e-3  # width of the initial bisection (segment parameter)
    start_candidates: int = 10
    start_steps: int = 5

    def __post_init__(self):
        C.check_common(self, norms=("l2",))
        C.check_int("proposals", self.proposals)
        C.check_int("adapt_every", self.adapt_every)
        C.check_real("spherical_step", self.spherical_step, upper=1.0)
        C.check_real("source_step", self.source_step, upper=1.0)
        C.check_real("start_tol", self.start_tol, upper=1.0)
        C.check_real("adaptation", self.adaptation)
        if self.adaptation <= 1.0:
            raise ValueError(f"adaptation must be > 1, got {self.adaptation!r}")


class BoundaryState(NamedTuple):
    x: jax.Array  # best (= current) adversarial point
    x0: jax.Array
    cls: jax.Array
    key: jax.Array
    step: jax.Array
    done: jax.Array
    failed: jax.Array
    found: jax.Array
    tries: jax.Array
    dist: jax.Array
    delta: jax.Array  # orthogonal (spherical) step
    epsilon: jax.Array  # source step
    n_sph: jax.Array  # adversarial spherical candidates since the last adaptation
    n_cand: jax.Array  # adversarial candidates since the last adaptation
    n_seen: jax.Array  # proposals since the last adaptation


class BoundaryInfo(NamedTuple):
    loss: jax.Array
    queries: jax.Array
    delta: jax.Array
    epsilon: jax.Array


def proposals(key, x, x0, delta, epsilon, n: int):
    """``n`` (spherical candidate, candidate) pairs around ``x``; both clipped to [0, 1]."""
    src = x0 - x
    d = jnp.sqrt(jnp.sum(src * src))
    src_unit = C.unit(src)
    eta = jax.random.normal(key, (n,) + x.shape, x.dtype)
    eta = eta - jnp.tensordot(jnp.tensordot(eta, src_unit, axes=x.ndim), src_unit, axes=0)
    eta = C.unit_rows(eta) * (delta * d)
    moved = x[None] + eta - x0[None]  # from x0; norm d * sqrt(1 + delta^2)
    sph = x0[None] + moved / jnp.sqrt(1.0 + delta * delta)
    cand = sph + epsilon * d * C.unit_rows(x0[None] - sph)
    return jnp.clip(sph, 0.0, 1.0), jnp.clip(cand, 0.0, 1.0)


def boundary_attack(cfg: BoundaryConfig, pool: C.Pool = C.Pool(None, None)) -> Attack:
    """Build the Boundary Attack for ``cfg``; ``pool`` holds training images for starting points."""
    targeted, P = cfg.targeted, cfg.proposals
    n_start = C.halvings(cfg.start_tol) + 1

    def init(key, x0, label, target):
        x0 = jnp.asarray(x0, jnp.float32)
        cls = jnp.asarray(target if targeted else label, jnp.int32)
        z, f, inf = jnp.zeros((), jnp.int32), jnp.zeros((), bool), jnp.asarray(jnp.inf, jnp.float32)
        return BoundaryState(x0, x0, cls, key, z, f, f, f, z, inf, jnp.asarray(cfg.spherical_step, jnp.float32),
                             jnp.asarray(cfg.source_step, jnp.float32), z, z, z)

    def step(state: BoundaryState, oracle):
        k = jax.random.fold_in(state.key, state.step)
        k_start, k_eta = jax.random.split(k)
        x0, cls = state.x0, state.cls

        def search(c):
            st, off = c
            s, off = C.start_step(oracle, off, k_start, x0, cls, st.tries, cfg, pool)
            xb, off = C.run_if(s.found, lambda cc: C.boundary(oracle, cc[1], x0, cc[0], "l2", cfg.start_tol, n_start,
                                                               cls, targeted), (s.x, off))
            d = C.distance(xb, x0, "l2")
            st = st._replace(found=s.found, failed=s.failed, tries=s.tries, x=jnp.where(s.found, xb, st.x),
                             dist=jnp.where(s.found, d, st.dist))
            return st, off

        def walk(c):
            st, off = c
            sph, cand = proposals(k_eta, st.x, x0, st.delta, st.epsilon, P)
            adv, off = C.ask(oracle, off, jnp.concatenate([sph, cand]), cls, targeted)
            adv_s, adv_c = adv[:P], adv[P:]
            d_c = jnp.where(adv_c, C.batch_norm(cand - x0[None], "l2"), jnp.inf)
            i = jnp.argmin(d_c)
            x, dist = C.keep_best(st.x, st.dist, cand[i], d_c[i], adv_c[i])
            n_sph = st.n_sph + adv_s.sum()
            n_cand = st.n_cand + adv_c.sum()
            n_seen = st.n_seen + P
            adapt = (st.step % cfg.adapt_every) == (cfg.adapt_every - 1)
            p_s = n_sph / jnp.maximum(n_seen, 1)
            p_c = n_cand / jnp.maximum(n_seen, 1)
            a = cfg.adaptation
            f_s = jnp.where(p_s > 0.5, a, jnp.where(p_s < 0.2, 1.0 / a, 1.0))
            f_c = jnp.where(p_c > 0.25, a, jnp.where(p_c < 0.1, 1.0 / a, 1.0))
            delta = jnp.where(adapt, jnp.clip(st.delta * f_s, 1e-6, 1.0), st.delta)
            epsilon = jnp.where(adapt, jnp.clip(st.epsilon * f_s * f_c, 1e-6, 1.0), st.epsilon)
            z = jnp.zeros((), jnp.int32)
            st = st._replace(x=x, dist=dist, delta=delta, epsilon=epsilon, n_sph=jnp.where(adapt, z, n_sph),
                             n_cand=jnp.where(adapt, z, n_cand), n_seen=jnp.where(adapt, z, n_seen))
            return st, off

        zero = jnp.zeros((), jnp.int32)
        st, off = C.run_if(~state.found, search, (state, zero))
        st, off = C.run_if(state.found, walk, (st, off))
        st = st._replace(step=state.step + 1, done=C.is_done(st.found, st.dist, cfg.eps))
        return st, BoundaryInfo(loss=st.dist, queries=off, delta=st.delta, epsilon=st.epsilon)

    cost = max(cfg.start_candidates + n_start, 2 * P)
    return Attack(init=init, step=step, cost=cost, output="label", targeted=targeted)


register(AttackSpec(
    name="boundary", config=BoundaryConfig, build=lambda cfg, ctx: boundary_attack(cfg, C.make_pool(ctx)),
    family="decision", needs=("train_images", "train_labels"),
    battery=dict(norm="l2", eps=BATTERY_EPS["l2"], budget=2_000),
    bad_configs=(dict(norm="linf"), dict(eps=0.0), dict(proposals=0), dict(spherical_step=0.0),
                 dict(source_step=2.0), dict(adaptation=1.0), dict(adapt_every=0), dict(start_candidates=-1))))
