"""HopSkipJumpAttack (HSJA): boundary search + sign-based gradient estimate + geometric step.

Chen, Jordan & Wainwright, "HopSkipJumpAttack: A Query-Efficient Decision-Based Attack",
IEEE S&P 2020 (arXiv:1904.02144), Algorithm 2, for the l_2 and l_inf threat models: registered as
``hsja`` (:class:`HSJAConfig`, ``norm="l2"`` by default, ``"linf"`` selectable) and ``hsja_linf``
(:class:`HSJALinfConfig`, always l_inf).

One iteration ``t = 1, 2, ...`` at the boundary point ``x_t`` (distance ``d_t`` to ``x0``):

- **Gradient-direction estimate** (their eq. 9, with the baseline of eq. 16):
  ``g = 1/B sum_b (phi(x_t + delta u_b) - mean phi) u_b`` with ``phi = +1`` if adversarial else -1,
  ``u_b`` uniform on the unit sphere (l_2) or uniform in the cube then normalized (l_inf), and
  ``B_t = B_0 sqrt(t)`` evaluations, capped at ``max_evals``. ``delta = 0.1`` at ``t = 1``, then
  ``delta_t = sqrt(d) theta d_{t-1}`` (l_2) or ``d theta d_{t-1}`` (l_inf), with
  ``theta = gamma / d^{3/2}`` (l_2) or ``gamma / d^2`` (l_inf) (their Sec. 4 and Theorem 2).
  If all answers agree, the mean of ``phi u_b`` replaces the (then zero) baselined estimate.
- **Step**: ``v = g/||g||_2`` (l_2) or ``sign(g)`` (l_inf); geometric step-size search
  ``xi = d_t / sqrt(t)``, halved until ``x_t + xi v`` is adversarial (at most ``max_halvings``
  times; if none is, the iterate stays).
- **Boundary search** back towards ``x0`` (the bisection of ``_common.boundary``) down to the width
  ``theta`` of the l_2 interpolation parameter, or ``theta * min(d, 1)`` of the l_inf radius.

The first step(s) find a starting point (``_common``) and bisect it to the boundary. All query
counts are dynamic (``Info.queries``); the worst case of one step,
``max(start_candidates, max_evals + max_halvings + 1) + max_bisect``, is the declared cost, so the
driver never lets a step exceed the budget (bisections need ``log2(1/theta)`` halvings: 9 (l_2) and
12 (l_inf) on 8x8 images, capped at ``max_bisect``).

Defaults: the paper's ``gamma = 1``, ``B_0 = 100``, ``delta_1 = 0.1``. The reference cap
``max_num_evals = 10^4`` is never reached in practice (``B_t`` reaches it at ``t = 10^4``); here
``max_evals = 400`` (``B_t`` at ``t = 16``) bounds the worst-case step, and with it the unused
tail of a budget (the driver stops once a worst-case step no longer fits). Evaluations are asked
in chunks of ``chunk`` points, so ``B_t`` is rounded up to a multiple of ``chunk``.
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
from rnd_jax.oracle import live_while


@dataclasses.dataclass(frozen=True)
class HSJAConfig:
    """HopSkipJumpAttack hyper-parameters (see the module docstring)."""

    eps: float | None = None  # stop once the best adversarial point is within eps; None: run to budget
    norm: str = "l2"  # "l2" or "linf"
    targeted: bool = False
    init_evals: int = 100  # B_0: gradient-estimate points at t = 1 (B_t = B_0 sqrt(t))
    max_evals: int = 400  # cap on B_t
    chunk: int = 20  # points per oracle call of the estimate (B_t rounded up to a multiple)
    gamma: float = 1.0  # theta = gamma / d^{3/2} (l2) or gamma / d^2 (linf)
    delta_first: float = 0.1  # probe radius at t = 1
    max_halvings: int = 10  # geometric step-size search length
    max_bisect: int = 25  # cap on boundary-search halvings (needs log2(1/theta): 9 (l2) / 12 (linf) at d = 64)
    start_candidates: int = 10
    start_steps: int = 5

    def __post_init__(self):
        C.check_common(self)
        C.check_int("init_evals", self.init_evals)
        C.check_int("max_evals", self.max_evals)
        C.check_int("chunk", self.chunk)
        C.check_int("max_halvings", self.max_halvings, 0)
        C.check_int("max_bisect", self.max_bisect)
        C.check_real("gamma", self.gamma)
        C.check_real("delta_first", self.delta_first)
        if self.max_evals < self.init_evals:
            raise ValueError(f"max_evals ({self.max_evals}) must be >= init_evals ({self.init_evals})")


class HSJAState(NamedTuple):
    x: jax.Array  # best adversarial point so far (x0 until a start is found)
    x0: jax.Array
    cls: jax.Array  # target (targeted) or true label
    key: jax.Array
    step: jax.Array
    done: jax.Array
    failed: jax.Array
    found: jax.Array
    tries: jax.Array  # starting-point search steps made
    dist: jax.Array  # distance of x (inf until found)
    xb: jax.Array  # current boundary iterate x_t
    dist_b: jax.Array  # its distance d_t
    t: jax.Array  # HSJA iteration counter (1-based)


class HSJAInfo(NamedTuple):
    loss: jax.Array  # distance of the best adversarial point (inf before a start is found)
    queries: jax.Array  # points asked this step
    evals: jax.Array  # gradient-estimate points this step


def hsja(cfg: HSJAConfig, pool: C.Pool = C.Pool(None, None)) -> Attack:
    """Build HopSkipJumpAttack for ``cfg``; ``pool`` holds training images for starting points."""
    norm, targeted = cfg.norm, cfg.targeted

    def init(key, x0, label, target):
        x0 = jnp.asarray(x0, jnp.float32)
        cls = jnp.asarray(target if targeted else label, jnp.int32)
        z, f, inf = jnp.zeros((), jnp.int32), jnp.zeros((), bool), jnp.asarray(jnp.inf, jnp.float32)
        return HSJAState(x0, x0, cls, key, z, f, f, f, z, inf, x0, inf, jnp.ones((), jnp.int32))

    def params(shape):
        dim = math.prod(shape)
        theta = cfg.gamma / (dim * math.sqrt(dim)) if norm == "l2" else cfg.gamma / dim ** 2
        return dim, theta, min(C.halvings(theta) + 1, cfg.max_bisect)

    def step(pool, state: HSJAState, oracle):
        dim, theta, n_bisect = params(state.x0.shape)
        k = jax.random.fold_in(state.key, state.step)
        k_start, k_grad = jax.random.split(k)
        x0, cls = state.x0, state.cls

        def search(c):
            st, off, evals, _, _, pc = c
            s, off = C.start_step(oracle, off, k_start, x0, cls, st.tries, cfg, pool)
            st = st._replace(found=s.found, failed=s.failed, tries=s.tries)
            return st, off, evals, s.x, s.found, pc  # the start, to bisect to the boundary when found

        def iterate(c):
            st, off, _, x_q, bisect, _ = c
            t = st.t
            tf = t.astype(jnp.float32)
            xb, db = st.xb, st.dist_b
            # gradient-direction estimate at the boundary point
            scale = math.sqrt(dim) * theta if norm == "l2" else dim * theta
            delta = jnp.where(t == 1, cfg.delta_first, scale * db)
            n_chunks = jnp.minimum(jnp.ceil(cfg.init_evals * jnp.sqrt(tf) / cfg.chunk),
                                   math.ceil(cfg.max_evals / cfg.chunk)).astype(jnp.int32)

            def chunk_body(cc):
                i, off, s_fu, s_f, s_u = cc
                kk = jax.random.fold_in(k_grad, i)
                shape = (cfg.chunk,) + xb.shape
                if norm == "l2":
                    u = jax.random.normal(kk, shape)
                else:
                    u = jax.random.uniform(kk, shape, minval=-1.0, maxval=1.0)
                u = C.unit_rows(u)
                pts = jnp.clip(xb[None] + delta * u, 0.0, 1.0)
                u = jnp.where(delta > C.TINY, (pts - xb[None]) / jnp.maximum(delta, C.TINY), u)
                adv, off = C.ask(oracle, off, pts, cls, targeted)
                f = jnp.where(adv, 1.0, -1.0)
                return i + 1, off, s_fu + jnp.tensordot(f, u, axes=1), s_f + f.sum(), s_u + u.sum(0)

            zero = jnp.zeros_like(xb)
            n, off, s_fu, s_f, s_u = live_while(
                lambda cc: cc[0] < n_chunks, chunk_body, (jnp.zeros((), jnp.int32), off, zero, jnp.zeros(()), zero))
            evals = (n * cfg.chunk).astype(jnp.float32)
            mean_f = C.safe_div(s_f, evals)
            unanimous = jnp.abs(mean_f) >= 1.0
            g = jnp.where(unanimous, mean_f * C.safe_div(s_u, evals), C.safe_div(s_fu - mean_f * s_u, evals))
            v = C.unit(g) if norm == "l2" else jnp.sign(g)
            # the geometric step-size search runs in the boundary search's loop (below)
            return st._replace(t=t + 1), off, n * cfg.chunk, x_q, bisect, (jnp.zeros((), jnp.int32), db / jnp.sqrt(tf),
                                                                          jnp.zeros((), bool), xb, v)

        # geometric step-size search: xi halved until xb + xi v is adversarial (carry: j, xi, ok, xb, v)
        step_search = C.OnePoint(
            going=lambda c: (c[0] <= cfg.max_halvings) & ~c[2],
            point=lambda c: jnp.clip(c[3] + c[1] * c[4], 0.0, 1.0),
            update=lambda c, adv: (c[0] + 1, jnp.where(adv, c[1], 0.5 * c[1]), adv, c[3], c[4]),
            result=lambda c: (jnp.clip(c[3] + c[1] * c[4], 0.0, 1.0), c[2]))
        # one loop asks the step search's points and one boundary search's, for both phases (one copy of the
        # model in the program): the boundary search bisects the start found by a search step, or the point
        # an iteration's step search moved to
        zero, no = jnp.zeros((), jnp.int32), jnp.zeros((), bool)
        idle = (zero, jnp.zeros((), jnp.float32), no, x0, jnp.zeros_like(x0))
        carry = C.run_if(~state.found, search, (state, zero, zero, x0, no, idle))
        st, off, evals, x_q, bisect, pc = C.run_if(state.found, iterate, carry)
        x_b, bisected, _, off = C.then_boundary(oracle, off, x0, norm, theta, n_bisect, cls, targeted, step_search, pc,
                                                state.found, x_q, bisect)
        st = st._replace(**C.after_boundary(state.found, st, x_b, bisected, lambda x: C.distance(x, x0, norm)))
        st = st._replace(step=state.step + 1, done=C.is_done(st.found, st.dist, cfg.eps))
        return st, HSJAInfo(loss=st.dist, queries=off, evals=evals)

    evals_max = math.ceil(cfg.max_evals / cfg.chunk) * cfg.chunk
    cost = max(cfg.start_candidates, evals_max + cfg.max_halvings + 1) + cfg.max_bisect
    return Attack(init=init, step=Partial(step, pool), cost=cost, output="label", targeted=targeted)



@dataclasses.dataclass(frozen=True)
class HSJALinfConfig(HSJAConfig):
    """The l_inf HopSkipJumpAttack (registered as ``hsja_linf``): ``norm`` is ``"linf"``.

    ``make_attack("hsja_linf")`` builds the l_inf attack without a ``norm`` argument; passing
    ``norm="linf"`` is accepted, any other norm raises (the l_2 attack is ``hsja``).
    """

    norm: str = "linf"

    def __post_init__(self):
        if self.norm != "linf":
            raise ValueError(f"hsja_linf is the l_inf HopSkipJumpAttack; got norm {self.norm!r} "
                             "(the l_2 attack is registered as 'hsja')")
        super().__post_init__()


_BAD = (dict(norm="l1"), dict(eps=0.0), dict(eps=float("nan")), dict(init_evals=0), dict(max_evals=10),
        dict(chunk=0), dict(gamma=-1.0), dict(delta_first=0.0), dict(max_halvings=-1), dict(start_candidates=0),
        dict(start_steps=0), dict(max_bisect=0))
_NEEDS = ("train_images", "train_labels")

register(AttackSpec(name="hsja", config=HSJAConfig, build=lambda cfg, ctx: hsja(cfg, C.make_pool(ctx)),
                    family="decision", needs=_NEEDS, bad_configs=_BAD,
                    battery=dict(norm="l2", eps=BATTERY_EPS["l2"], budget=2_000)))
register(AttackSpec(name="hsja_linf", config=HSJALinfConfig, build=lambda cfg, ctx: hsja(cfg, C.make_pool(ctx)),
                    family="decision", needs=_NEEDS, bad_configs=_BAD + (dict(norm="l2"),),
                    battery=dict(norm="linf", eps=BATTERY_EPS["linf"], budget=2_000)))
