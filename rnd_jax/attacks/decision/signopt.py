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
batch (OPT, with ten times more local searches per step, floors its tolerance at 1e-3).

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
from typing import NamedTuple

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


class SignOPTState(NamedTuple):
    x: jax.Array  # best adversarial point
    x0: jax.Array
    cls: jax.Array
    key: jax.Array
    step: jax.Array
    done: jax.Array
    failed: jax.Array
    found: jax.Array
    tries: jax.Array
    dist: jax.Array  # l2 distance of x
    theta: jax.Array  # unit search direction
    g: jax.Array  # g(theta)
    alpha: jax.Array
    beta: jax.Array


class SignOPTInfo(NamedTuple):
    loss: jax.Array  # distance of the best point
    queries: jax.Array
    g: jax.Array  # g(theta) after the step


def start_ray(oracle, offset, key, st, cfg, pool, tol):
    """Shared start of the OPT family: find a start, bisect along its ray: (found, failed, tries, theta, g, off)."""
    s, offset = C.start_step(oracle, offset, key, st.x0, st.cls, st.tries, cfg, pool)
    lam_s = C.distance(s.x, st.x0, "l2")
    theta = C.unit(s.x - st.x0)
    point = lambda lam: C.ray_point(st.x0, theta, lam)
    n_bisect = C.halvings(tol / 8.0) + 3  # enough for distances up to 8 (the l2 diameter of an 8x8 image)
    _, g, offset = C.run_if(s.found, lambda c: C.bisect(oracle, c[2], point, c[0], c[1], tol, n_bisect, st.cls,
                                                         cfg.targeted), (jnp.zeros(()), lam_s, offset))
    return s, theta, g, offset, n_bisect


def signopt(cfg: SignOPTConfig, pool: C.Pool = C.Pool(None, None)) -> Attack:
    """Build Sign-OPT for ``cfg``; ``pool`` holds training images for starting points."""
    targeted, K = cfg.targeted, cfg.k
    n_start = C.halvings(cfg.start_tol / 8.0) + 3

    def init(key, x0, label, target):
        x0 = jnp.asarray(x0, jnp.float32)
        cls = jnp.asarray(target if targeted else label, jnp.int32)
        z, f, inf = jnp.zeros((), jnp.int32), jnp.zeros((), bool), jnp.asarray(jnp.inf, jnp.float32)
        return SignOPTState(x0, x0, cls, key, z, f, f, f, z, inf, jnp.zeros_like(x0), inf,
                            jnp.asarray(cfg.alpha, jnp.float32), jnp.asarray(cfg.beta, jnp.float32))

    def step(state: SignOPTState, oracle):
        k = jax.random.fold_in(state.key, state.step)
        k_start, k_u = jax.random.split(k)
        x0, cls = state.x0, state.cls

        def search(c):
            st, off = c
            s, theta, g, off, _ = start_ray(oracle, off, k_start, st, cfg, pool, cfg.start_tol)
            x = C.ray_point(x0, theta, g)
            d = C.distance(x, x0, "l2")
            st = st._replace(found=s.found, failed=s.failed, tries=s.tries,
                             theta=jnp.where(s.found, theta, st.theta), g=jnp.where(s.found, g, st.g),
                             x=jnp.where(s.found, x, st.x), dist=jnp.where(s.found, d, st.dist))
            return st, off

        def iterate(c):
            st, off = c
            theta, g, beta = st.theta, st.g, st.beta
            u = C.unit_rows(jax.random.normal(k_u, (K,) + theta.shape))
            th_k = C.unit_rows(theta[None] + beta * u)
            adv, off = C.ask(oracle, off, jax.vmap(lambda t: C.ray_point(x0, t, g))(th_k), cls, targeted)
            s = jnp.tensordot(jnp.where(adv, -1.0, 1.0), u, axes=1) / K
            tol = jnp.maximum(beta / 500.0, cfg.min_tol)
            ls = C.opt_line_search(oracle, off, x0, theta, g, s, st.alpha, tol, cls, targeted, cfg.max_trials,
                                   cfg.max_scale, cfg.max_bisect, off + cfg.ls_queries)
            reset = ls.alpha < 1e-4
            x_new = C.ray_point(x0, ls.theta, ls.g)
            d_new = C.distance(x_new, x0, "l2")
            x, dist = C.keep_best(st.x, st.dist, x_new, d_new, ls.g < g)
            st = st._replace(theta=ls.theta, g=ls.g, alpha=jnp.where(reset, 1.0, ls.alpha),
                             beta=jnp.where(reset, jnp.maximum(0.1 * beta, cfg.min_beta), beta), x=x, dist=dist)
            return st, ls.offset

        zero = jnp.zeros((), jnp.int32)
        st, off = C.run_if(~state.found, search, (state, zero))
        st, off = C.run_if(state.found, iterate, (st, off))
        st = st._replace(step=state.step + 1, done=C.is_done(st.found, st.dist, cfg.eps))
        return st, SignOPTInfo(loss=st.dist, queries=off, g=st.g)

    cost = max(cfg.start_candidates + n_start, K + cfg.ls_queries)
    return Attack(init=init, step=step, cost=cost, output="label", targeted=targeted)


register(AttackSpec(
    name="signopt", config=SignOPTConfig, build=lambda cfg, ctx: signopt(cfg, C.make_pool(ctx)), family="decision",
    needs=("train_images", "train_labels"),
    battery=dict(norm="l2", eps=BATTERY_EPS["l2"], budget=2_000),
    bad_configs=(dict(norm="linf"), dict(eps=-1.0), dict(k=0), dict(alpha=0.0), dict(beta=float("inf")),
                 dict(ls_queries=5), dict(max_trials=0), dict(start_candidates=0), dict(start_tol=0.0))))
