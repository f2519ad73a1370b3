"""AutoZOOM without the autoencoder: random-vector gradient estimates, optionally in a bilinear
reduced-dimension space (AZ-Bi).

Tu, Ting, Chen, Liu, Zhang, Yi, Hsieh & Cheng, "AutoZOOM: Autoencoder-based Zeroth Order
Optimization Method for Attacking Black-box Neural Networks", AAAI 2019 (arXiv:1805.11770).

The attacker minimises the same C&W-style objective as ZOO (log-probability margin, floored at
``-kappa``), over a perturbation ``delta`` that lives in a space of dimension
``d'``::

    x(delta) = Proj(x0 + D(delta)),   F(delta) = ||x(delta) - x0||_2^2 + c * max(m(x(delta)), -kappa)

where ``D`` is the identity (``autozoom``: the random-vector estimator in the full image space) or
bilinear up-sampling from a ``r x r x C`` grid with ``jax.image.resize`` (``autozoom_bi``: AZ-Bi),
and Proj projects onto the eps-ball around ``x0`` and [0, 1]. The gradient is the averaged
random-vector estimate of the paper::

    g = (b / q) * sum_{j=1..q} (F(delta + beta u_j) - F(delta)) / beta * u_j,   u_j ~ Unif(unit sphere in R^d')

with ``beta = 1/d'`` and ``b = q`` as in the reference implementation (so the estimate is the sum
over the q directions; Adam is invariant to this scale up to its epsilon). One Adam step
(``optax.adam``, lr 0.01 for MNIST) updates ``delta``. The constant ``c`` follows the reference's
schedule before a first success: it starts at ``c = 1`` and is multiplied by 10 every
``switch_iters = 1000`` steps while no adversarial point has been found (the attack stops at the
first one, so the binary-search phase that refines ``c`` afterwards never runs).

One step sends ONE batch of ``q + 1`` points: the current point ``x(delta)`` (``F(delta)`` in the
estimate, and the success check) and the ``q`` probes ``x(delta + beta u_j)``. The probes are
projected like the iterate (as in the reference, which clips the modified image to the valid
range). ``q = 1`` is the reference's setting before the first success, so a step costs 2 queries:
this attack is few-points-per-oracle-call by design.

Reduced dimension: AZ-Bi on MNIST works at 14x14 (d'/d = 25%, the same size as the MNIST
autoencoder); ``reduced=None`` scales this to ``max(1, H // 2)`` (4x4 for 8x8 digits).
``jax.image.resize`` samples at half-pixel centres, the reference's TF resize used
``align_corners=True``; both are bilinear interpolations of the same grid. Not reproduced: the
autoencoder variant (AutoZOOM-AE) and the post-success stage (more directions, distortion
fine-tuning), which an attack stopping at its first success never reaches.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from rnd_jax.attacks.driver import Attack
from rnd_jax.attacks.registry import BATTERY_EPS, AttackSpec, register
from rnd_jax.attacks.score.nes import is_adversarial, project
from rnd_jax.attacks.score.zoo import margin_fn, objective

NORMS = ("linf", "l2")


@dataclasses.dataclass(frozen=True)
class AutoZOOMConfig:
    """AutoZOOM with random-vector estimates in the full image space (no dimension reduction)."""

    eps: float = 2.0  # radius of the perturbation ball around the original image
    norm: str = "l2"  # "l2" (the paper's distortion) or "linf"
    targeted: bool = True
    q: int = 1  # random directions per step
    beta: float | None = None  # smoothing radius; None = 1/d'
    c: float = 1.0  # initial weight of the margin term
    switch_iters: int = 1000  # steps between the x10 increases of c while unsuccessful
    kappa: float = 0.0  # confidence: the margin is floored at -kappa
    lr: float = 0.01  # Adam step size (reference setting for MNIST)
    beta1: float = 0.9
    beta2: float = 0.999

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {NORMS}")
        for name in ("eps", "c", "lr"):
            _check_positive(name, getattr(self, name))
        if self.beta is not None:
            _check_positive("beta", self.beta)
        if not (isinstance(self.kappa, (int, float)) and math.isfinite(self.kappa) and self.kappa >= 0):
            raise ValueError(f"AutoZOOM kappa must be a finite number >= 0, got {self.kappa!r}")
        for name in ("q", "switch_iters"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"AutoZOOM {name} must be an int >= 1, got {v!r}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
                raise ValueError(f"AutoZOOM {name} must be in [0, 1), got {v!r}")
        if not isinstance(self.targeted, bool):
            raise ValueError(f"AutoZOOM targeted must be a bool, got {self.targeted!r}")

    def latent_shape(self, image_shape) -> tuple[int, ...]:
        return tuple(image_shape)


@dataclasses.dataclass(frozen=True)
class AutoZOOMBiConfig(AutoZOOMConfig):
    """AZ-Bi: the perturbation is an ``r x r x C`` grid up-sampled bilinearly to the image."""

    reduced: int | None = None  # r; None = max(1, H // 2)

    def __post_init__(self):
        super().__post_init__()
        if self.reduced is not None and (isinstance(self.reduced, bool) or not isinstance(self.reduced, int)
                                         or self.reduced < 1):
            raise ValueError(f"AutoZOOM reduced size must be None or an int >= 1, got {self.reduced!r}")

    def latent_shape(self, image_shape) -> tuple[int, ...]:
        H, W, C = image_shape
        r = max(1, H // 2) if self.reduced is None else self.reduced
        if r > min(H, W):
            raise ValueError(f"AutoZOOM reduced size {r} exceeds the image size {H}x{W}")
        return (r, max(1, round(r * W / H)), C)


def _check_positive(name, v):
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
        raise ValueError(f"AutoZOOM {name} must be a finite number > 0, got {v!r}")


class AutoZOOMState(NamedTuple):
    x: jax.Array  # current point x(delta), f32[H, W, C]
    x0: jax.Array
    delta: jax.Array  # the optimised perturbation, f32[latent shape]
    cls: jax.Array  # i32: target class if targeted, else true label
    key: jax.Array
    step: jax.Array  # i32
    done: jax.Array  # bool: the answer at x was adversarial
    opt_state: optax.OptState


class AutoZOOMInfo(NamedTuple):
    loss: jax.Array  # objective F at the current point (from its answer)
    margin: jax.Array  # m(x) at the current point
    c: jax.Array  # the margin weight used this step


def decode(delta, image_shape):
    """``D(delta)``: the identity, or bilinear up-sampling of a reduced grid to ``image_shape``."""
    if delta.shape[-3:] == tuple(image_shape):
        return delta
    return jax.image.resize(delta, delta.shape[:-3] + tuple(image_shape), method="bilinear")


def unit_directions(key, q: int, shape):
    """``q`` directions uniform on the unit sphere of ``R^prod(shape)``: ``[q, *shape]``."""
    u = jax.random.normal(key, (q,) + tuple(shape), jnp.float32)
    n = jnp.sqrt(jnp.sum(u.reshape(q, -1) ** 2, axis=1))
    return u / n.reshape((q,) + (1,) * len(shape))


def random_vector_estimate(f0, f, u, beta: float):
    """``sum_j (f_j - f0) / beta * u_j`` (the paper's estimate with ``b = q``): ``f: [q]``, ``u: [q, *shape]``."""
    return jnp.tensordot((f - f0) / beta, u, axes=1)


def random_vector_step(cfg, adam, beta: float, to_image, state: AutoZOOMState, oracle):
    """One AutoZOOM step on ``state.delta``: ``q`` random-direction probes at ``to_image(delta + beta u, x0)``
    (and the current point), the random-vector gradient estimate, one Adam update of ``delta``; the point moves
    to ``to_image(delta, x0)`` unless the current one was adversarial. ``to_image`` maps (batched) codes to
    projected images: the decoded perturbation (AutoZOOM, AZ-Bi) or an autoencoder's (AutoZOOM-AE)."""
    u = unit_directions(jax.random.fold_in(state.key, state.step), cfg.q, state.delta.shape)
    probes = to_image(state.delta[None] + beta * u, state.x0)
    points = jnp.concatenate([state.x[None], probes])
    probs = oracle(points)
    c = cfg.c * 10.0 ** jnp.minimum(state.step // cfg.switch_iters, 8).astype(jnp.float32)
    values = objective(probs, points, state.x0, state.cls, c, cfg.kappa, cfg.targeted)
    success = is_adversarial(probs[0], state.cls, cfg.targeted)
    g = random_vector_estimate(values[0], values[1:], u, beta)
    updates, opt_state = adam.update(g, state.opt_state, state.delta)
    delta = state.delta + updates
    x_new = to_image(delta, state.x0)

    keep = lambda old, new: jnp.where(success, old, new)  # noqa: E731
    new = AutoZOOMState(keep(state.x, x_new), state.x0, keep(state.delta, delta), state.cls, state.key,
                        state.step + 1, success, jax.tree.map(keep, state.opt_state, opt_state))
    return new, AutoZOOMInfo(loss=values[0], margin=margin_fn(cfg.targeted)(probs[0], state.cls), c=c)


def autozoom(cfg: AutoZOOMConfig) -> Attack:
    """Build AutoZOOM (full space for :class:`AutoZOOMConfig`, AZ-Bi for :class:`AutoZOOMBiConfig`)."""
    adam = optax.adam(cfg.lr, b1=cfg.beta1, b2=cfg.beta2)

    def init(key, x0, label, target):
        x0 = jnp.asarray(x0, jnp.float32)
        delta = jnp.zeros(cfg.latent_shape(x0.shape), jnp.float32)
        cls = jnp.asarray(target if cfg.targeted else label, jnp.int32)
        return AutoZOOMState(x0, x0, delta, cls, key, jnp.zeros((), jnp.int32), jnp.zeros((), bool),
                             adam.init(delta))

    def step(state: AutoZOOMState, oracle):
        beta = 1.0 / state.delta.size if cfg.beta is None else cfg.beta
        to_image = lambda d, x0: project(x0 + decode(d, x0.shape), x0, cfg.eps, cfg.norm)  # noqa: E731
        return random_vector_step(cfg, adam, beta, to_image, state, oracle)

    return Attack(init=init, step=step, cost=cfg.q + 1, output="scores", targeted=cfg.targeted)


AUTOZOOM_BAD = (dict(q=0), dict(q=1.5), dict(beta=0.0), dict(c=0.0), dict(switch_iters=0), dict(kappa=-1.0),
        dict(lr=float("inf")), dict(beta2=1.0), dict(eps=-2.0), dict(norm="l0"))

register(AttackSpec(
    name="autozoom", config=AutoZOOMConfig, build=lambda cfg, ctx: autozoom(cfg), family="score",
    battery=dict(norm="l2", eps=BATTERY_EPS["l2"], budget=2_000), bad_configs=AUTOZOOM_BAD))

register(AttackSpec(
    name="autozoom_bi", config=AutoZOOMBiConfig, build=lambda cfg, ctx: autozoom(cfg), family="score",
    battery=dict(norm="l2", eps=BATTERY_EPS["l2"], budget=2_000),
    bad_configs=AUTOZOOM_BAD + (dict(reduced=0), dict(reduced=2.0))))
