"""SimBA: simple black-box attacks along orthonormal directions, in the pixel or the DCT basis.

Guo, Gardner, You, Wilson & Weinberger, "Simple Black-box Adversarial Attacks", ICML 2019
(arXiv:1905.07121), Algorithm 1.

The attack walks through an orthonormal basis ``Q`` in a random order (without replacement). At
step ``k`` with direction ``q = Q[order[k]]`` it asks about ``x - eps_step*q`` and ``x + eps_step*q``
and moves to whichever lowers the attack probability below the stored value (untargeted: the
probability of the true label ``p_y``; targeted: ``-p_t``, i.e. it raises the target's
probability); otherwise it stays. The stored value is the answer that accepted the current point,
exactly as in the paper (not a fresh answer), so ``done`` is that same answer's verdict.

Bases (``jax.scipy.fft`` for the DCT):

- ``simba_pixel``: the standard basis, in uniformly random order;
- ``simba_dct``: the orthonormal 2-D DCT-II basis per channel (``idctn(e_k, norm="ortho")``), low
  frequencies first: a random order within the ``f x f`` lowest-frequency block, then within each
  band ``max(u, v) in [f + s*i, f + s*(i+1))`` (the paper's "strided" block order). The paper
  uses ``f = 28, s = 7`` on 224x224 images; ``freq_init=None, stride=None`` scale this to
  ``max(1, round(H/8))`` and ``max(1, round(H/32))`` -- both 1 for 8x8 digits.

Batched queries and cost. The paper's batched implementation asks about both candidates for every
image and keeps the better one if it improves (``x + eps*q`` wins when it beats both the stored
value and ``x - eps*q``); this module does the same, so a step sends ONE batch of 2 points and costs
2 queries (the paper's count charges only one when the first candidate improves, although its
batched code computes both). The first step must know the probability at the starting image: it
asks ``[x0, x0 - eps*q_0]`` instead (the starting point's answer is the stored value and the success
check), so the first direction is only tried with the minus sign. SimBA is a 2-points-per-call
attack by design; batching across images (``vmap``, any batch size) is what fills the device.

Threat model. The perturbation ``delta = sum_k alpha_k q_k`` is kept in the basis (as the paper
keeps its coefficients) and the queried point is ``clip(x0 + Proj_eps(delta), 0, 1)``: the paper's
clip to [0, 1], plus the projection onto the eps-ball of the evaluation protocol (a rescaling for
``l2``, a clip for ``linf``). The paper stops after one pass through the basis (``d`` steps); on
small images one pass can be too short, so after every direction has been tried the same order is
walked again (an extension; after ``passes`` walks the state reports ``failed`` and the driver
stops the image). ``eps_step = 0.2`` as in the paper.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.fft as jfft

from rnd_jax.attacks.driver import Attack
from rnd_jax.attacks.registry import BATTERY_EPS, AttackSpec, register
from rnd_jax.attacks.score.nes import is_adversarial

NORMS = ("linf", "l2")


@dataclasses.dataclass(frozen=True)
class SimBAPixelConfig:
    """SimBA in the pixel (standard) basis."""

    eps: float = 2.0  # radius of the perturbation ball around the original image
    norm: str = "l2"  # "l2" (the paper's measure) or "linf"
    targeted: bool = True
    step_size: float = 0.2  # the paper's epsilon: the length of each move along a basis vector
    passes: int = 8  # walks through the whole basis before the attack gives up

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {NORMS}")
        for name in ("eps", "step_size"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
                raise ValueError(f"SimBA {name} must be a finite number > 0, got {v!r}")
        if isinstance(self.passes, bool) or not isinstance(self.passes, int) or self.passes < 1:
            raise ValueError(f"SimBA passes must be an int >= 1, got {self.passes!r}")
        if not isinstance(self.targeted, bool):
            raise ValueError(f"SimBA targeted must be a bool, got {self.targeted!r}")

    basis = "pixel"


@dataclasses.dataclass(frozen=True)
class SimBADCTConfig(SimBAPixelConfig):
    """SimBA-DCT: low-frequency DCT directions first (the paper's strided block order)."""

    freq_init: int | None = None  # side of the first block of frequencies; None = max(1, round(H/8))
    stride: int | None = None  # width of each following band; None = max(1, round(H/32))

    def __post_init__(self):
        super().__post_init__()
        for name in ("freq_init", "stride"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"SimBA-DCT {name} must be None or an int >= 1, got {v!r}")

    basis = "dct"

    def block(self, size: int) -> tuple[int, int]:
        f = max(1, round(size / 8)) if self.freq_init is None else self.freq_init
        s = max(1, round(size / 32)) if self.stride is None else self.stride
        return f, s


class SimBAState(NamedTuple):
    x: jax.Array  # current point f32[H, W, C]
    x0: jax.Array
    delta: jax.Array  # the accumulated perturbation sum_k alpha_k q_k (before projection and clipping)
    order: jax.Array  # i32[d]: the order in which basis directions are tried
    prob: jax.Array  # f32: the stored attack probability at x (the answer that accepted x)
    cls: jax.Array  # i32: target class if targeted, else true label
    key: jax.Array
    step: jax.Array  # i32
    done: jax.Array  # bool: the answer that accepted x was adversarial
    failed: jax.Array  # bool: every pass through the basis is spent (the driver stops the image)


class SimBAInfo(NamedTuple):
    loss: jax.Array  # the stored attack probability after the step (p_y, or -p_t when targeted)
    moved: jax.Array  # bool: a candidate was accepted


def dct_basis_vector(index, shape):
    """The orthonormal DCT-II basis image for flat coefficient ``index`` of an ``[H, W, C]`` image."""
    e = jax.nn.one_hot(index, math.prod(shape), dtype=jnp.float32).reshape(shape)
    return jfft.idctn(e, type=2, norm="ortho", axes=(0, 1))


def pixel_basis_vector(index, shape):
    return jax.nn.one_hot(index, math.prod(shape), dtype=jnp.float32).reshape(shape)


def frequency_bands(shape, freq_init: int, stride: int):
    """Band of every flat coefficient ``(u, v, c)``: 0 inside the first ``f x f`` block, then 1, 2, ..."""
    H, W, C = shape
    u = jnp.arange(H)[:, None, None]
    v = jnp.arange(W)[None, :, None]
    m = jnp.broadcast_to(jnp.maximum(u, v), (H, W, C)).reshape(-1)
    return jnp.where(m < freq_init, 0, 1 + (m - freq_init) // stride)


def basis_order(key, bands):
    """A random order of the coefficients, band by band (random within each band)."""
    return jnp.lexsort((jax.random.uniform(key, bands.shape), bands)).astype(jnp.int32)


def attack_value(probs, cls, targeted: bool):
    """The value SimBA lowers: ``p_y`` (untargeted) or ``-p_t`` (targeted); NaN answers give +inf."""
    p = jnp.take_along_axis(probs, jnp.broadcast_to(cls, probs.shape[:-1])[..., None], axis=-1)[..., 0]
    v = -p if targeted else p
    return jnp.where(jnp.isnan(v), jnp.inf, v)  # a NaN answer never counts as an improvement


def _place(x0, delta, eps: float, norm: str):
    """``clip(x0 + Proj_eps(delta), 0, 1)``."""
    if norm == "linf":
        d = jnp.clip(delta, -eps, eps)
    else:
        n = jnp.sqrt(jnp.sum(delta * delta))
        d = delta * jnp.minimum(1.0, eps / jnp.maximum(n, 1e-12))
    return jnp.clip(x0 + d, 0.0, 1.0)


def simba(cfg: SimBAPixelConfig) -> Attack:
    """Build SimBA (pixel basis for :class:`SimBAPixelConfig`, DCT for :class:`SimBADCTConfig`)."""
    vector = dct_basis_vector if cfg.basis == "dct" else pixel_basis_vector

    def init(key, x0, label, target):
        x0 = jnp.asarray(x0, jnp.float32)
        H, W, C = x0.shape
        if cfg.basis == "dct":
            f, s = cfg.block(H)
            bands = frequency_bands(x0.shape, f, s)
        else:
            bands = jnp.zeros((x0.size,), jnp.int32)
        order = basis_order(key, bands)  # the only randomness of SimBA
        cls = jnp.asarray(target if cfg.targeted else label, jnp.int32)
        return SimBAState(x0, x0, jnp.zeros_like(x0), order, jnp.asarray(jnp.inf, jnp.float32), cls, key,
                          jnp.zeros((), jnp.int32), jnp.zeros((), bool), jnp.zeros((), bool))

    def step(state: SimBAState, oracle):
        d = state.x.size
        first = state.step == 0
        k = state.step % d
        q = cfg.step_size * vector(state.order[k], state.x.shape)
        minus = _place(state.x0, state.delta - q, cfg.eps, cfg.norm)
        plus = _place(state.x0, state.delta + q, cfg.eps, cfg.norm)
        points = jnp.stack([jnp.where(first, state.x, minus), jnp.where(first, minus, plus)])
        probs = oracle(points)
        p = attack_value(probs, state.cls, cfg.targeted)
        adv = is_adversarial(probs, state.cls, cfg.targeted)

        base = jnp.where(first, p[0], state.prob)
        base_adv = jnp.where(first, adv[0], state.done)
        p_minus, adv_minus = jnp.where(first, p[1], p[0]), jnp.where(first, adv[1], adv[0])
        take_minus = p_minus < base
        take_plus = jnp.logical_not(first) & (p[1] < jnp.minimum(base, p_minus))
        moved = take_minus | take_plus
        x = jnp.where(take_plus, plus, jnp.where(take_minus, minus, state.x))
        delta = jnp.where(take_plus, state.delta + q, jnp.where(take_minus, state.delta - q, state.delta))
        prob = jnp.where(take_plus, p[1], jnp.where(take_minus, p_minus, base))
        done = jnp.where(take_plus, adv[1], jnp.where(take_minus, adv_minus, base_adv))
        # an adversarial starting point (first step) stops there, before any move
        stop_at_start = first & adv[0]
        x = jnp.where(stop_at_start, state.x, x)
        delta = jnp.where(stop_at_start, state.delta, delta)
        prob = jnp.where(stop_at_start, p[0], prob)
        done = done | stop_at_start
        failed = jnp.logical_not(done) & (state.step + 1 >= cfg.passes * d)
        new = SimBAState(x, state.x0, delta, state.order, prob, state.cls, state.key, state.step + 1, done, failed)
        return new, SimBAInfo(loss=prob, moved=moved & jnp.logical_not(stop_at_start))

    return Attack(init=init, step=step, cost=2, output="scores", targeted=cfg.targeted)


_BAD = (dict(step_size=0.0), dict(step_size=float("nan")), dict(eps=0.0), dict(norm="l1"), dict(passes=0))

register(AttackSpec(
    name="simba_pixel", config=SimBAPixelConfig, build=lambda cfg, ctx: simba(cfg), family="score",
    battery=dict(norm="l2", eps=BATTERY_EPS["l2"], budget=1_000), bad_configs=_BAD))

register(AttackSpec(
    name="simba_dct", config=SimBADCTConfig, build=lambda cfg, ctx: simba(cfg), family="score",
    battery=dict(norm="l2", eps=BATTERY_EPS["l2"], budget=1_000),
    bad_configs=_BAD + (dict(freq_init=0), dict(stride=-1))))
