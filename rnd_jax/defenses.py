"""Randomized inference-time defenses as scorer transforms.

A **scorer** is the defender-side view of a classifier::

    scores(x: f32[B, H, W, C], keys: key[B]) -> f32[B, K]   # class probabilities

``keys`` holds one PRNG key per query point (row of ``x``). The oracle derives key ``q`` as
``fold_in(defense_key, q)`` from the query's global index ``q``, so the noise a point receives
depends only on (defense key, query index): never on the batch it travels in, nor on the
attacker's key. A clean scorer ignores its keys.

A **defense** turns a scorer into a scorer. Defenses compose by nesting,
``output_noise(input_noise(clean, nu), sigma)``; each one splits every point's key into its own
key and the key it hands to the scorer it wraps, so composed defenses draw independent noise.
Parameters are validated when the defense is built (plain Python, before any tracing), and a zero
noise level returns the wrapped scorer itself, so it answers exactly the clean scores.

Implemented here:

- :func:`output_noise` on probabilities (Aithal & Li 2022, Sec. III-A and IV-B): ``F(x) + sigma*v``
  with ``v ~ N(0, I)``, post-processed as in their experiments — negative entries are replaced by
  their absolute value and entries above 1 are clipped to 1 (no renormalisation).
- :func:`output_noise` on logits (``space="logits"``): ``softmax(z(x) + sigma*v)``; computed from
  the probabilities as ``softmax(log F(x) + sigma*v)``, which equals the logit form because softmax
  is invariant to the per-row constant ``logsumexp(z)``.
- :func:`input_noise` (SND, Byun et al. 2022; RND, Qin et al. 2021): the model sees
  ``x + nu*eta`` with ``eta ~ N(0, I)``; the noisy image is not clipped to [0, 1] unless asked.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

Scorer = Callable[[jax.Array, jax.Array], jax.Array]

OUTPUT_SPACES = ("probs", "logits")


def check_level(name: str, value) -> float:
    """Validate a noise level: a finite real number >= 0. Returns it as a Python float."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number >= 0, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return v


def model_scorer(model, params) -> Scorer:
    """The clean scorer of a Flax classifier returning logits: ``softmax(model.apply(x))``."""

    def scores(x, keys):
        del keys
        return jax.nn.softmax(model.apply({"params": params}, x), axis=-1)

    return scores


def _split_keys(keys):
    """Per point: (this defense's key, the key handed to the wrapped scorer)."""
    pairs = jax.vmap(jax.random.split)(keys)
    return pairs[:, 0], pairs[:, 1]


def _normal(keys, shape, dtype):
    """One standard normal array of ``shape`` per key: f32[len(keys), *shape]."""
    return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(keys)


def output_noise(scorer: Scorer, sigma, space: str = "probs") -> Scorer:
    """Gaussian noise of std ``sigma`` on the answer (Aithal & Li 2022, Theorem 1 setting).

    ``space="probs"``: ``min(|F(x) + sigma*v|, 1)`` — the paper's post-processing.
    ``space="logits"``: ``softmax(z(x) + sigma*v)``, a proper probability vector.
    """
    sigma = check_level("sigma", sigma)
    if space not in OUTPUT_SPACES:
        raise ValueError(f"unknown output-noise space {space!r}; choose one of {OUTPUT_SPACES}")
    if sigma == 0.0:
        return scorer

    def scores(x, keys):
        mine, inner = _split_keys(keys)
        p = scorer(x, inner)
        v = _normal(mine, p.shape[1:], p.dtype)
        if space == "probs":
            return jnp.minimum(jnp.abs(p + sigma * v), 1.0)
        logp = jnp.log(jnp.maximum(p, jnp.finfo(p.dtype).tiny))
        return jax.nn.softmax(logp + sigma * v, axis=-1)

    return scores


def input_noise(scorer: Scorer, nu, clip: bool = False) -> Scorer:
    """Gaussian noise of std ``nu`` on the query image (SND / RND): the model sees ``x + nu*eta``.

    With ``clip=True`` the noisy image is clipped to [0, 1]; the papers do not clip.
    """
    nu = check_level("nu", nu)
    if nu == 0.0:
        return scorer

    def scores(x, keys):
        mine, inner = _split_keys(keys)
        xn = x + nu * _normal(mine, x.shape[1:], x.dtype)
        if clip:
            xn = jnp.clip(xn, 0.0, 1.0)
        return scorer(xn, inner)

    return scores


# name -> (builder(scorer, level) -> scorer, name of its level parameter)
DEFENSES: dict[str, tuple[Callable[[Scorer, float], Scorer], str]] = {
    "none": (lambda scorer, level: scorer, "level"),
    "output_noise": (lambda scorer, level: output_noise(scorer, level, "probs"), "sigma"),
    "output_noise_logits": (lambda scorer, level: output_noise(scorer, level, "logits"), "sigma"),
    "input_noise": (lambda scorer, level: input_noise(scorer, level), "nu"),
}


def make_defense(name: str, level=0.0) -> Callable[[Scorer], Scorer]:
    """A defense by registry name and noise level, validated now; apply it to a scorer later."""
    if name not in DEFENSES:
        raise ValueError(f"unknown defense {name!r}; choose one of {sorted(DEFENSES)}")
    builder, param = DEFENSES[name]
    level = check_level(param, level)
    return lambda scorer: builder(scorer, level)
