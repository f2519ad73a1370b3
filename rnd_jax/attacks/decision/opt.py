"""OPT: hard-label attack as zeroth-order optimization of the boundary distance (l_2).

Cheng, Le, Chen, Zhang, Yi & Hsieh, "Query-Efficient Hard-label Black-box Attack: An
Optimization-based Approach", ICLR 2019 (arXiv:1807.04457).

The attack minimizes ``g(theta)`` (their eq. 3), the distance from ``x0`` to the decision boundary
along the unit direction ``theta``, with the randomized gradient-free estimate of their eq. (5)
(Nesterov & Spokoiny):

    grad ~= 1/q sum_{i=1..q} (g(unit(theta + beta u_i)) - g(theta)) / beta * u_i,   u_i unit Gaussian,

each ``g`` evaluated by the fine-grained local search of their Alg. 2 (``_common.ray_search``: a
probe at the current ``g``, 1% steps out or in, then bisection to the tolerance ``tol``). The step
``theta <- unit(theta - alpha grad)`` comes from the line search shared with Sign-OPT
(``_common.opt_line_search``); as in the reference implementation the best probe direction
replaces the line-search result when it is better, and ``alpha < 1e-4`` resets ``alpha`` to 1 and
shrinks ``beta`` tenfold, floored at ``min_beta`` (the reference stops the attack once ``beta``
falls below half its initial value; here the run goes on to its budget at the floor). A probe whose
1% expansions never reach an adversarial point contributes its last upper end as ``g`` (the
reference returns ``inf`` there, which turns the estimate into NaN).

Search tolerance. A finite difference ``g(unit(theta + beta u)) - g(theta)`` is of order
``beta * g`` (turning a unit direction by ``beta`` moves the point at distance ``g`` by about
``beta * g``), so each ``g`` must be resolved far more finely than that. The reference bisects to
``beta / 500`` at its distances of order 1; here ``tol = beta * g / tol_ratio`` with ``tol_ratio =
50``, floored at ``min_tol = 1e-6``: the tolerance follows ``beta`` down through its shrinks and
follows ``g`` down as the attack closes in (a fixed tolerance that is not far below ``beta * g``
turns the estimate into bisection noise, and the attack stops moving once ``beta`` has shrunk),
while the early, far-away searches stay cheap.

Defaults: ``alpha = 0.2`` and ``q = 10`` random directions per estimate (the reference
implementation's; the paper's text uses ``q = 20``); ``beta = 0.02`` shrinking to
``min_beta = 2e-3``: the reference's ``beta = 1e-3`` with ``tol = 2e-6`` is for 784- and
3072-pixel images; on 8x8 digits the larger ``beta`` with the relative tolerance reaches the same
distances by 10 000 queries and closer ones at 500-2 000 queries (mean over 10 undefended
untargeted digits: 0.60 / 0.55 / 0.52 at 1 000 / 2 000 / 10 000 queries, against 0.59 / 0.56 /
0.55 with a fixed tolerance of 1e-3 and ``beta`` floored at 1e-3, which stalls after its first
shrink of ``beta``). The answers of points within ``tol`` of the boundary can depend on the batch
shape the model is evaluated in (float32 probabilities differ by ~1 ulp between batches of 1 and
of 4+ points), so over a long run an image attacked alone can part from the same image inside a
batch in its last digits (as for every decision attack that bisects to the boundary; coarser
tolerances only make it rarer). Start as in Sign-OPT: a training image of another / the target
class or a noise image, bisected along its ray. Worst case of a step:
``q (1 + max_scale + max_bisect) + ls_queries``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rnd_jax.attacks.decision import _common as C
from rnd_jax.attacks.driver import Attack
from rnd_jax.attacks.registry import BATTERY_EPS, AttackSpec, register
from rnd_jax.oracle import live_while


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    eps: float | None = None  # stop once the best adversarial point is within eps; None: run to budget
    norm: str = "l2"  # OPT is an l2 attack
    targeted: bool = False
    q: int = 10  # random directions per gradient estimate
    alpha: float = 0.2
    beta: float = 0.02  # direction smoothing radius (initial)
    max_trials: int = 15
    ls_queries: int = 150  # line-search allowance per step
    max_scale: int = 10  # 1% expansions / shrinks of a local search
    max_bisect: int = 25
    tol_ratio: float = 50.0  # search tolerance beta * g / tol_ratio (see the module docstring)
    min_tol: float = 1e-6  # floor of the search tolerance
    min_beta: float = 2e-3  # floor of beta after its tenfold shrinks
    start_tol: float = 1e-3
    start_candidates: int = 10
    start_steps: int = 5
    lockstep: bool = False  # run the q probe searches side by side (see the module docstring)

    def __post_init__(self):
        C.check_common(self, norms=("l2",))
        if not isinstance(self.lockstep, bool):
            raise ValueError(f"lockstep must be a bool, got {self.lockstep!r}")
        for name in ("q", "max_trials", "max_scale", "max_bisect"):
            C.check_int(name, getattr(self, name))
        for name in ("alpha", "beta", "start_tol", "min_tol", "min_beta", "tol_ratio"):
            C.check_real(name, getattr(self, name))
        C.check_int("ls_queries", self.ls_queries, 1 + self.max_scale + self.max_bisect)
        if self.min_beta > self.beta:
            raise ValueError(f"min_beta ({self.min_beta}) must be <= beta ({self.beta})")
        if self.tol_ratio < 10:
            raise ValueError(f"tol_ratio must be >= 10 (the search tolerance must stay far below beta * g), "
                             f"got {self.tol_ratio!r}")

    def tolerance(self, beta, g):
        """Width of the local searches of a step at ``beta`` and ``g(theta)``."""
        return jnp.maximum(beta * g / self.tol_ratio, self.min_tol)


def opt(cfg: OPTConfig, pool: C.Pool = C.Pool(None, None)) -> Attack:
    """Build OPT for ``cfg``; ``pool`` holds training images for starting points."""
    q = cfg.q

    def estimate(oracle, off, key, x0, theta, g, beta, tol, cls):
        u = C.unit_rows(jax.random.normal(key, (q,) + theta.shape))

        def probe(i, cc):
            off, grad, g_min, th_min = cc
            th = C.unit(theta + beta * u[i])
            g_i, _, off = C.ray_search(oracle, off, x0, th, g, tol, cfg.max_scale, cfg.max_bisect, cls, cfg.targeted,
                                       True)
            better = g_i < g_min
            return off, grad + (g_i - g) / beta * u[i], jnp.where(better, g_i, g_min), jnp.where(better, th, th_min)

        # a live_while (not a bare fori_loop): the probes' answers are watched for non-finite scores
        init = (jnp.zeros((), jnp.int32), (off, jnp.zeros_like(theta), jnp.asarray(jnp.inf), theta))
        _, (off, grad, g_min, th_min) = live_while(lambda c: c[0] < q, lambda c: (c[0] + 1, probe(c[0], c[1])), init)
        return grad / q, off, g_min, th_min

    def estimate_lockstep(oracle, off, key, x0, theta, g, beta, tol, cls):
        u = C.unit_rows(jax.random.normal(key, (q,) + theta.shape))
        ths = jax.vmap(lambda ui: C.unit(theta + beta * ui))(u)
        g_all, _, off = C.ray_searches(oracle, off, x0, ths, g, tol, cfg.max_scale, cfg.max_bisect, cls,
                                       cfg.targeted, True)

        def add(i, cc):  # in probe order, as the probe-by-probe loop adds them
            grad, g_min, th_min = cc
            better = g_all[i] < g_min
            return grad + (g_all[i] - g) / beta * u[i], jnp.where(better, g_all[i], g_min), jnp.where(better, ths[i],
                                                                                                      th_min)

        grad, g_min, th_min = jax.lax.fori_loop(0, q, add, (jnp.zeros_like(theta), jnp.asarray(jnp.inf), theta))
        return grad / q, off, g_min, th_min

    return C.ray_attack(cfg, pool, estimate_lockstep if cfg.lockstep else estimate,
                        q * (1 + cfg.max_scale + cfg.max_bisect), cfg.tolerance)


register(AttackSpec(
    name="opt", config=OPTConfig, build=lambda cfg, ctx: opt(cfg, C.make_pool(ctx)), family="decision",
    needs=("train_images", "train_labels"),
    battery=dict(norm="l2", eps=BATTERY_EPS["l2"], budget=2_000),
    bad_configs=(dict(norm="linf"), dict(eps=0.0), dict(q=0), dict(alpha=-0.2), dict(beta=0.0),
                 dict(ls_queries=3), dict(max_scale=0), dict(start_steps=0), dict(tol_ratio=5.0), dict(lockstep=1),
                 dict(min_beta=0.1))))
