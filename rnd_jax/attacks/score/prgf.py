"""P-RGF: prior-guided random gradient-free estimation with a transfer-based prior.

Cheng, Dong, Pang, Su & Zhu, "Improving Black-box Adversarial Attacks with a Transfer-based
Prior", NeurIPS 2019, Algorithm 1 (P-RGF_lambda*) with the optimal lambda of Theorem 1 / eq. (12).

The attacker owns a surrogate model (trained separately: another seed or architecture) and uses
the gradient ``v`` of the surrogate's loss at the current point as a prior. With ``f`` the objective
the attack ascends (``f = -loss`` for the minimised losses of :mod:`rnd_jax.losses`), ``d = H*W*C``
and all directions scaled to unit RMS (``||u||_2 = sqrt(d)``, as in the reference code):

1. the cosine ``alpha = v.grad f / (||v|| ||grad f||)`` is estimated from
   ``(f(x + sigma*v) - f(x)) / sigma`` and an estimate of ``||grad f||^2`` (the mean of
   ``((f(x + sigma*u_i) - f(x)) / sigma)^2`` over ``S`` random directions, refreshed every
   ``norm_every`` steps and at step 3); a negative ``alpha`` flips ``v``;
2. eq. (12): ``lambda* = 0`` if ``alpha^2 <= 1/(d + 2q - 2)``, ``1`` if
   ``alpha^2 >= (2q - 1)/(d + 2q - 2)``, else
   ``(1 - alpha^2)(alpha^2 (d + 2q - 2) - 1) / (2 alpha^2 d q - alpha^4 d (d + 2q - 2) - 1)``;
3. if ``lambda* = 1`` the estimate is ``v`` itself; otherwise ``q`` directions
   ``u_i = sqrt(lambda*) v + sqrt(1 - lambda*) xi_i``, with ``xi_i`` Gaussian directions made
   orthogonal to ``v`` (unit RMS), give ``g = mean_i (f(x + sigma*u_i) - f(x)) u_i``;
4. ``x <- Proj(x + lr * g / RMS(g))`` (l_2: a step of l_2 length ``lr``) or
   ``x <- Proj(x + lr * sign(g))`` (l_inf), projected onto the eps-ball and [0, 1].

Queries. Every step asks, in one plain batch, the current point ``x`` (the success check: the
attack stops there if the answer is adversarial; its loss is ``f(x)``) and the prior probe
``x + sigma*v``. The rest depends on answers, as in the reference implementation: ``S`` norm
probes on the steps that refresh the norm estimate, and ``q`` probes unless ``lambda* = 1``.
These are asked with ``oracle.at`` inside :func:`rnd_jax.oracle.live_cond` (under ``vmap`` a ``lax.cond``
would run the model with one copy of its weights per image) and reported in ``Info.queries``; the
declared ``cost = 2 + S + q`` is the worst case. A step whose first answer is already adversarial
asks nothing more. The reference code likewise counts the loss query at each new point, which is
also its success check.

The transfer gradient is ``jax.grad`` through the surrogate scorer (the attacker's own white-box
model, never the oracle), computed inside a driver loop for the live images only
(:func:`rnd_jax.compact.on_live`). The surrogate loss is the attack's loss on the surrogate's probabilities.

Defaults (``PRGFConfig``), scaled to the image: the paper uses ``q = 50`` directions on ImageNet (``d = 268,203``), i.e. far fewer directions than dimensions; on the 8x8 digits
(``d = 64``) 50 directions would nearly span the space, so ``q = 10`` and ``S = 10`` norm probes
(the reference's ``s = 10``). ``sigma = 1e-3`` in RMS units: the reference uses 1e-4 for plain models
and 1e-3 for its randomized and JPEG-defended ones; our oracle answers float32 probabilities, whose
logarithms carry relative errors near 1e-6 (and differ in the last bits between batch sizes), so
the larger step keeps every finite difference far above that floor. The l_2 step is ``eps/8`` (the reference's 2.0 for ``eps = sqrt(1e-3 d) = 16.4``) and the l_inf
step ``eps/10`` (0.005 for 0.05). The loss is the reference's cross-entropy (untargeted: ``log F_y``
pushed down; targeted: ``-log F_t``), here computed from the oracle's probabilities where the
reference uses logits; the margin losses (``margin``, ``cw``) are selectable. From float32
probabilities ``log F_y`` moves in steps of one ulp of ``F_y`` once ``F_y`` is within a few ulps of
1, and the surrogate's gradient of it nearly vanishes there: of the registry battery's ten images
one (``F_y = 1 - 9.5e-7``) did not leave ``x0`` within 2,000 queries of the l_inf attack (the
margin loss fools all ten); over 50 undefended images the l_inf cross-entropy attack fooled 98%
(mean 37 queries), the margin 100% (mean 80). Not reproduced: the reference's doubling of ``sigma`` when a finite difference is exactly 0
(meant for quantized outputs such as JPEG defenses, and the remedy for that flat loss), and its
data-dependent prior variant (P-RGF_D).

Registered configuration: the paper's l_2 attack at the battery's eps = 2.0 and the paper's budget
of 10,000 queries; it fools all ten battery images, targeted and untargeted, undefended. On digits
``alpha`` is large (0.4-0.8 for a surrogate of another seed) and ``lambda* = 1`` whenever
``alpha >= sqrt((2q-1)/(d+2q-2)) = 0.48``, so most steps follow the transfer gradient alone at 2
queries a step. The l_inf attack (``norm="linf"``, sign steps of eps/10) can stall there: on two of
the ten targeted battery images at eps = 0.3 the iterate alternates between two points (the loss
between 4.69 and 4.67) with ``lambda* = 1`` at every step, until the budget runs out. Replay: with
the same queries and decisions, one image alone and inside a batch can end 1e-3 apart after 20 l_2
steps, because ``alpha`` and ``lambda*`` divide finite differences by ``sigma`` and XLA rounds the
attack's own reductions differently when they are batched; sign steps (l_inf) replay bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from rnd_jax import compact, losses
from rnd_jax.attacks.driver import Attack
from rnd_jax.attacks.registry import BATTERY_EPS, AttackSpec, register
from rnd_jax.attacks.score.nes import is_adversarial, project
from rnd_jax.oracle import live_cond

NORMS = ("linf", "l2")


def _int(name, v, minimum):
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"P-RGF {name} must be an int >= {minimum}, got {v!r}")


@dataclasses.dataclass(frozen=True)
class PRGFConfig:
    """P-RGF hyper-parameters; see the module docstring for the defaults."""

    eps: float = 2.0
    norm: str = "l2"  # the paper's main threat model; "linf" also supported
    targeted: bool = False
    samples: int = 10  # q: directions per gradient estimate
    norm_samples: int = 10  # S: directions for the ||grad f|| estimate
    norm_every: int = 10  # refresh the ||grad f|| estimate every this many steps (and at step 3)
    sigma: float = 1e-3  # finite-difference step, in RMS units of the direction
    lr: float | None = None  # step: l_2 length eps/8, or l_inf eps/10
    loss: str | None = None  # untargeted: "xent" (default) or "margin"; targeted: "xent" (default) or "cw"

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {NORMS}")
        for name in ("eps", "sigma"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"P-RGF {name} must be a finite number > 0, got {v!r}")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not (math.isfinite(self.lr) and self.lr > 0)):
            raise ValueError(f"P-RGF lr must be a finite number > 0, got {self.lr!r}")
        _int("samples", self.samples, 1)
        _int("norm_samples", self.norm_samples, 1)
        _int("norm_every", self.norm_every, 1)
        losses.check_goal("P-RGF", self.targeted, self.loss)

    @property
    def loss_name(self) -> str:
        return self.loss or "xent"

    @property
    def step_size(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return self.eps / 8 if self.norm == "l2" else self.eps / 10


class PRGFState(NamedTuple):
    x: jax.Array  # current point f32[H, W, C]
    x0: jax.Array
    cls: jax.Array  # i32: target if targeted, else true label
    key: jax.Array
    step: jax.Array  # i32
    done: jax.Array  # bool: the answer at x was adversarial
    norm_sq: jax.Array  # f32: the current estimate of ||grad f||^2 (directions of unit RMS)


class PRGFInfo(NamedTuple):
    loss: jax.Array  # loss at the current point (its answer this step)
    queries: jax.Array  # i32: points asked through oracle.at this step (norm probes + q probes)
    alpha: jax.Array  # estimated cosine between the transfer prior and the true gradient
    lam: jax.Array  # lambda* used this step


def optimal_lambda(alpha, d: int, q: int):
    """lambda* of Cheng et al. (2019), eq. (12), for cosine ``alpha``, dimension ``d``, ``q`` samples."""
    a2 = alpha * alpha
    m = d + 2 * q - 2
    num = (1.0 - a2) * (a2 * m - 1.0)
    den = 2.0 * a2 * d * q - a2 * a2 * d * m - 1.0
    mid = num / jnp.where(den == 0, 1.0, den)
    lam = jnp.where(a2 * m <= 1.0, 0.0, jnp.where(a2 * m >= 2 * q - 1, 1.0, mid))
    return jnp.clip(jnp.where(jnp.abs(alpha) >= 1.0, 1.0, lam), 0.0, 1.0)


def rms_normalize(t, batched: bool = False):
    """``t / RMS(t)`` (per leading index when ``batched``), guarded against 0."""
    axes = tuple(range(1, t.ndim)) if batched else None
    return t / jnp.maximum(1e-12, jnp.sqrt(jnp.mean(t * t, axis=axes, keepdims=batched)))


def prior_guided_directions(z, v, lam):
    """``u_i = sqrt(lam) v + sqrt(1 - lam) xi_i``: ``z [q, ...]`` Gaussian, made orthogonal to ``v`` and
    scaled to unit RMS (``v`` itself has unit RMS); Algorithm 1, lines 5-7."""
    xi = z - jnp.tensordot(jnp.tensordot(z, v, axes=v.ndim) / jnp.sum(v * v), v, axes=0)
    return jnp.sqrt(lam) * v + jnp.sqrt(1.0 - lam) * rms_normalize(xi, batched=True)


def _transfer_gradient(objective, surrogate, live, x, cls):
    """The gradient of ``objective`` on the surrogate's answer at ``x`` (``live`` unused: no loop inside)."""
    del live
    return jax.grad(lambda xs: objective(surrogate(xs[None], None)[0], cls))(x)


