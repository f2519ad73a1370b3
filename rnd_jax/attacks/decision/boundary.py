"""Boundary Attack: a rejection-sampling random walk along the decision boundary (l_2).

Brendel, Rauber & Bethge, "Decision-Based Adversarial Attacks: Reliable Attacks Against Black-Box
Machine Learning Models", ICLR 2018 (arXiv:1712.04248), Sec. 3.

From an adversarial point ``x`` at distance ``d = ||x - x0||_2`` each proposal (their Sec. 3.2):

1. draws ``eta ~ N(0, I)``, removes its component along ``x0 - x``, and scales it to
   ``||eta|| = delta * d`` (the orthogonal step), then projects ``x + eta`` back onto the sphere of
   radius ``d`` around ``x0`` (the *spherical candidate*);
2. moves the spherical candidate towards ``x0`` by ``epsilon * d`` (the source step): the
   *candidate*, at distance ``(1 - epsilon) d`` (before clipping to [0, 1]).

A candidate answered adversarial replaces ``x``. Each step draws ``proposals`` (spherical
candidate, candidate) pairs, asks the oracle about the candidates in one batch (``proposals``
queries) and moves to the closest adversarial candidate. As in the reference implementation
(Foolbox's ``BoundaryAttack``, by the paper's authors), the spherical candidates are asked only
every ``spherical_every = 10``-th step of the walk (then ``2 * proposals`` queries in that step):
they serve only the step-size adaptation, not the walk. Step sizes adapt as the paper prescribes
(Sec. 3.3) from success statistics collected on those steps: the orthogonal step towards a ~50%
success rate of spherical candidates, the source step with the success rate of candidates. The
reference keeps the last answers of each kind in a window (100 spherical answers and 30 candidate
answers); once a window is full, a spherical rate ``p_s > 0.5`` multiplies both steps by
``adaptation``, ``p_s < 0.2`` divides both; a candidate rate ``p_c > 0.25`` multiplies
``epsilon``, ``p_c < 0.1`` divides it (the thresholds of Foolbox's batched version, which counts
candidate successes unconditionally as here); a window that triggered a change is emptied, one that
did not slides on. Steps are kept within ``[1e-6, 1]`` so that they neither vanish nor leave the
sphere's neighbourhood.

Start: a training image of another class / of the target class or a uniform-noise image
(``_common``), bisected towards ``x0`` along the segment to width ``1e-3`` (the blended start of
the reference implementation searches the same segment). Defaults: the paper's initial
``delta = epsilon = 0.01`` and adaptation factor 1.5; 5 proposals per step; spherical candidates
every 10th step (the reference's). Windows: the reference's batched version asks one proposal per
check step, so its windows span 100 and 30 check steps (1 000 and 300 steps of the walk). With 5
proposals per check step and digits budgets of 2 000-10 000 queries (350-1 800 steps), the windows
here are ``spherical_window = step_window = 1`` check step (its 5 answers of each kind): windows of
2-4 check steps adapt the steps too slowly from their initial 0.01 (mean distance of 16 undefended
untargeted digits after 1 000 queries 0.79-0.92, against 0.65 with one check step and 0.68 when
every step asked its spherical candidates; after 10 000 queries all reach 0.55-0.57). A step asks
at most ``2 * proposals`` queries after the start (``cost``; the count is reported in
``Info.queries``), ``proposals`` on 9 steps out of 10: about 1.8 times fewer queries per candidate
than asking the spherical candidates at every step.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from rnd_jax.attacks.decision import _common as C
from rnd_jax.attacks.driver import Attack
from rnd_jax.attacks.registry import BATTERY_EPS, AttackSpec, register


@dataclasses.dataclass(frozen=True)
class BoundaryConfig:
    eps: float | None = None  # stop once the best adversarial point is within eps; None: run to budget
    norm: str = "l2"  # the Boundary Attack minimizes the l2 distance
    targeted: bool = False
    proposals: int = 5  # candidates per step (and spherical candidates on check steps)
    spherical_step: float = 0.01  # delta (initial)
    source_step: float = 0.01  # epsilon (initial)
    adaptation: float = 1.5
    spherical_every: int = 10  # walk steps between the steps that also ask the spherical candidates
    spherical_window: int = 1  # check steps whose spherical answers form the success-rate window
    step_window: int = 1  # check steps whose candidate answers form the success-rate window
    start_tol: float = 1e-3  # width of the initial bisection (segment parameter)
    start_candidates: int = 10
    start_steps: int = 5

    def __post_init__(self):
        C.check_common(self, norms=("l2",))
        C.check_int("proposals", self.proposals)
        for name in ("spherical_every", "spherical_window", "step_window"):
            C.check_int(name, getattr(self, name))
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
    walk: jax.Array  # i32: walk steps taken (steps after the start was found)
    sph_hits: jax.Array  # i32[spherical_window]: adversarial spherical candidates per check step (ring)
    sph_n: jax.Array  # i32: filled entries of sph_hits since it was last emptied
    cand_hits: jax.Array  # i32[step_window]: adversarial candidates per check step (ring)
    cand_n: jax.Array  # i32: filled entries of cand_hits since it was last emptied


class BoundaryInfo(NamedTuple):
    loss: jax.Array
    queries: jax.Array
    delta: jax.Array
    epsilon: jax.Array
    spherical: jax.Array  # bool: this step asked the spherical candidates


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
    Ws, Wc = cfg.spherical_window, cfg.step_window

    def init(key, x0, label, target):
        x0 = jnp.asarray(x0, jnp.float32)
        cls = jnp.asarray(target if targeted else label, jnp.int32)
        z, f, inf = jnp.zeros((), jnp.int32), jnp.zeros((), bool), jnp.asarray(jnp.inf, jnp.float32)
        return BoundaryState(x0, x0, cls, key, z, f, f, f, z, inf, jnp.asarray(cfg.spherical_step, jnp.float32),
                             jnp.asarray(cfg.source_step, jnp.float32), z, jnp.zeros((Ws,), jnp.int32), z,
                             jnp.zeros((Wc,), jnp.int32), z)

    def record(hits, n, count, window: int):
        """Add one check step's count to a ring window: (hits, n, full, success rate)."""
        hits = jnp.roll(hits, 1).at[0].set(count)
        n = jnp.minimum(n + 1, window)
        return hits, n, n == window, jnp.sum(hits) / (window * P)

    def step(pool, state: BoundaryState, oracle):
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
            st, off, _ = c
            sph, cand = proposals(k_eta, st.x, x0, st.delta, st.epsilon, P)
            adv_c, off = C.ask(oracle, off, cand, cls, targeted)
            d_c = jnp.where(adv_c, C.batch_norm(cand - x0[None], "l2"), jnp.inf)
            i = jnp.argmin(d_c)
            x, dist = C.keep_best(st.x, st.dist, cand[i], d_c[i], adv_c[i])
            check = (st.walk % cfg.spherical_every) == (cfg.spherical_every - 1)

            def adapt(cc):
                st, off = cc
                adv_s, off = C.ask(oracle, off, sph, cls, targeted)
                a = cfg.adaptation
                delta, epsilon = st.delta, st.epsilon
                hits, n, full, p_s = record(st.sph_hits, st.sph_n, adv_s.sum(), Ws)
                f_s = jnp.where(full & (p_s > 0.5), a, jnp.where(full & (p_s < 0.2), 1.0 / a, 1.0))
                delta, epsilon = delta * f_s, epsilon * f_s
                n = jnp.where(f_s != 1.0, 0, n)
                c_hits, c_n, c_full, p_c = record(st.cand_hits, st.cand_n, adv_c.sum(), Wc)
                f_c = jnp.where(c_full & (p_c > 0.25), a, jnp.where(c_full & (p_c < 0.1), 1.0 / a, 1.0))
                epsilon = epsilon * f_c
                c_n = jnp.where(f_c != 1.0, 0, c_n)
                st = st._replace(delta=jnp.clip(delta, 1e-6, 1.0), epsilon=jnp.clip(epsilon, 1e-6, 1.0),
                                 sph_hits=hits, sph_n=n, cand_hits=c_hits, cand_n=c_n)
                return st, off

            st, off = C.run_if(check, adapt, (st, off))
            st = st._replace(x=x, dist=dist, walk=st.walk + 1)
            return st, off, check

        zero = jnp.zeros((), jnp.int32)
        st, off = C.run_if(~state.found, search, (state, zero))
        st, off, checked = C.run_if(state.found, walk, (st, off, jnp.zeros((), bool)))
        st = st._replace(step=state.step + 1, done=C.is_done(st.found, st.dist, cfg.eps))
        return st, BoundaryInfo(loss=st.dist, queries=off, delta=st.delta, epsilon=st.epsilon, spherical=checked)

    cost = max(cfg.start_candidates + n_start, 2 * P)
    return Attack(init=init, step=Partial(step, pool), cost=cost, output="label", targeted=targeted)


register(AttackSpec(
    name="boundary", config=BoundaryConfig, build=lambda cfg, ctx: boundary_attack(cfg, C.make_pool(ctx)),
    family="decision", needs=("train_images", "train_labels"),
    battery=dict(norm="l2", eps=BATTERY_EPS["l2"], budget=2_000),
    bad_configs=(dict(norm="linf"), dict(eps=0.0), dict(proposals=0), dict(spherical_step=0.0),
                 dict(source_step=2.0), dict(adaptation=1.0), dict(spherical_every=0), dict(spherical_window=0),
                 dict(step_window=1.5), dict(start_candidates=-1))))
