"""ZOO-AE and AutoZOOM-AE: ZOO's and AutoZOOM's gradient estimates in the latent space of an autoencoder.

Tu, Ting, Chen, Liu, Zhang, Yi, Hsieh & Cheng, "AutoZOOM: Autoencoder-based Zeroth Order Optimization
Method for Attacking Black-box Neural Networks", AAAI 2019 (arXiv:1805.11770), Sec. 3.3 (the "AE"
variants; "ZOO+AE" and "AZ+AE" in Aithal & Li 2022, Tables 2, 5 and 9).

The attacker owns the decoder ``D`` of an autoencoder trained offline on the training images
(:mod:`rnd_jax.autoencoder`; it reaches the attack through ``Context.autoencoder``) and optimises a latent
code ``z`` of dimension ``d'`` (digits: ``4 x 4 x 1``, ``d' = 16``; the paper's MNIST code is
``14 x 14 x 1``, 25% of the image, scaled here to the input) whose decoding is the perturbation::

    x(z) = Proj(x0 + D(z)),   F(z) = ||x(z) - x0||_2^2 + c * max(m(x(z)), -kappa)

with ZOO's C&W-style objective (the log-probability margin ``m``, floored at ``-kappa``) and ``Proj`` the
projection onto the eps-ball around ``x0`` and [0, 1]. ``D(0) = 0`` (the decoder has no biases), so both
attacks start at ``x0``. Everything but the space is the base attack's:

- ``zoo_ae`` (:func:`zoo_ae`) is :mod:`~rnd_jax.attacks.score.zoo`'s ZOO-ADAM on the latent coordinates:
  each step picks ``B`` latent coordinates without replacement, estimates their partial derivatives with
  symmetric differences ``(F(z + h e_i) - F(z - h e_i)) / (2h)``, ``h = 1e-4``, and takes a coordinate
  Adam step on them (lr 0.01, c = 0.5, one Adam state per coordinate). One step asks ``2B + 1`` points in
  one batch: the current point ``x(z)`` (its answer is only the success check) and the ``B`` pairs
  ``x(z +- h e_i)``, projected like the iterate (the map ``z -> x(z)`` is the one the attacker searches).
  Default ``B = 16``: every latent coordinate of the digits code once per step (33 queries); the
  reference code uses ``B = 128`` on MNIST's 196-dimensional code.
- ``autozoom_ae`` (:func:`autozoom_ae`) is :mod:`~rnd_jax.attacks.score.autozoom`'s random-vector
  estimate on ``z``: ``q`` directions ``u_j`` uniform on the unit sphere of ``R^d'``, smoothing radius
  ``beta = 1/d'``, ``g = sum_j (F(z + beta u_j) - F(z)) / beta * u_j``, one Adam step (lr 0.01), ``c``
  starting at 1 and multiplied by 10 every 1 000 steps while unsuccessful. One step asks ``q + 1`` points
  (default ``q = 1``: 2 queries), the current point first.

Registered threat models: ``autozoom_ae`` runs as the l_2 attack of the paper (battery eps 2.0), ``zoo_ae``
as an l_inf attack (eps 0.3) although its config's default is l_2. On the 8x8 digits, with the default
autoencoder, targeted ZOO-AE within the l_2 ball of radius 2 fools 4 to 5 of the battery's 10 images
whatever its step size, ``h``, ``c`` or coordinates per step (lr 0.01 to 0.05, h 1e-4 to 0.06, c 0.05 to 5,
B = 8 or 16): the decoded perturbation grows along directions the [0, 1] box clips (``||D(z)||`` reaches
4.4 while ``||x - x0||`` stays at 1.67), and the coordinate Adam, which moves every chosen coordinate by
about ``lr`` per step whatever its gradient, keeps pushing there. In the l_inf ball of radius 0.3 it fools 8
or 9 with lr 0.01 (which of the budget-limited images succeed depends on the last bits of the autoencoder's
weights, e.g. on XLA's optimisation level when it was trained), and 9, each within 3 800 queries, with lr
0.03: the registered battery configuration (AutoZOOM-AE: 9 of 10 in l_2 at its defaults). Untargeted,
both fool all ten in l_2 at their defaults.

Both stop at their first adversarial answer (the post-success distortion stage of the reference is not
reproduced, as in the base attacks). The decoder's weights are leaves of the step (a
:class:`jax.tree_util.Partial`), so a compiled program receives them as arguments: a built attack whose
decoder weights are swapped for another decoder's of the same shapes (:func:`rnd_jax.pytree.combine`) runs
in the same program.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.tree_util import Partial

from rnd_jax.attacks.driver import Attack
from rnd_jax.attacks.registry import BATTERY_EPS, AttackSpec, register
from rnd_jax.attacks.score.autozoom import AUTOZOOM_BAD, AutoZOOMConfig, AutoZOOMState, random_vector_step
from rnd_jax.attacks.score.nes import is_adversarial, project
from rnd_jax.attacks.score.zoo import ZOOConfig, ZOOInfo, margin_fn, objective, symmetric_difference


@dataclasses.dataclass(frozen=True)
class ZOOAEConfig(ZOOConfig):
    """ZOO-ADAM over the latent code (``coords`` = B latent coordinates per step; module docstring)."""

    coords: int = 16  # every coordinate of the digits code (4x4x1); at most the code's size


@dataclasses.dataclass(frozen=True)
class AutoZOOMAEConfig(AutoZOOMConfig):
    """AutoZOOM's random-vector estimate over the latent code (``beta = None``: 1/d'; module docstring)."""


class ZOOAEState(NamedTuple):
    x: jax.Array  # current point x(z), f32[H, W, C]
    x0: jax.Array  # original image
    z: jax.Array  # the latent code, f32[latent shape]
    cls: jax.Array  # i32: target class if targeted, else true label
    key: jax.Array
    step: jax.Array  # i32
    done: jax.Array  # bool: the answer at x was adversarial
    opt_state: optax.OptState  # one scalar Adam state per latent coordinate (leaves have a leading [d'] axis)


def check_decoder(decoder: Any, who: str) -> tuple:
    """``ValueError`` unless ``decoder`` is a decoder ``z -> D(z)`` with ``latent_shape``/``image_shape``."""
    shapes = [getattr(decoder, a, None) for a in ("latent_shape", "image_shape")]
    if not callable(decoder) or any(not isinstance(s, tuple) or len(s) != 3 for s in shapes):
        raise ValueError(f"{who} needs an autoencoder decoder (rnd_jax.autoencoder.Decoder: callable, with "
                         f"latent_shape and image_shape), got {decoder!r}")
    return tuple(shapes)


def _check_image(decoder, x0, who: str):
    if tuple(x0.shape) != tuple(decoder.image_shape):
        raise ValueError(f"{who}: the decoder makes perturbations of shape {decoder.image_shape}, the image has "
                         f"shape {tuple(x0.shape)}")


def latent_point(decoder, z, x0, eps, norm):
    """``Proj(x0 + D(z))`` for codes ``z: [..., *latent_shape]``."""
    return project(x0 + decoder(z), x0, eps, norm)


def zoo_ae(cfg: ZOOAEConfig, decoder: Any) -> Attack:
    """Build ZOO-AE for ``cfg`` searching the code of ``decoder`` (:class:`rnd_jax.autoencoder.Decoder`)."""
    latent, _ = check_decoder(decoder, "ZOO-AE")
    dim = math.prod(latent)
    if cfg.coords > dim:
        raise ValueError(f"ZOO-AE coords={cfg.coords} exceeds the {dim} coordinates of the latent code {latent}")
    adam = optax.adam(cfg.lr, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.adam_eps)
    B, h = cfg.coords, cfg.h

    def init(key, x0, label, target):
        x0 = jnp.asarray(x0, jnp.float32)
        _check_image(decoder, x0, "ZOO-AE")
        cls = jnp.asarray(target if cfg.targeted else label, jnp.int32)
        return ZOOAEState(x0, x0, jnp.zeros(latent, jnp.float32), cls, key, jnp.zeros((), jnp.int32),
                          jnp.zeros((), bool), jax.vmap(adam.init)(jnp.zeros((dim,), jnp.float32)))

    def step(decoder, s: ZOOAEState, oracle):
        x0, z = s.x0, s.z
        k = jax.random.fold_in(s.key, s.step)
        idx = jax.random.choice(k, dim, (B,), replace=False)
        e = jax.nn.one_hot(idx, dim, dtype=z.dtype).reshape((B,) + z.shape)
        codes = jnp.stack([z[None] + h * e, z[None] - h * e], axis=1).reshape((-1,) + z.shape)
        points = jnp.concatenate([s.x[None], latent_point(decoder, codes, x0, cfg.eps, cfg.norm)])
        probs = oracle(points)
        values = objective(probs, points, x0, s.cls, cfg.c, cfg.kappa, cfg.targeted)
        success = is_adversarial(probs[0], s.cls, cfg.targeted)
        g = symmetric_difference(values[1:], h)

        chosen = jax.tree.map(lambda a: a[idx], s.opt_state)
        updates, chosen = jax.vmap(adam.update)(g, chosen)
        opt_state = jax.tree.map(lambda a, b: a.at[idx].set(b), s.opt_state, chosen)
        z_new = z.reshape(-1).at[idx].add(updates).reshape(z.shape)
        x_new = latent_point(decoder, z_new, x0, cfg.eps, cfg.norm)

        keep = lambda old, new: jnp.where(success, old, new)  # noqa: E731
        new = ZOOAEState(keep(s.x, x_new), x0, keep(z, z_new), s.cls, s.key, s.step + 1, success,
                         jax.tree.map(keep, s.opt_state, opt_state))
        return new, ZOOInfo(loss=values[0], margin=margin_fn(cfg.targeted)(probs[0], s.cls))

    return Attack(init=init, step=Partial(step, decoder), cost=2 * B + 1, output="scores", targeted=cfg.targeted,
                  checks=1)


def autozoom_ae(cfg: AutoZOOMAEConfig, decoder: Any) -> Attack:
    """Build AutoZOOM-AE for ``cfg`` searching the code of ``decoder`` (:class:`rnd_jax.autoencoder.Decoder`)."""
    latent, _ = check_decoder(decoder, "AutoZOOM-AE")
    dim = math.prod(latent)
    beta = 1.0 / dim if cfg.beta is None else cfg.beta
    adam = optax.adam(cfg.lr, b1=cfg.beta1, b2=cfg.beta2)

    def init(key, x0, label, target):
        x0 = jnp.asarray(x0, jnp.float32)
        _check_image(decoder, x0, "AutoZOOM-AE")
        delta = jnp.zeros(latent, jnp.float32)
        cls = jnp.asarray(target if cfg.targeted else label, jnp.int32)
        return AutoZOOMState(x0, x0, delta, cls, key, jnp.zeros((), jnp.int32), jnp.zeros((), bool),
                             adam.init(delta))

    def step(decoder, state: AutoZOOMState, oracle):
        to_image = lambda d, x0: latent_point(decoder, d, x0, cfg.eps, cfg.norm)  # noqa: E731
        return random_vector_step(cfg, adam, beta, to_image, state, oracle)

    return Attack(init=init, step=Partial(step, decoder), cost=cfg.q + 1, output="scores", targeted=cfg.targeted)


_ZOO_BAD = (dict(coords=0), dict(coords=2.5), dict(h=0.0), dict(c=-1.0), dict(kappa=-0.1), dict(lr=0.0),
            dict(beta1=1.0), dict(eps=float("nan")), dict(norm="l1"))
_AZ_BAD = AUTOZOOM_BAD

register(AttackSpec(
    name="zoo_ae", config=ZOOAEConfig, build=lambda cfg, ctx: zoo_ae(cfg, ctx.autoencoder), family="score",
    battery=dict(norm="linf", eps=BATTERY_EPS["linf"], lr=0.03, budget=10_000), needs=("autoencoder",),
    bad_configs=_ZOO_BAD))

register(AttackSpec(
    name="autozoom_ae", config=AutoZOOMAEConfig, build=lambda cfg, ctx: autozoom_ae(cfg, ctx.autoencoder),
    family="score", battery=dict(norm="l2", eps=BATTERY_EPS["l2"], budget=2_000), needs=("autoencoder",),
    bad_configs=_AZ_BAD))
