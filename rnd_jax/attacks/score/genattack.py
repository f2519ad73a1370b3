"""GenAttack: a genetic algorithm on the l_inf ball, with adaptive mutation.

Alzantot, Sharma, Chakraborty, Zhang, Hsieh & Srivastava, "GenAttack: Practical Black-box Attacks
with Gradient-Free Optimization", GECCO 2019, Algorithm 1 and Sec. 3.3 (adaptive parameters).

A population of ``N`` points in the eps-ball around ``x0`` evolves, one generation per step:

- **fitness** (eq. 3): targeted ``F = log f_t(x) - log sum_{j != t} f_j(x)``; untargeted (the same
  idea for the true class ``y``) ``F = log sum_{j != y} f_j(x) - log f_y(x)``; ``F > 0`` iff the
  goal class holds more than half of the probability mass;
- **elite**: the member the oracle's answer says is adversarial (if any), else the fittest; it is
  the point the attack returns and survives unchanged into the next generation;
- **selection**: ``N - 1`` pairs of parents drawn with probabilities ``softmax(F / tau)``;
- **crossover**: each coordinate of a child comes from parent 1 with probability
  ``p1 / (p1 + p2)`` (their selection probabilities), else from parent 2;
- **mutation**: each coordinate, with probability ``rho``, gets ``U(-alpha*eps, alpha*eps)`` added;
  the child is projected back onto the eps-ball and [0, 1].

Adaptive parameters (Sec. 3.3, as in the reference implementation): ``rho = max(rho_min,
0.5 * 0.9^k)`` and ``alpha = max(alpha_min, 0.4 * 0.9^k)`` with ``k`` the number of plateaus so far.
A plateau is declared when the best "win margin" ``max_pop (f_goal - max_j f_j)`` (<= 0, 0 at
success) has not improved for more than 100 generations (300 while it is below -0.4).

Queries. One step evaluates the whole population in ONE batch of ``N`` points, the elite of the
previous generation (the current point ``x``) included, so ``cost = N``. The reference code also
evaluates all ``N`` members every generation but counts only ``N - 1`` (the elite's answer is a
repeat for a deterministic model); under a randomized defense the elite's answer is a fresh
noisy query, so it is counted, and it is this step's success check of ``x``.

Defaults: ``N = 6``, ``tau = 0.1``, ``rho_min = 0.1``, ``alpha_min = 0.15`` (the paper's MNIST /
CIFAR-10 settings; the adaptive schedule starts at ``rho = 0.5``, ``alpha = 0.4``), eps = 0.3
(MNIST). The initial population is ``x0 + U(-eps, eps)`` per coordinate (Algorithm 1). The
reference code's dimensionality reduction of the search space (for ImageNet) is not used on 8x8
digits, and its override of the mutation rate to 1 in the first 10 generations is not part of the
paper's description and is left out. The registered budget is 10,000 queries (the reference
implementation's 10,000 generations would be 60,000).
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


@dataclasses.dataclass(frozen=True)
class GenAttackConfig:
    """GenAttack hyper-parameters (l_inf only)."""

    eps: float = 0.3  # delta_max: l_inf radius
    norm: str = "linf"  # the paper's threat model; the only one supported
    targeted: bool = True
    pop_size: int = 6  # N
    temp: float = 0.1  # tau: selection temperature
    rho_min: float = 0.1  # floor of the adaptive mutation probability
    alpha_min: float = 0.15  # floor of the adaptive mutation range (fraction of eps)
    rho_init: float = 0.5  # adaptive schedule: rho = max(rho_min, rho_init * decay^plateaus)
    alpha_init: float = 0.4  # adaptive schedule: alpha = max(alpha_min, alpha_init * decay^plateaus)
    decay: float = 0.9
    adaptive: bool = True  # False: rho = rho_min and alpha = alpha_min throughout

    def __post_init__(self):
        if self.norm != "linf":
            raise ValueError(f"GenAttack is an l_inf attack; got norm {self.norm!r}")
        for name in ("eps", "temp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"GenAttack {name} must be a finite number > 0, got {v!r}")
        for name in ("rho_min", "alpha_min", "rho_init", "alpha_init", "decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v <= 1):
                raise ValueError(f"GenAttack {name} must be in (0, 1], got {v!r}")
        if isinstance(self.pop_size, bool) or not isinstance(self.pop_size, int) or self.pop_size < 2:
            raise ValueError(f"GenAttack pop_size must be an int >= 2 (elite + children), got {self.pop_size!r}")
        if not isinstance(self.targeted, bool) or not isinstance(self.adaptive, bool):
            raise ValueError("targeted and adaptive must be bools")


class GenAttackState(NamedTuple):
    x: jax.Array  # the elite (current point) f32[H, W, C]
    x0: jax.Array
    cls: jax.Array  # i32: target if targeted, else true label
    key: jax.Array
    step: jax.Array  # i32: generation
    done: jax.Array  # bool: the answer at x was adversarial
    pop: jax.Array  # f32[N, H, W, C]: the population to evaluate next (pop[0] is the elite x)
    best_margin: jax.Array  # f32: best win margin so far (plateau detection)
    stall: jax.Array  # i32: generations since the win margin last improved
    plateaus: jax.Array  # i32: plateaus so far (drives the adaptive rho and alpha)


class GenAttackInfo(NamedTuple):
    loss: jax.Array  # -F of the elite (minimised view of the fitness)
    margin: jax.Array  # this generation's best win margin
    rho: jax.Array
    alpha: jax.Array


def _pick(probs, cls):
    cls = jnp.broadcast_to(jnp.asarray(cls, jnp.int32), probs.shape[:-1])
    return jnp.take_along_axis(probs, cls[..., None], -1)[..., 0]


def fitness(probs, cls, targeted: bool):
    """GenAttack fitness of ``probs [..., K]`` (eq. 3); larger is better."""
    mine = _pick(probs, cls)
    rest = jnp.sum(probs, -1) - mine  # sum over the other classes (noisy answers need not sum to 1)
    score = losses.safe_log(mine) - losses.safe_log(rest)
    return score if targeted else -score


def win_margin(probs, cls, targeted: bool):
    """``f_goal - max_j f_j`` per member (<= 0; 0 iff the goal class is top-1)."""
    top = jnp.max(probs, -1)
    if targeted:
        goal = _pick(probs, cls)
    else:
        mask = jnp.arange(probs.shape[-1]) == cls
        goal = jnp.max(jnp.where(mask, -jnp.inf, probs), -1)
    return goal - top


def genattack(cfg: GenAttackConfig) -> Attack:
    """Build GenAttack for ``cfg``; see the module docstring."""
    N = cfg.pop_size

    def schedule(plateaus):
        k = plateaus.astype(jnp.float32)
        if not cfg.adaptive:
            return jnp.float32(cfg.rho_min), jnp.float32(cfg.alpha_min)
        return (jnp.maximum(cfg.rho_min, cfg.rho_init * cfg.decay ** k),
                jnp.maximum(cfg.alpha_min, cfg.alpha_init * cfg.decay ** k))

    def init(key, x0, label, target):
        x0 = jnp.asarray(x0, jnp.float32)
        cls = jnp.asarray(target if cfg.targeted else label, jnp.int32)
        key, k_pop = jax.random.split(key)  # the initial population's own key; steps fold_in(key, step)
        noise = jax.random.uniform(k_pop, (N,) + x0.shape, jnp.float32, -cfg.eps, cfg.eps)
        pop = project(x0 + noise, x0, cfg.eps, "linf")  # l_inf projection is elementwise
        zero = jnp.zeros((), jnp.int32)
        return GenAttackState(x=x0, x0=x0, cls=cls, key=key, step=zero, done=jnp.zeros((), bool), pop=pop,
                              best_margin=jnp.float32(-1.0), stall=zero, plateaus=zero)

    def step(state: GenAttackState, oracle):
        probs = oracle(state.pop)  # [N, K]: the whole generation in one batch
        fit = fitness(probs, state.cls, cfg.targeted)
        adv = is_adversarial(probs, state.cls, cfg.targeted)
        success = jnp.any(adv)
        elite_idx = jnp.where(success, jnp.argmax(adv), jnp.argmax(fit))
        pick = jax.nn.one_hot(elite_idx, N, dtype=jnp.float32)
        elite = jnp.tensordot(pick, state.pop, axes=1)

        # Plateau bookkeeping and the adaptive mutation parameters.
        margin = jnp.max(win_margin(probs, state.cls, cfg.targeted))
        improved = margin > state.best_margin
        best_margin = jnp.where(improved, margin, state.best_margin)
        stall = jnp.where(improved, 0, state.stall + 1)
        threshold = jnp.where(margin > -0.4, 100, 300)
        plateau = stall > threshold
        plateaus = state.plateaus + plateau
        stall = jnp.where(plateau, 0, stall)
        rho, alpha = schedule(plateaus)

        # Selection, crossover and mutation of N - 1 children, all from one uniform draw (one random
        # call keeps the vmapped loop quick to compile).
        shape = (N - 1,) + state.x.shape
        d = math.prod(shape)
        u = jax.random.uniform(jax.random.fold_in(state.key, state.step), (2 * (N - 1) + 3 * d,))
        sel_p = jax.nn.softmax(fit / cfg.temp)
        cdf = jnp.cumsum(sel_p)
        parents = jnp.minimum(jnp.sum(cdf[None, :] < u[:2 * (N - 1), None], -1), N - 1).reshape(2, N - 1)
        u_cross, u_mask, u_mut = (u[2 * (N - 1) + i * d: 2 * (N - 1) + (i + 1) * d].reshape(shape) for i in range(3))
        onehot = jax.nn.one_hot(parents, N, dtype=jnp.float32)  # [2, N-1, N]: gathers as products
        p1, p2 = onehot @ sel_p
        take1 = u_cross < (p1 / (p1 + p2)).reshape((N - 1,) + (1,) * state.x.ndim)
        mothers, fathers = jnp.tensordot(onehot, state.pop, axes=1)
        children = jnp.where(take1, mothers, fathers)
        delta = (2.0 * u_mut - 1.0) * (alpha * cfg.eps)  # U(-alpha*eps, alpha*eps)
        children = project(children + (u_mask < rho) * delta, state.x0, cfg.eps, "linf")  # elementwise: broadcasts
        pop = jnp.concatenate([elite[None], children])

        new = GenAttackState(
            x=elite, x0=state.x0, cls=state.cls, key=state.key, step=state.step + 1, done=success,
            pop=jnp.where(success, state.pop, pop), best_margin=best_margin, stall=stall, plateaus=plateaus)
        return new, GenAttackInfo(loss=-jnp.dot(pick, fit), margin=margin, rho=rho, alpha=alpha)

    return Attack(init=init, step=step, cost=N, output="scores", targeted=cfg.targeted)


register(AttackSpec(
    name="genattack", config=GenAttackConfig, build=lambda cfg, ctx: genattack(cfg), family="score",
    battery=dict(norm="linf", eps=BATTERY_EPS["linf"], budget=10_000),
    bad_configs=(dict(eps=0.0), dict(eps=float("nan")), dict(norm="l2"), dict(pop_size=1), dict(pop_size=6.0),
                 dict(temp=0.0), dict(rho_min=0.0), dict(alpha_min=1.5), dict(decay=-0.1))))
