"""ZO-signSGD: the sign of a zeroth-order gradient estimate, projected onto the l_inf ball.

Liu, Chen, Chen & Hong, "signSGD via Zeroth-Order Oracle", ICLR 2019 (Algorithm 1 with the random
gradient estimator of its eq. (3)). One step estimates the gradient of the attack loss ``f`` at the
current point ``x`` from ``q`` random directions with forward differences at smoothing radius ``mu``,

    g = d / (mu * q) * sum_{i=1..q} [f(x + mu * u_i) - f(x)] * u_i,

with ``d`` the number of pixels and ``u_i`` uniform on the unit sphere (``directions="sphere"``, the
paper's estimator) or ``u_i ~ N(0, I/d)`` (``"gaussian"``, the estimator of the reimplementation by
Al-Dujaili & O'Reilly, ICLR 2020; its ``u`` has ``E||u||^2 = 1`` as well, so ``mu`` is the l_2 length of
a probe in both cases and one formula serves both), and takes the signSGD step

    x <- Proj(x - lr * sign(g)),

``Proj`` onto the l_inf ball of radius ``eps`` around the original image and onto [0, 1]. There is no
momentum (ZO-M-signSGD, the paper's name for NES with a sign step, is :mod:`rnd_jax.attacks.score.nes`).
The loss is minimised: targeted ``xent`` (``-log F_t``, default) or ``cw``; untargeted ``margin``
(``log F_y - max_{j!=y} log F_j``, default) or ``xent`` (``log F_y``), all from :mod:`rnd_jax.losses`
(safe logs, so noisy answers <= 0 give finite losses), as in :mod:`rnd_jax.attacks.score.nes`.

Queries. One step sends ONE batch of ``q + 1`` points: the current point ``x`` and the ``q`` probes
``x + mu * u_i``. So ``cost = q + 1``. Forward differences share the one answer at ``x`` among all ``q``
directions (symmetric differences would need ``2q`` points for the same ``q`` directions), and that
answer is also the success check: if it is adversarial the step stops there (``done``) and ``x`` stays.
Because the answer at ``x`` is part of the estimate, every query is a loss query (``checks = 0``; the
reimplementation above counts ``q + 1`` loss queries per step too). The probes are not clipped to
[0, 1] (clipping would bend the directions); they leave the box by at most about ``mu``.

Defaults. The paper's experiments attack with a penalised (C&W-style) objective rather than inside an
l_inf ball, so its step size does not carry over; the l_inf-ball settings below are those of Al-Dujaili
& O'Reilly's benchmark of ZO-signSGD (their reference configs), on MNIST (28x28, ``d = 784``,
``eps = 0.3``): ``q = 10``, probe length ``0.1``, step ``0.1``. The step is in pixel units and the
digits use the same ``eps = 0.3``, so ``lr = None`` gives ``eps / 3`` (0.1 at ``eps = 0.3``, the same
ratio for other radii). The probe moves every pixel by about ``mu / sqrt(d)``: the default keeps MNIST's
per-pixel probe on the 8x8 digits, ``mu = 0.1 * sqrt(64 / 784) = 0.1 * 8 / 28``. ``q = 10`` is kept (the
estimate improves with ``q / d``, so on 64 pixels it is, if anything, better than on MNIST). The
CIFAR-10 and ImageNet settings of the same benchmark are in :mod:`rnd_jax.presets`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnd_jax import losses
from rnd_jax.attacks.driver import INT32_MAX, Attack
from rnd_jax.attacks.registry import BATTERY_EPS, AttackSpec, register
from rnd_jax.attacks.score.nes import is_adversarial, project

DIRECTIONS = ("sphere", "gaussian")


@dataclasses.dataclass(frozen=True)
class ZOSignSGDConfig:
    """ZO-signSGD hyper-parameters (module docstring). ``lr=None`` picks ``eps / 3``."""

    eps: float = 0.3  # l_inf radius around the original image
    norm: str = "linf"  # the attack is l_inf only
    targeted: bool = True
    q: int = 10  # random directions per step (cost q + 1)
    mu: float = 0.1 * 8 / 28  # smoothing radius: l_2 length of a probe (MNIST's 0.1 at the same per-pixel size)
    lr: float | None = None  # sign-step size in pixel units
    directions: str = "sphere"  # "sphere" (uniform on the unit sphere, the paper) or "gaussian" (N(0, I/d))
    loss: str | None = None  # targeted: "xent" (default) or "cw"; untargeted: "margin" (default) or "xent"

    def __post_init__(self):
        if self.norm != "linf":
            raise ValueError(f"ZO-signSGD is an l_inf attack; norm must be 'linf', got {self.norm!r}")
        for name in ("eps", "mu"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"ZO-signSGD {name} must be a finite number > 0, got {v!r}")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not (math.isfinite(self.lr) and self.lr > 0)):
            raise ValueError(f"ZO-signSGD lr must be a finite number > 0 or None, got {self.lr!r}")
        if isinstance(self.q, bool) or not isinstance(self.q, int) or not 1 <= self.q < INT32_MAX:
            raise ValueError(f"ZO-signSGD q (directions per step) must be an int >= 1, got {self.q!r}")
        if self.directions not in DIRECTIONS:
            raise ValueError(f"unknown ZO-signSGD directions {self.directions!r}; choose one of {DIRECTIONS}")
        losses.check_goal("ZO-signSGD", self.targeted, self.loss)

    @property
    def step_size(self) -> float:
        return float(self.lr) if self.lr is not None else self.eps / 3

    @property
    def loss_name(self) -> str:
        return losses.goal_loss(self.targeted, self.loss)


class ZOSignSGDState(NamedTuple):
    x: jax.Array  # current point f32[H, W, C]
    x0: jax.Array  # original image
    cls: jax.Array  # i32: target class if targeted, else true label
    key: jax.Array
    step: jax.Array  # i32
    done: jax.Array  # bool: the last answer at x was adversarial


class ZOSignSGDInfo(NamedTuple):
    loss: jax.Array  # loss at the current point (from its answer)
    grad_norm: jax.Array  # ||g||_2 of this step's estimate


def sample_directions(key, q: int, shape, kind: str, dtype=jnp.float32):
    """``q`` directions of ``shape`` with ``E||u||^2 = 1``: uniform on the unit sphere or ``N(0, I/d)``."""
    d = math.prod(shape)
    u = jax.random.normal(key, (q,) + tuple(shape), dtype)
    if kind == "sphere":
        flat = u.reshape(q, -1)
        return (flat / jnp.maximum(jnp.linalg.norm(flat, axis=1, keepdims=True), 1e-30)).reshape(u.shape)
    return u / math.sqrt(d)


def zo_signsgd(cfg: ZOSignSGDConfig) -> Attack:
    """Build the ZO-signSGD attack for ``cfg``; see the module docstring."""
    q, mu, lr = cfg.q, float(cfg.mu), cfg.step_size
    loss_fn = (losses.TARGETED if cfg.targeted else losses.UNTARGETED)[cfg.loss_name]

    def init(key, x0, label, target):
        x0 = jnp.asarray(x0, jnp.float32)
        cls = jnp.asarray(target if cfg.targeted else label, jnp.int32)
        return ZOSignSGDState(x0, x0, cls, key, jnp.zeros((), jnp.int32), jnp.zeros((), bool))

    def step(state: ZOSignSGDState, oracle):
        d = state.x.size
        u = sample_directions(jax.random.fold_in(state.key, state.step), q, state.x.shape, cfg.directions,
                              state.x.dtype)
        probs = oracle(jnp.concatenate([state.x[None], state.x[None] + mu * u]))
        success = is_adversarial(probs[0], state.cls, cfg.targeted)
        f0 = loss_fn(probs[0], state.cls)
        diffs = loss_fn(probs[1:], state.cls) - f0  # [q]
        g = (d / (mu * q)) * jnp.tensordot(diffs, u, axes=1)
        x_new = project(state.x - lr * jnp.sign(g), state.x0, cfg.eps, "linf")
        new = ZOSignSGDState(x=jnp.where(success, state.x, x_new), x0=state.x0, cls=state.cls, key=state.key,
                             step=state.step + 1, done=success)
        return new, ZOSignSGDInfo(loss=f0, grad_norm=jnp.sqrt(jnp.sum(g * g)))

    return Attack(init=init, step=step, cost=q + 1, output="scores", targeted=cfg.targeted, checks=0)


register(AttackSpec(
    name="zo_signsgd", config=ZOSignSGDConfig, build=lambda cfg, ctx: zo_signsgd(cfg), family="score",
    battery=dict(norm="linf", eps=BATTERY_EPS["linf"], budget=10_000),
    bad_configs=(dict(q=0), dict(q=-1), dict(q=2.0), dict(mu=0.0), dict(mu=-1e-3), dict(mu=float("nan")),
                 dict(eps=0.0), dict(eps=float("inf")), dict(lr=-0.1), dict(norm="l2"), dict(directions="cube"),
                 dict(loss="nope"), dict(targeted=False, loss="cw"), dict(targeted=True, loss="margin"))))
