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

Every scorer built here is a pytree (a :class:`jax.tree_util.Partial` of a module-level function):
the model's params are its leaves, the levels and options its static part, so a compiled attack
receives the params as arguments (:mod:`rnd_jax.pytree`). Any other callable ``(x, keys) -> probs``
is a scorer too (its closed-over arrays are then compiled in as constants).

Implemented here:

- :func:`output_noise` on probabilities (Aithal & Li 2022, Sec. III-A and IV-B): ``F(x) + sigma*v``
  with ``v ~ N(0, I)``, post-processed as in their experiments — negative entries are replaced by
  their absolute value and entries above 1 are clipped to 1 (no renormalisation).
- :func:`output_noise` on logits (``space="logits"``): ``softmax(z(x) + sigma*v)``; computed from
  the probabilities as ``softmax(log F(x) + sigma*v)``, which equals the logit form because softmax
  is invariant to the per-row constant ``logsumexp(z)``.
- :func:`input_noise` (SND, Byun et al. 2022; RND, Qin et al. 2021): the model sees
  ``x + nu*eta`` with ``eta ~ N(0, I)``; the noisy image is not clipped to [0, 1] unless asked.
  With ``scale=(a, b)`` each query's noise is multiplied by its own ``k ~ Beta(a, b)`` (SND
  Sec. 4.7: (1, 1) uniform, (2, 2) cap-shaped, (0.5, 0.5) cup-shaped).
- :func:`feature_noise` (randomized feature defense, Algorithm 1): Gaussian noise of std ``nu``
  added to marked hidden layers (default: the penultimate marked layer) through the Flax
  ``perturbations`` collection. ``nu`` here is a *standard deviation*; the paper writes the
  noise as ``N(0, nu I)`` with ``nu`` a variance, i.e. its ``nu`` is our ``nu**2``.
- Baselines: :func:`quantize` (output quantization to 1..16 bits), :func:`correlated_noise`
  (``v = alpha*F(x) + eps``, Aithal & Li Lemma 2 / Table 5) and :func:`resize_pad` (random
  resize-and-pad, Xie et al. 2018).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

Scorer = Callable[[jax.Array, jax.Array], jax.Array]

OUTPUT_SPACES = ("probs", "logits")


def _traced(value) -> bool:
    return isinstance(value, jax.core.Tracer)


def _array(value) -> bool:
    """A level given as a 0-d array: it stays an array, a leaf that a compiled program takes as argument."""
    return isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value) == 0


def _is_zero(value) -> bool:
    """True for a concrete zero level given as a Python number (the defense is then the identity).

    A level given as an array (or traced) is never treated as zero, so the scorer keeps one structure
    for every level (one compiled program for a sweep); at 0 it then adds zero noise.
    """
    return not _traced(value) and not _array(value) and value == 0.0


def check_level(name: str, value) -> float:
    """Validate a noise level: a finite real number >= 0. Returns it as a Python float.

    A traced level (a defense built inside ``jit``/``vmap``, e.g. to sweep or bisect the level
    without recompiling) is returned as is: validate the concrete values before tracing. A concrete
    0-d array is validated and returned as an array (a program argument, :mod:`rnd_jax.pytree`).
    """
    if _traced(value):
        return value
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number >= 0, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return value if _array(value) else v