def prgf(cfg: PRGFConfig, surrogate: Any) -> Attack:
    """Build P-RGF for ``cfg`` with the transfer prior of ``surrogate`` (a clean scorer)."""
    if not callable(surrogate):
        raise ValueError("P-RGF needs a surrogate scorer (x, keys) -> probabilities for its transfer prior")
    loss_fn = (losses.TARGETED if cfg.targeted else losses.UNTARGETED)[cfg.loss_name]
    q, S, sigma = cfg.samples, cfg.norm_samples, cfg.sigma

    def objective(probs, cls):  # ascended
        return -loss_fn(probs, cls)

    def transfer_prior(surrogate, x, cls):  # the surrogate's gradient, computed for the live images only
        return compact.on_live(Partial(_transfer_gradient, objective, surrogate), x, cls)

    def init(key, x0, label, target):
        x0 = jnp.asarray(x0, jnp.float32)
        cls = jnp.asarray(target if cfg.targeted else label, jnp.int32)
        return PRGFState(x0, x0, cls, key, jnp.zeros((), jnp.int32), jnp.zeros((), bool), jnp.zeros((), jnp.float32))

    def step(surrogate, state: PRGFState, oracle):
        x, cls, d = state.x, state.cls, state.x.size
        # One draw for both kinds of random directions: S norm probes, then q search directions.
        z = jax.random.normal(jax.random.fold_in(state.key, state.step), (S + q,) + x.shape, jnp.float32)
        v = rms_normalize(transfer_prior(surrogate, x, cls))

        probs = oracle(jnp.stack([x, x + sigma * v]))
        success = is_adversarial(probs[0], cls, cfg.targeted)
        f = objective(probs, cls)
        fx = f[0]

        refresh = ~success & ((state.step % cfg.norm_every == 0) | (state.step == 3))

        def estimate_norm():
            u = rms_normalize(z[:S], batched=True)
            fu = objective(oracle.at(2, x + sigma * u), cls)
            return jnp.mean(((fu - fx) / sigma) ** 2)

        norm_sq = live_cond(refresh, estimate_norm, lambda: state.norm_sq)
        alpha = (f[1] - fx) / sigma / jnp.maximum(jnp.sqrt(d * norm_sq), 1e-12)
        v = jnp.where(alpha < 0, -v, v)
        alpha = jnp.abs(alpha)
        lam = optimal_lambda(alpha, d, q)
        sample = ~success & (lam < 1.0)

        def estimate_grad():
            u = prior_guided_directions(z[S:], v, lam)
            fu = objective(oracle.at(2 + S * refresh.astype(jnp.int32), x + sigma * u), cls)
            return jnp.tensordot(fu - fx, u, axes=1) / q

        g = live_cond(sample, estimate_grad, lambda: v)
        move = cfg.step_size * rms_normalize(g) / math.sqrt(d) if cfg.norm == "l2" else cfg.step_size * jnp.sign(g)
        x_new = project(x + move, state.x0, cfg.eps, cfg.norm)
        asked = S * refresh.astype(jnp.int32) + q * sample.astype(jnp.int32)
        new = PRGFState(x=jnp.where(success, x, x_new), x0=state.x0, cls=cls, key=state.key, step=state.step + 1,
                        done=success, norm_sq=norm_sq)
        return new, PRGFInfo(loss=-fx, queries=asked, alpha=alpha, lam=lam)

    return Attack(init=init, step=Partial(step, surrogate), cost=2 + S + q, output="scores", targeted=cfg.targeted)


register(AttackSpec(
    name="prgf", config=PRGFConfig, build=lambda cfg, ctx: prgf(cfg, ctx.surrogate), family="score",
    battery=dict(norm="l2", eps=BATTERY_EPS["l2"], budget=10_000), needs=("surrogate",),
    bad_configs=(dict(eps=0.0), dict(eps=float("nan")), dict(norm="l1"), dict(samples=0), dict(samples=2.0),
                 dict(norm_samples=0), dict(norm_every=0), dict(sigma=-1e-4), dict(lr=0.0), dict(loss="nope"),
                 dict(targeted=True, loss="margin"))))
