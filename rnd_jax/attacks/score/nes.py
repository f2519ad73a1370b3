"""NES: natural-evolution-strategies gradient estimation + projected gradient descent.

Ilyas, Engstrom, Athalye & Lin, "Black-box Adversarial Attacks with Limited Queries and
Information", ICML 2018. Notation of Aithal & Li (2022), eqs. (2)-(3):

    g = 1/(J*beta) * sum_{j=1..J} f(x + beta*u_j) * u_j,    u_{J/2+j} = -u_j   (antithetic)

with ``f`` the attack loss (targeted: ``f = -log F_t``, eq. 2), ``u_j ~ N(0, I)`` and ``beta`` the
search variance (default 1e-3 as in the paper). The estimate is smoothed by momentum
``m <- momentum*m + (1 - momentum)*g`` (an optax EMA), and a projected step is taken:
``x <- Proj(x - lr*sign(m))`` for the l_inf attack or ``x <- Proj(x - lr*m/||m||_2)`` for l_2, where
Proj projects onto the eps-ball around the original image and onto [0, 1].

One step sends ONE batch of ``J + 1`` points to the oracle: the current point ``x`` (whose answer
decides whether the attack believes it has succeeded, and stops there if so) and the ``J``
antithetic perturbations. So ``cost = J + 1`` queries per step, success checks included (``checks = 1``:
the answer at ``x`` is not in the estimate, so it is not a loss query in the papers' count). The
perturbed points are not clipped to [0, 1] (clipping would break the antithetic symmetry); they
leave the box by at most a few ``beta``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from rnd_jax import losses
from rnd_jax.attacks.driver import Attack
from rnd_jax.attacks.registry import BATTERY_EPS, AttackSpec, register

NORMS = ("linf", "l2")


@dataclasses.dataclass(frozen=True)
class NESConfig:
    """NES hyper-parameters. ``lr=None`` picks ``eps/10`` (l_inf) or ``eps/5`` (l_2)."""

    eps: float = 0.3  # radius of the perturbation ball around the original image
    norm: str = "linf"  # "linf" or "l2"
    targeted: bool = True
    samples: int = 50  # J: perturbations per step (even; J/2 antithetic pairs)
    beta: float = 1e-3  # search variance (finite-difference step)
    lr: float | None = None  # step size of the projected update
    momentum: float = 0.9  # EMA factor of the gradient estimate (0 disables)
    loss: str | None = None  # targeted: "xent" (default) or "cw"; untargeted: "margin" (default) or "xent"

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {NORMS}")
        for name in ("eps", "beta"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"NES {name} must be a finite number > 0, got {v!r}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"NES lr must be a finite number > 0, got {self.lr!r}")
        if not (0.0 <= self.momentum < 1.0):
            raise ValueError(f"NES momentum must be in [0, 1), got {self.momentum!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 2 or self.samples % 2:
            raise ValueError(f"NES samples J must be an even int >= 2 (antithetic pairs), got {self.samples!r}")
        losses.check_goal("NES", self.targeted, self.loss)

    @property
    def step_size(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return self.eps / 10 if self.norm == "linf" else self.eps / 5

    @property
    def loss_name(self) -> str:
        return losses.goal_loss(self.targeted, self.loss)


class NESState(NamedTuple):
    x: jax.Array  # current point f32[H, W, C]
    x0: jax.Array  # original image
    cls: jax.Array  # i32: target class if targeted, else true label
    key: jax.Array
    step: jax.Array  # i32
    done: jax.Array  # bool: the last answer at x was adversarial
    opt_state: optax.OptState


class NESInfo(NamedTuple):
    loss: jax.Array  # loss at the current point (from its noisy answer)
    grad_norm: jax.Array  # ||g|| of this step's estimate


def project(x, x0, eps: float, norm: str):
    """Project onto {||x - x0||_norm <= eps} and then onto [0, 1] (which keeps it in the ball)."""
    d = x - x0
    if norm == "linf":
        d = jnp.clip(d, -eps, eps)
    else:
        n = jnp.sqrt(jnp.sum(d * d))
        d = d * jnp.minimum(1.0, eps / jnp.maximum(n, 1e-12))
    return jnp.clip(x0 + d, 0.0, 1.0)


def is_adversarial(probs, cls, targeted: bool):
    """Top-1 of ``probs [..., K]`` is the target (targeted) / not the label (untargeted)."""
    top = jnp.argmax(probs, axis=-1)
    return top == cls if targeted else top != cls


def nes(cfg: NESConfig) -> Attack:
    """Build the NES attack for ``cfg``; see the module docstring."""
    J, beta = cfg.samples, cfg.beta
    loss_fn = (losses.TARGETED if cfg.targeted else losses.UNTARGETED)[cfg.loss_name]
    direction = optax.scale_by_sign() if cfg.norm == "linf" else optax.normalize_by_update_norm(scale_factor=1.0)
    opt = optax.chain(optax.ema(cfg.momentum, debias=False), direction, optax.scale(-cfg.step_size))

    def init(key, x0, label, target):
        x0 = jnp.asarray(x0, jnp.float32)
        cls = jnp.asarray(target if cfg.targeted else label, jnp.int32)
        return NESState(x0, x0, cls, key, jnp.zeros((), jnp.int32), jnp.zeros((), bool), opt.init(x0))

    def step(state: NESState, oracle):
        k_u = jax.random.fold_in(state.key, state.step)
        half = jax.random.normal(k_u, (J // 2,) + state.x.shape, state.x.dtype)
        u = jnp.concatenate([half, -half])
        probs = oracle(jnp.concatenate([state.x[None], state.x[None] + beta * u]))
        success = is_adversarial(probs[0], state.cls, cfg.targeted)
        f = loss_fn(probs[1:], state.cls)  # [J]
        g = jnp.tensordot(f, u, axes=1) / (J * beta)
        updates, opt_state = opt.update(g, state.opt_state, state.x)
        x_new = project(state.x + updates, state.x0, cfg.eps, cfg.norm)
        new = NESState(
            x=jnp.where(success, state.x, x_new),
            x0=state.x0,
            cls=state.cls,
            key=state.key,
            step=state.step + 1,
            done=success,
            opt_state=jax.tree.map(lambda a, b: jnp.where(success, a, b), state.opt_state, opt_state),
        )
        return new, NESInfo(loss=loss_fn(probs[0], state.cls), grad_norm=jnp.sqrt(jnp.sum(g * g)))

    return Attack(init=init, step=step, cost=J + 1, output="scores", targeted=cfg.targeted, checks=1)


register(AttackSpec(name="nes", config=NESConfig, build=lambda cfg, ctx: nes(cfg), family="score",
                    battery=dict(norm="linf", eps=BATTERY_EPS["linf"], budget=10_000),
                    bad_configs=(dict(samples=3), dict(samples=0), dict(eps=0.0), dict(eps=float("nan")),
                                 dict(beta=-1.0), dict(norm="l1"), dict(momentum=1.0), dict(loss="nope"))))
