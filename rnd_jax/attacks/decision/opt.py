"""OPT: hard-label attack as zeroth-order optimization of the boundary distance (l_2).

Cheng, Le, Chen, Zhang, Yi & Hsieh, "Query-Efficient Hard-label Black-box Attack: An
Optimization-based Approach", ICLR 2019 (arXiv:1807.04457).

The attack minimizes ``g(theta)`` (their eq. 3), the distance from ``x0`` to the decision boundary
along the unit direction ``theta``, with the randomized gradient-free estimate of their eq. (5)
(Nesterov & Spokoiny):

    grad ~= 1/q sum_{i=1..q} (g(unit(theta + beta u_i)) - g(theta)) / beta * u_i,   u_i unit Gaussian,

each ``g`` evaluated by the fine-grained local search of their Alg. 2 (``_common.ray_search``: a
probe at the current ``g``, 1% steps out or in, then bisection to ``beta / 500``). The step
``theta <- unit(theta - alpha grad)`` comes from the line search shared with Sign-OPT
(``_common.opt_line_search``); as in the reference implementation the best probe direction
replaces the line-search result when it is better, and ``alpha < 1e-4`` resets ``alpha`` to 1 and
shrinks ``beta`` tenfold (floored at ``min_beta``). A probe whose 1% expansions never reach an
adversarial point contributes its last upper end as ``g`` (the reference returns ``inf`` there,
which turns the estimate into NaN).

Defaults: ``alpha = 0.2`` and ``q = 10`` random directions per estimate (the reference
implementation's; the paper's text uses ``q = 20``). The reference's ``beta = 1e-3`` with tolerance
``beta / 500 = 2e-6`` places OPT's many local-search queries (about 15 searches per step) within
float32 rounding of the boundary, where the model's answer changes with the batch shape it is
evaluated in (probabilities differ by ~1 ulp between batches of 1 and of 4+ points), so a run would
depend on the other images of its batch. Here the tolerance is floored at ``min_tol = 1e-3`` and,
to keep the finite differences ``g(theta + beta u) - g(theta)`` well above it, ``beta = 0.01``
(floored at ``min_beta = 1e-3``); on 8x8 digits this reaches the same distances as the reference
setting at 2000 queries. Start as in Sign-OPT: a training image
of another / the target class or a noise image, bisected along its ray. Worst case of a step:
``q (1 + max_scale + max_bisect) + ls_queries``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rnd_jax.attacks.decision import _common as C
from rnd_jax.attacks.driver import Attack
from rnd_jax.attacks.registry import BATTERY_EPS, AttackSpec, register


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    eps: float | None = None  # stop once the best adversarial point is within eps; None: run to budget
    norm: str = "l2"  # OPT is an l2 attack
    targeted: bool = False
    q: int = 10  # random directions per gradient estimate
    alpha: float = 0.2
    beta: float = 0.01
    max_trials: int = 15
    ls_queries: int = 150  # line-search allowance per step
    max_scale: int = 10  # 1% expansions / shrinks of a local search
    max_bisect: int = 25
    min_tol: float = 1e-3  # floor of the search tolerance beta / 500 (see the module docstring)
    min_beta: float = 1e-3  # floor of beta after its tenfold shrinks
    start_tol: float = 1e-3
    start_candidates: int = 10
    start_steps: int = 5

    def __post_init__(self):
        C.check_common(self, norms=("l2",))
        for name in ("q", "max_trials", "max_scale", "max_bisect"):
            C.check_int(name, getattr(self, name))
        for name in ("alpha", "beta", "start_tol", "min_tol", "min_beta"):
            C.check_real(name, getattr(self, name))
        C.check_int("ls_queries", self.ls_queries, 1 + self.max_scale + self.max_bisect)


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

        off, grad, g_min, th_min = jax.lax.fori_loop(0, q, probe, (off, jnp.zeros_like(theta), jnp.asarray(jnp.inf),
                                                                   theta))
        return grad / q, off, g_min, th_min

    return C.ray_attack(cfg, pool, estimate, q * (1 + cfg.max_scale + cfg.max_bisect))


register(AttackSpec(
    name="opt", config=OPTConfig, build=lambda cfg, ctx: opt(cfg, C.make_pool(ctx)), family="decision",
    needs=("train_images", "train_labels"),
    battery=dict(norm="l2", eps=BATTERY_EPS["l2"], budget=2_000),
    bad_configs=(dict(norm="linf"), dict(eps=0.0), dict(q=0), dict(alpha=-0.2), dict(beta=0.0),
                 dict(ls_queries=3), dict(max_scale=0), dict(start_steps=0))))
