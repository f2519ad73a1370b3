"""PGD: projected gradient descent with the model's gradients (white-box).

Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models Resistant to Adversarial
Attacks", ICLR 2018, Sec. 2 and App. C. With ``f`` the attack loss (minimised, :mod:`rnd_jax.losses`)
and ``Proj`` the projection onto the eps-ball around ``x0`` and onto [0, 1]:

    x_0 = Proj(x0 + U(-eps, eps)^d)                    (random start; l_2: uniform in the ball)
    x_{t+1} = Proj(x_t - alpha * sign(grad f(x_t)))     (l_inf)
    x_{t+1} = Proj(x_t - alpha * grad f / ||grad f||_2) (l_2)

Losses (Park et al. 2021, Sec. 3: PGD(Xent) and PGD(CW)): untargeted ``"xent"`` (default; pushes
``log F_y`` down, i.e. ascends the cross-entropy) or ``"margin"`` (``log F_y - max_{j!=y} log F_j``,
the C&W loss: log-probability margins are logit margins); targeted ``"xent"`` (default, ``-log F_t``)
or ``"cw"``. Probabilities are floored before the log (:mod:`rnd_jax.losses`), so noisy answers give
finite losses.

Queries: every step asks ONE gradient query at its current point ``x_t`` (:mod:`rnd_jax.oracle`,
output ``"gradient"``): its answer decides whether ``x_t`` is adversarial (the attack then stops
there) and gives the gradient of the step, so ``cost = 1`` and the number of PGD steps is the query
budget. Against a randomized model, ``eot(pgd, M)`` averages the gradient over ``M`` draws per step
(:mod:`rnd_jax.attacks.whitebox._common`; ``M`` queries per step).

Defaults, scaled to eps: Madry et al.'s CIFAR-10 attack takes 7 (training) to 20 (evaluation) steps of
``2/255`` at ``eps = 8/255``, i.e. ``alpha = eps / 4``, and Park et al.'s Table 2 follows it with 10
steps; their MNIST attack 40 to 100 steps of ``0.01`` at ``eps = 0.3`` (``alpha = eps / 30``). ``lr=None``
is the CIFAR-10 ratio ``eps / 4`` for both norms (for l_2 the step's length), and the budget sets the
number of steps (the registry battery: Park's 10). On the 8x8 digits (battery: l_inf 0.3, l_2 2.0) it
fools all ten battery images within 10 steps, targeted and untargeted, for both norms; at the MNIST
ratio ``eps / 30`` the targeted l_inf attack needs up to 34 steps. The gradients are of log-probabilities,
not logits (the same for the margin loss and for the cross-entropy).

Random restarts (Madry et al.'s evaluation, App. C; the MNIST challenge's 50 restarts of 100 steps):
``steps=k`` runs the attack in rounds of ``k`` steps; a round that ends without an adversarial answer
is followed by a fresh random start, that of round ``r`` drawn from ``fold_in(key, r)`` (round 0 from
``key`` itself, as without restarts), until an answer is adversarial or the budget is spent (the
budget sets the number of rounds, ``budget // k``). ``steps=None`` (default) is one round as long as
the budget. Restarts need ``random_start`` (from ``x0`` every round would repeat the first).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnd_jax import losses
from rnd_jax.attacks.driver import Attack
from rnd_jax.attacks.registry import BATTERY_EPS, AttackSpec, register
from rnd_jax.attacks.score.nes import is_adversarial, project
from rnd_jax.attacks.whitebox._common import expected_gradient, random_start

NORMS = ("linf", "l2")


@dataclasses.dataclass(frozen=True)
class PGDConfig:
    """PGD hyper-parameters (module docstring). ``lr=None`` picks ``eps / 4`` (Madry et al.'s CIFAR-10 ratio)."""

    eps: float = 0.3  # radius of the perturbation ball around the original image
    norm: str = "linf"  # "linf" or "l2"
    targeted: bool = False
    lr: float | None = None  # alpha: the step size (l_inf per coordinate, l_2 the step's length)
    random_start: bool = True  # start from a uniform point of the eps-ball (Madry et al.)
    steps: int | None = None  # steps per random restart (None: no restart, one run as long as the budget)
    loss: str | None = None  # untargeted: "xent" (default) or "margin"; targeted: "xent" (default) or "cw"

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {NORMS}")
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"PGD eps must be a finite number > 0, got {self.eps!r}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"PGD lr must be a finite number > 0, got {self.lr!r}")
        if not isinstance(self.random_start, bool):
            raise ValueError(f"PGD random_start must be a bool, got {self.random_start!r}")
        if self.steps is not None:
            if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
                raise ValueError(f"PGD steps (per restart) must be an int >= 1 or None, got {self.steps!r}")
            if not self.random_start:
                raise ValueError("PGD restarts (steps set) need random_start=True: restarts from the image itself "
                                 "would repeat the first run")
        losses.check_goal("PGD", self.targeted, self.loss)

    @property
    def step_size(self) -> float:
        return float(self.lr) if self.lr is not None else self.eps / 4

    @property
    def loss_name(self) -> str:
        return self.loss or "xent"


class PGDState(NamedTuple):
    x: jax.Array  # current point f32[H, W, C]
    x0: jax.Array  # original image
    cls: jax.Array  # i32: target class if targeted, else true label
    key: jax.Array
    step: jax.Array  # i32
    done: jax.Array  # bool: the answer at x was adversarial


class PGDInfo(NamedTuple):
    loss: jax.Array  # loss at the current point (from its noisy answer)
    grad_norm: jax.Array  # ||grad f|| at the current point


def pgd(cfg: PGDConfig) -> Attack:
    """Build the PGD attack for ``cfg``; see the module docstring."""
    loss_fn = (losses.TARGETED if cfg.targeted else losses.UNTARGETED)[cfg.loss_name]
    eps, norm, alpha = float(cfg.eps), cfg.norm, cfg.step_size

    def init(key, x0, label, target):
        x0 = jnp.asarray(x0, jnp.float32)
        cls = jnp.asarray(target if cfg.targeted else label, jnp.int32)
        x = random_start(key, x0, eps, norm) if cfg.random_start else x0
        return PGDState(x, x0, cls, key, jnp.zeros((), jnp.int32), jnp.zeros((), bool))

    def step(state: PGDState, oracle):
        probs, value, g = expected_gradient(oracle, state.x[None], lambda p: loss_fn(p, state.cls))
        g = g[0]
        success = is_adversarial(probs[0], state.cls, cfg.targeted)
        gn = jnp.sqrt(jnp.sum(g * g))
        direction = jnp.sign(g) if norm == "linf" else g / jnp.maximum(gn, 1e-12)
        x_new = project(state.x - alpha * direction, state.x0, eps, norm)
        if cfg.steps is not None:  # the round ends: restart from a fresh random point of the ball
            nxt = state.step + 1
            fresh = random_start(jax.random.fold_in(state.key, nxt // cfg.steps), state.x0, eps, norm)
            x_new = jnp.where(nxt % cfg.steps == 0, fresh, x_new)
        new = state._replace(x=jnp.where(success, state.x, x_new), step=state.step + 1, done=success)
        return new, PGDInfo(loss=value[0], grad_norm=gn)

    return Attack(init=init, step=step, cost=1, output="gradient", targeted=cfg.targeted)


register(AttackSpec(name="pgd", config=PGDConfig, build=lambda cfg, ctx: pgd(cfg), family="whitebox",
                    battery=dict(norm="linf", eps=BATTERY_EPS["linf"], budget=10),
                    bad_configs=(dict(eps=0.0), dict(eps=-1.0), dict(eps=float("nan")), dict(lr=-0.1),
                                 dict(lr=float("inf")), dict(norm="l1"), dict(loss="cw"),
                                 dict(targeted=True, loss="margin"), dict(random_start=1), dict(steps=0),
                                 dict(steps=2.5), dict(steps=5, random_start=False))))
