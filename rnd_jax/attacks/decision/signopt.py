"""Sign-OPT: hard-label attack by sign estimates of the boundary-distance gradient (l_2).

Cheng, Singh, Chen, Chen, Liu & Hsieh, "Sign-OPT: A Query-Efficient Hard-label Adversarial
Attack", ICLR 2020 (arXiv:1909.10773), building on OPT (Cheng et al., ICLR 2019).

The attack minimizes ``g(theta)``, the distance from ``x0`` to the decision boundary along the unit
direction ``theta`` (OPT's reformulation, their eq. 3), over directions. Its gradient is replaced by
the sign estimate of their eq. (5):

    s = 1/K sum_k sign(g(theta + beta u_k) - g(theta)) u_k,

where a single query per ``u_k`` decides the sign: ``x0 + g(theta) unit(theta + beta u_k)`` is
adversarial iff ``g`` decreased (sign -1). The ``K`` points go to the oracle in one batch. The
step ``theta <- unit(theta - alpha s)`` is chosen by the line search of the reference
implementation (``_common.opt_line_search``: double ``alpha`` while ``g`` improves, else quarter it
until it does); when ``alpha`` falls below ``1e-4`` it is reset to 1 and ``beta`` shrinks tenfold.
``g`` of a trial direction is evaluated with OPT's fine-grained local search (``_common.ray_search``)
to the tolerance ``beta / 500``; a trial whose point at the current ``g`` is not adversarial is
rejected with that one query (it cannot improve ``g``). The tolerance is floored at ``min_tol = 1e-4``
and ``beta`` at ``min_beta = 1e-4`` (the reference goes on shrinking ``beta`` to ``1e-8`` and then
stops): the model's float32 probabilities differ by about one ulp between batches of 1 and of 4+
points, so answers at points that close to the boundary would depend on how many images share the
batch. (OPT, whose finite differences need ``g`` resolved far below ``beta * g``, sets its own
tolerance relative to ``beta * g``; see :mod:`rnd_jax.attacks.decision.opt`.)

Ray points are clipped to [0, 1], so the reported distance ``||clip(x0 + g theta) - x0||_2`` is at
most ``g``. Start: a training image of another class (untargeted) or of the target class
(targeted; Sign-OPT's targeted initialization) or a uniform-noise image (``_common``), then a
bisection along its ray to width ``1e-3`` (the reference's initial search tolerance).

Defaults: the paper's ``alpha = 0.2``, ``beta = 1e-3``; ``K = 200`` in the paper is for
MNIST/CIFAR-10 (d = 784 / 3072); a 64-pixel digit needs fewer signs per estimate, and ``K = 100``
(still more than one per dimension) halves the cost of a step. The line search may spend at most ``ls_queries``
points per step (the worst case of the reference's 15 + 15 trials is far larger), so one step costs
at most ``K + ls_queries`` queries.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rnd_jax.attacks.decision import _common as C
from rnd_jax.attacks.driver import Attack
from rnd_jax.attacks.registry import BATTERY_EPS, AttackSpec, register


@dataclasses.dataclass(frozen=True)
class SignOPTConfig:
    eps: float | None = None  # stop once the best adversarial point is within eps; None: run to budget
    norm: str = "l2"  # Sign-OPT is an l2 attack
    targeted: bool = False
    k: int = 100  # K: sign queries per gradient estimate
    alpha: float = 0.2  # initial line-search step
    beta: float = 1e-3  # direction smoothing radius (search tolerance beta / 500)
    max_trials: int = 15  # line-search trials per direction (grow, then shrink)
    ls_queries: int = 150  # line-search allowance per step
    max_scale: int = 10  # 0.99^k shrinks of a local search
    max_bisect: int = 25
    min_tol: float = 1e-4  # floor of the search tolerance beta / 500 (see the module docstring)
    min_beta: float = 1e-4  # floor of beta after its tenfold shrinks
    start_tol: float = 1e-3  # width of the initial ray bisection (distance units)
    start_candidates: int = 10
    start_steps: int = 5

    def __post_init__(self):
        C.check_common(self, norms=("l2",))
        for name in ("k", "max_trials", "max_scale", "max_bisect"):
            C.check_int(name, getattr(self, name))
        for name in ("alpha", "beta", "start_tol", "min_tol", "min_beta"):
            C.check_real(name, getattr(self, name))
        C.check_int("ls_queries", self.ls_queries, 1 + self.max_scale + self.max_bisect)


def signopt(cfg: SignOPTConfig, pool: C.Pool = C.Pool(None, None)) -> Attack:
    """Build Sign-OPT for ``cfg``; ``pool`` holds training images for starting points."""
    K = cfg.k

    def estimate(oracle, off, key, x0, theta, g, beta, tol, cls):
        u = C.unit_rows(jax.random.normal(key, (K,) + theta.shape))
        th_k = C.unit_rows(theta[None] + beta * u)
        adv, off = C.ask(oracle, off, jax.vmap(lambda t: C.ray_point(x0, t, g))(th_k), cls, cfg.targeted)
        s = jnp.tensordot(jnp.where(adv, -1.0, 1.0), u, axes=1) / K
        return s, off, jnp.asarray(jnp.inf, jnp.float32), theta  # no probe competes with the line search

    return C.ray_attack(cfg, pool, estimate, K)


register(AttackSpec(
    name="signopt", config=SignOPTConfig, build=lambda cfg, ctx: signopt(cfg, C.make_pool(ctx)), family="decision",
    needs=("train_images", "train_labels"),
    battery=dict(norm="l2", eps=BATTERY_EPS["l2"], budget=2_000),
    bad_configs=(dict(norm="linf"), dict(eps=-1.0), dict(k=0), dict(alpha=0.0), dict(beta=float("inf")),
                 dict(ls_queries=5), dict(max_trials=0), dict(start_candidates=0), dict(start_tol=0.0))))
