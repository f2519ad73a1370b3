"""ZOO: zeroth-order optimisation with coordinate-wise symmetric differences and coordinate Adam.

Chen, Zhang, Sharma, Yi & Hsieh, "ZOO: Zeroth Order Optimization based Black-box Attacks to Deep
Neural Networks without Training Substitute Models", AISec 2017 (arXiv:1708.03999).

The attacker minimises the paper's C&W-style objective::

    F(x) = ||x - x0||_2^2 + c * max(m(x), -kappa)

with the log-probability margin ``m`` (untargeted: ``log F_y - max_{j!=y} log F_j``; targeted:
``max_{j!=t} log F_j - log F_t``), so the margin term vanishes once the point is
adversarial with confidence ``kappa``. Each step picks ``B`` coordinates uniformly at random
without replacement and estimates their partial derivatives with symmetric differences::

    g_i = (F(x + h e_i) - F(x - h e_i)) / (2 h),     h = 1e-4

then takes one ZOO-ADAM step on those coordinates only: every coordinate has its own
first/second moments and its own step counter, so a coordinate's bias correction depends on how
often that coordinate has been chosen. The coordinate Adam is ``optax.adam`` ``vmap``-ed over
scalar coordinates (one optax state per coordinate). The point is then projected onto the
eps-ball around ``x0`` and onto [0, 1].

One step sends ONE batch of ``2B + 1`` points to the oracle: the current point (whose answer is both
the success check and ``Info.loss``) followed by the ``B`` pairs ``x + h e_i, x - h e_i``
(the reference implementation evaluates the same ``2B + 1`` points per iteration). The probes are
not clipped to [0, 1]; they leave the box by at most ``h``.

Defaults and scaling to small images. The paper's MNIST/CIFAR settings: Adam with ``lr = 0.01``,
``beta1 = 0.9``, ``beta2 = 0.999``, ``h = 1e-4``, ``B = 128`` coordinates per step (of 784 on
MNIST) and, without a binary search, ``c = 0.5``. An 8x8 digit has only 64 coordinates, so the
default here is ``B = 64`` -- every coordinate once per step, ``2*64 + 1 = 129`` queries -- which
also keeps the oracle batches large; raise it to 128 for MNIST-sized images. Not reproduced: the
binary search over ``c`` (one constant here, a sweep can vary it), tanh-space optimisation (the
reference disables it on MNIST as well), the importance sampling and hierarchical attack (tools
for 299x299 images; ``d = 64`` here), and ZOO-Newton. The paper's threat model is unconstrained
L2 minimisation; here the iterate additionally stays inside the eps-ball of the evaluation
protocol, and the attack stops at the first point the oracle calls adversarial.
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
from rnd_jax.attacks.score.nes import is_adversarial, project

NORMS = ("linf", "l2")


def _positive(name, v, allow_zero=False):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v >= 0 if allow_zero else v > 0)
    if not ok:
        raise ValueError(f"ZOO {name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {v!r}")


@dataclasses.dataclass(frozen=True)
class ZOOConfig:
    """ZOO-ADAM hyper-parameters (paper defaults for MNIST; see the module docstring)."""

    eps: float = 2.0  # radius of the perturbation ball around the original image
    norm: str = "l2"  # "l2" (the paper's distortion) or "linf"
    targeted: bool = True
    coords: int = 64  # B: coordinates per step (<= the number of coordinates of the image)
    h: float = 1e-4  # symmetric-difference step
    c: float = 0.5  # weight of the margin term
    kappa: float = 0.0  # confidence: the margin is floored at -kappa
    lr: float = 0.01  # Adam step size
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {NORMS}")
        for name in ("eps", "h", "c", "lr", "adam_eps"):
            _positive(name, getattr(self, name))
        _positive("kappa", self.kappa, allow_zero=True)
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
                raise ValueError(f"ZOO {name} must be in [0, 1), got {v!r}")
        if isinstance(self.coords, bool) or not isinstance(self.coords, int) or self.coords < 1:
            raise ValueError(f"ZOO coords must be an int >= 1, got {self.coords!r}")
        if not isinstance(self.targeted, bool):
            raise ValueError(f"ZOO targeted must be a bool, got {self.targeted!r}")

    def check_size(self, dim: int) -> None:
        """B distinct coordinates must exist (the image shape is static, so this runs at trace time)."""
        if self.coords > dim:
            raise ValueError(f"ZOO coords={self.coords} exceeds the {dim} coordinates of the image")


class ZOOState(NamedTuple):
    x: jax.Array  # current point f32[H, W, C]
    x0: jax.Array  # original image
    cls: jax.Array  # i32: target class if targeted, else true label
    key: jax.Array
    step: jax.Array  # i32
    done: jax.Array  # bool: the answer at x was adversarial
    opt_state: optax.OptState  # one scalar Adam state per coordinate (leaves have a leading [d] axis)


class ZOOInfo(NamedTuple):
    loss: jax.Array  # objective F at the current point (from its answer)
    margin: jax.Array  # m(x) at the current point (negative once adversarial)


def margin_fn(targeted: bool):
    """The log-probability margin ``m(probs, cls)`` of the objective (negative iff adversarial)."""
    return losses.targeted_cw if targeted else losses.margin


def objective(probs, x, x0, cls, c: float, kappa: float, targeted: bool):
    """``||x - x0||^2 + c * max(m, -kappa)`` for points ``x: [..., H, W, C]`` and their ``probs``."""
    axes = tuple(range(x.ndim - x0.ndim, x.ndim))
    dist = jnp.sum((x - x0) ** 2, axis=axes)
    return dist + c * jnp.maximum(margin_fn(targeted)(probs, cls), -kappa)


def coordinate_probes(x, idx, h: float):
    """The ``2B`` points ``x + h e_i, x - h e_i`` (interleaved) for flat coordinate indices ``idx``."""
    e = jax.nn.one_hot(idx, x.size, dtype=x.dtype).reshape((idx.shape[0],) + x.shape)  # [B, H, W, C]
    return jnp.stack([x[None] + h * e, x[None] - h * e], axis=1).reshape((-1,) + x.shape)


def symmetric_difference(values, h: float):
    """Partial derivatives from the objective at ``coordinate_probes`` (``values: [2B]``): ``[B]``."""
    pairs = values.reshape(-1, 2)
    return (pairs[:, 0] - pairs[:, 1]) / (2.0 * h)


def zoo(cfg: ZOOConfig) -> Attack:
    """Build ZOO-ADAM for ``cfg``; see the module docstring."""
    adam = optax.adam(cfg.lr, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.adam_eps)

    def init(key, x0, label, target):
        x0 = jnp.asarray(x0, jnp.float32)
        cfg.check_size(x0.size)
        cls = jnp.asarray(target if cfg.targeted else label, jnp.int32)
        opt_state = jax.vmap(adam.init)(jnp.zeros((x0.size,), jnp.float32))
        return ZOOState(x0, x0, cls, key, jnp.zeros((), jnp.int32), jnp.zeros((), bool), opt_state)

    def step(state: ZOOState, oracle):
        x, d = state.x, state.x.size
        B = cfg.coords
        cfg.check_size(d)
        k = jax.random.fold_in(state.key, state.step)
        idx = jax.random.choice(k, d, (B,), replace=False)
        points = jnp.concatenate([x[None], coordinate_probes(x, idx, cfg.h)])
        probs = oracle(points)
        values = objective(probs, points, state.x0, state.cls, cfg.c, cfg.kappa, cfg.targeted)
        success = is_adversarial(probs[0], state.cls, cfg.targeted)
        g = symmetric_difference(values[1:], cfg.h)

        chosen = jax.tree.map(lambda a: a[idx], state.opt_state)
        updates, chosen = jax.vmap(adam.update)(g, chosen)
        opt_state = jax.tree.map(lambda a, b: a.at[idx].set(b), state.opt_state, chosen)
        flat = x.reshape(-1).at[idx].add(updates)
        x_new = project(flat.reshape(x.shape), state.x0, cfg.eps, cfg.norm)

        keep = lambda old, new: jnp.where(success, old, new)
        new = ZOOState(keep(x, x_new), state.x0, state.cls, state.key, state.step + 1, success,
                       jax.tree.map(keep, state.opt_state, opt_state))
        m = margin_fn(cfg.targeted)(probs[0], state.cls)
        return new, ZOOInfo(loss=values[0], margin=m)

    return Attack(init=init, step=step, cost=2 * cfg.coords + 1, output="scores", targeted=cfg.targeted, checks=1)


register(AttackSpec(
    name="zoo", config=ZOOConfig, build=lambda cfg, ctx: zoo(cfg), family="score",
    battery=dict(norm="l2", eps=BATTERY_EPS["l2"], budget=10_000),
    bad_configs=(dict(coords=0), dict(coords=2.5), dict(h=0.0), dict(c=-1.0), dict(kappa=-0.1), dict(lr=0.0),
                 dict(beta1=1.0), dict(eps=float("nan")), dict(norm="l1"))))