def _model_scores(model, params, batch_size, x, keys):
    del keys

    def apply(xx):
        return jax.nn.softmax(model.apply({"params": params}, xx), axis=-1)

    n = x.shape[0]
    if batch_size is None or n <= batch_size:
        return apply(x)
    chunks = -(-n // batch_size)
    pad = chunks * batch_size - n
    xp = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
    out = jax.lax.map(apply, xp.reshape((chunks, batch_size) + x.shape[1:]))
    return out.reshape((chunks * batch_size,) + out.shape[2:])[:n]


def model_scorer(model, params, batch_size: int | None = None) -> Scorer:
    """The clean scorer of a Flax classifier returning logits: ``softmax(model.apply(x))``.

    A pytree (:mod:`rnd_jax.pytree`): ``params`` are its leaves, so a compiled attack receives them as
    arguments instead of compiling them in. ``batch_size``: evaluate a query batch in chunks of at most
    that many points (``lax.map``), which bounds activation memory for large models (ResNet-50 at 224:
    about 20 MB of activations per point); ``None`` evaluates the whole batch at once.
    """
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    return Partial(_model_scores, model, params, batch_size)


def _split_keys(keys):
    """Per point: (this defense's key, the key handed to the wrapped scorer)."""
    pairs = jax.vmap(jax.random.split)(keys)
    return pairs[:, 0], pairs[:, 1]


def _normal(keys, shape, dtype):
    """One standard normal array of ``shape`` per key: f32[len(keys), *shape]."""
    return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(keys)


def output_noise(scorer: Scorer, sigma, space: str = "probs", postprocess: bool = True) -> Scorer:
    """Gaussian noise of std ``sigma`` on the answer (Aithal & Li 2022, Theorem 1 setting).

    ``space="probs"``: ``min(|F(x) + sigma*v|, 1)`` — the paper's post-processing of soft labels; with
    ``postprocess=False`` the raw ``F(x) + sigma*v`` (entries may be < 0 or > 1), whose argmax is the
    paper's hard label ``argmax(F(x) + sigma*v)`` (their Tables 3 and 10; the absolute value can change
    the argmax when a large negative entry flips sign).
    ``space="logits"``: ``softmax(z(x) + sigma*v)``, a proper probability vector.
    """
    sigma = check_level("sigma", sigma)
    if space not in OUTPUT_SPACES:
        raise ValueError(f"unknown output-noise space {space!r}; choose one of {OUTPUT_SPACES}")
    if not isinstance(postprocess, bool):
        raise ValueError(f"output-noise postprocess must be a bool, got {postprocess!r}")
    if _is_zero(sigma):
        return scorer
    return Partial(_output_noise, scorer, sigma, space, postprocess)


def _output_noise(scorer, sigma, space, postprocess, x, keys):
    mine, inner = _split_keys(keys)
    p = scorer(x, inner)
    v = _normal(mine, p.shape[1:], p.dtype)
    if space == "probs":
        return jnp.minimum(jnp.abs(p + sigma * v), 1.0) if postprocess else p + sigma * v
    logp = jnp.log(jnp.maximum(p, jnp.finfo(p.dtype).tiny))
    return jax.nn.softmax(logp + sigma * v, axis=-1)


def _check_beta(scale):
    if scale is None:
        return None
    try:
        a, b = (float(v) for v in scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a pair (alpha, beta) of Beta parameters, got {scale!r}") from None
    if not (math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0):
        raise ValueError(f"Beta parameters must be finite and > 0, got {scale!r}")
    return a, b


def input_noise(scorer: Scorer, nu, clip: bool = False, scale=None) -> Scorer:
    """Gaussian noise of std ``nu`` on the query image (SND / RND): the model sees ``x + nu*eta``.

    With ``clip=True`` the noisy image is clipped to [0, 1]; the papers do not clip. With
    ``scale=(alpha, beta)`` the noise of each query is ``k*nu*eta`` with its own
    ``k ~ Beta(alpha, beta)`` (SND Sec. 4.7).
    """
    nu = check_level("nu", nu)
    scale = _check_beta(scale)
    if _is_zero(nu):
        return scorer
    return Partial(_input_noise, scorer, nu, clip, scale)


def _input_noise(scorer, nu, clip, scale, x, keys):
    mine, inner = _split_keys(keys)
    eta = _normal(mine, x.shape[1:], x.dtype)
    if scale is not None:
        k = jax.vmap(lambda kk: jax.random.beta(jax.random.fold_in(kk, 1), scale[0], scale[1]))(mine)
        eta = eta * k.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    xn = x + nu * eta
    if clip:
        xn = jnp.clip(xn, 0.0, 1.0)
    return scorer(xn, inner)


def feature_noise(model, params, nu, input_shape, layers=None) -> Scorer:
    """Randomized feature defense (Algorithm 1): ``h_l(x) + nu_l * delta`` at marked layers.

    ``nu`` is one std for every layer in ``layers`` (default: the penultimate marked layer, i.e.
    the last mark before the logits), or a dict ``{layer: std}``. ``input_shape`` is the
    per-image ``(H, W, C)``, used to find the marked layers and their shapes. This is a base
    scorer (it replaces :func:`model_scorer`); other defenses compose on top of it.
    """
    from rnd_jax.models import feature_shapes

    shapes = feature_shapes(model, tuple(input_shape))
    names = list(shapes)
    if not names:
        raise ValueError("this model marks no hidden layer with perturb(); feature noise needs one")
    if isinstance(nu, dict):
        levels = dict(nu)
    else:
        chosen = [names[-1]] if layers is None else ([layers] if isinstance(layers, str) else list(layers))
        levels = {name: nu for name in chosen}
    unknown = [n for n in levels if n not in shapes]
    if unknown or not levels:
        raise ValueError(f"unknown or missing feature layer(s) {unknown}; this model marks {names}")
    levels = {n: check_level(f"nu[{n}]", v) for n, v in levels.items()}
    active = [n for n in names if n in levels and not _is_zero(levels[n])]
    clean = model_scorer(model, params)
    if not active:
        return clean
    return Partial(_feature_noise, model, params, tuple(names), tuple(active), {n: levels[n] for n in active},
                   {n: tuple(shapes[n]) for n in names})


def _feature_noise(model, params, names, active, levels, shapes, x, keys):
    from rnd_jax.models import PERTURBATIONS

    mine, _ = _split_keys(keys)
    pert = {}
    for i, n in enumerate(names):
        if n in active:
            k = jax.vmap(lambda kk: jax.random.fold_in(kk, i))(mine)
            pert[n] = levels[n] * _normal(k, shapes[n], x.dtype)
        else:
            pert[n] = jnp.zeros((x.shape[0],) + shapes[n], x.dtype)
    logits = model.apply({"params": params, PERTURBATIONS: pert}, x)
    return jax.nn.softmax(logits, axis=-1)


def quantize(scorer: Scorer, bits) -> Scorer:
    """Output quantization: probabilities rounded to ``2**bits - 1`` equal steps (Lemma 2 baseline).

    Deterministic: the noise it creates is a function of the clean output, which is why it does
    not defend (Aithal & Li 2022, Lemma 2). 1 bit keeps only whether ``p >= 0.5``.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"quantization bits must be an int in 1..16, got {bits!r}")
    return Partial(_quantize, scorer, float(2 ** bits - 1))


def _quantize(scorer, levels, x, keys):
    return jnp.round(scorer(x, keys) * levels) / levels


def correlated_noise(scorer: Scorer, alpha, sigma=0.0) -> Scorer:
    """Output-correlated noise ``v = alpha*F(x) + sigma*eps`` (Aithal & Li 2022, Lemma 2).

    Answers ``min(|F(x) + v|, 1)`` with the paper's post-processing. The correlated part is a
    deterministic rescaling of the answer, so only ``sigma`` randomizes the attacker's estimate.
    """
    alpha = check_level("alpha", alpha)
    sigma = check_level("sigma", sigma)
    return Partial(_correlated_noise, scorer, alpha, sigma, _is_zero(sigma))


def _correlated_noise(scorer, alpha, sigma, no_noise, x, keys):
    mine, inner = _split_keys(keys)
    p = scorer(x, inner)
    v = alpha * p
    if not no_noise:
        v = v + sigma * _normal(mine, p.shape[1:], p.dtype)
    return jnp.minimum(jnp.abs(p + v), 1.0)


def resize_pad(scorer: Scorer, max_extra) -> Scorer:
    """Random resize-and-pad (Xie et al. 2018), per query.

    An ``H x W`` image is resized (bilinear, ``jax.image.resize``) to ``(H + r) x (W + r)`` with
    ``r`` uniform in ``0..max_extra``, zero-padded at a random offset to
    ``(H + max_extra) x (W + max_extra)``, and — because our models take a fixed input size —
    resized back to ``H x W`` before the model sees it. ``max_extra = 0`` is the identity.
    """
    if isinstance(max_extra, bool) or not isinstance(max_extra, int) or max_extra < 0:
        raise ValueError(f"resize_pad max_extra must be an int >= 0 (pixels), got {max_extra!r}")
    if max_extra == 0:
        return scorer
    return Partial(_resize_pad, scorer, max_extra)


def _resize_pad(scorer, max_extra, x, keys):
    def one(img, key):
        h, w, c = img.shape
        big = (h + max_extra, w + max_extra, c)
        k_r, k_i, k_j = jax.random.split(key, 3)

        def branch(r):
            def f(off):
                small = jax.image.resize(img, (h + r, w + r, c), "bilinear")
                return jax.lax.dynamic_update_slice(jnp.zeros(big, img.dtype), small, (off[0], off[1], 0))
            return f

        r = jax.random.randint(k_r, (), 0, max_extra + 1)
        room = max_extra - r
        off = (jnp.floor(jax.random.uniform(k_i) * (room + 1)).astype(jnp.int32),
               jnp.floor(jax.random.uniform(k_j) * (room + 1)).astype(jnp.int32))
        padded = jax.lax.switch(r, [branch(i) for i in range(max_extra + 1)], off)
        return jax.image.resize(padded, (h, w, c), "bilinear")

    mine, inner = _split_keys(keys)
    return scorer(jax.vmap(one)(x, mine), inner)


@dataclasses.dataclass(frozen=True)
class DefenseSpec:
    """A defense family by name: ``build(model, params, level, input_shape, **options) -> Scorer``.

    ``level`` is the family's noise parameter (``param``); ``calibratable`` families have a noise
    level whose increase lowers clean accuracy, so :mod:`rnd_jax.calibrate` can bisect it.
    """

    name: str
    param: str
    build: Callable
    calibratable: bool
    options: tuple[str, ...] = ()


def _on_clean(fn):
    return lambda model, params, level, input_shape, **o: fn(model_scorer(model, params), level, **o)


DEFENSES: dict[str, DefenseSpec] = {d.name: d for d in (
    DefenseSpec("none", "level", lambda model, params, level, input_shape: model_scorer(model, params), False),
    DefenseSpec("output_noise", "sigma", _on_clean(lambda s, v, postprocess=True: output_noise(s, v, "probs",
                                                                                              postprocess)),
                True, ("postprocess",)),
    DefenseSpec("output_noise_logits", "sigma", _on_clean(lambda s, v: output_noise(s, v, "logits")), True),
    DefenseSpec("input_noise", "nu", _on_clean(input_noise), True, ("clip", "scale")),
    DefenseSpec("feature_noise", "nu",
                lambda model, params, level, input_shape, layers=None: feature_noise(model, params, level, input_shape,
                                                                                  layers), True, ("layers",)),
    DefenseSpec("quantize", "bits", _on_clean(quantize), False),
    DefenseSpec("correlated_noise", "alpha", _on_clean(correlated_noise), False, ("sigma",)),
    DefenseSpec("resize_pad", "max_extra", _on_clean(resize_pad), False),
)}


def build_defense(name: str, model, params, level, input_shape, **options) -> Scorer:
    """The defended scorer of family ``name`` at ``level``; validated now, before any tracing."""
    if name not in DEFENSES:
        raise ValueError(f"unknown defense {name!r}; choose one of {sorted(DEFENSES)}")
    spec = DEFENSES[name]
    bad = sorted(set(options) - set(spec.options))
    if bad:
        raise ValueError(f"unknown option(s) {bad} for defense {name!r}; valid: {list(spec.options)}")
    if name == "none":
        return spec.build(model, params, level, input_shape)
    return spec.build(model, params, level, tuple(input_shape), **options)
