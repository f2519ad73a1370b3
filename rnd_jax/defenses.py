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
- :func:`output_noise_park` (Park et al., output randomization at test time): ``p + eps`` with
  ``eps ~ N(mu, sigma^2 I)``, level the *variance* ``sigma^2``, no post-processing at all.
- Baselines: :func:`quantize` (output quantization to 1..16 bits), :func:`correlated_noise`
  (``v = alpha*F(x) + eps``, Aithal & Li Lemma 2 / Table 5), :func:`resize_pad` (shrink-or-keep,
  pad and resize back), :func:`random_resize_pad` (Xie et al. 2018 as defined: enlarge, pad, feed the
  larger image), :func:`jpeg` (JPEG compression of each query, Guo et al. 2018; :mod:`rnd_jax.jpeg`)
  and :func:`aaa` (Adversarial Attack on Attackers, Chen et al. 2022: deterministic logit
  post-processing that reverses the attacker's margin loss and keeps the top-1 label).
- Trained noise layers (:mod:`rnd_jax.noisy`, trained with :mod:`rnd_jax.train`): :func:`rse` (Random
  Self-Ensemble, Liu et al. 2018: the mean of several noisy passes) and :func:`pni` (Parametric Noise
  Injection, He et al. 2019: the noise kept on at inference); their level is the number of noisy passes.
- :func:`feature_noise` with ``scale="std"``: the noise of each feature scaled by its std on training data,
  as the randomized feature defense's official code does.

Levels are refused when built if they are not finite, negative, or so large that their square
overflows float32 (:func:`check_level`).
"""

from __future__ import annotations

import dataclasses
import functools
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
    """Validate a noise level: a finite real number >= 0 whose square is a finite float32 (at most
    :data:`F32_LEVEL_MAX`, about 1.8e19: a larger std overflows the variance and, on [0, 1] data, the noisy
    values themselves). Returns it as a Python float.

    A traced level (a defense built inside ``jit``/``vmap``, e.g. to sweep or bisect the level
    without recompiling) is returned as is: validate the concrete values before tracing. A concrete
    0-d array is validated and returned as an array (a program argument, :mod:`rnd_jax.pytree`).
    """
    if _traced(value):
        return value
    if isinstance(value, (bool, np.bool_, str, bytes)) or (_array(value) and np.asarray(value).dtype == bool):
        raise ValueError(f"{name} must be a real number >= 0, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number >= 0, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    _check_f32(name, value, v)
    return value if _array(value) else v


F32_MAX = float(np.finfo(np.float32).max)
F32_LEVEL_MAX = math.sqrt(F32_MAX)  # ~1.84e19: the largest level whose square is a finite float32


def _check_f32(name: str, value, v: float) -> None:
    """Refuse a level whose square (a variance) or whose effect on [0, 1] data overflows float32."""
    if abs(v) > F32_LEVEL_MAX:
        raise ValueError(f"{name} = {value!r} overflows float32: its square (and the noise it adds to data in "
                         f"[0, 1]) exceeds the float32 range {F32_MAX:.4g}; use |{name}| <= {F32_LEVEL_MAX:.4g}")


def check_real(name: str, value) -> float:
    """Validate a finite real number of either sign whose square is a finite float32 (e.g. a noise mean)."""
    if _traced(value):
        return value
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    _check_f32(name, value, v)
    return value if _array(value) else v


@functools.partial(jax.jit, static_argnums=0)
def _softmax_apply(model, params, x):
    """``softmax(model.apply(x))``: one sub-program per (model, batch shape), traced once.

    Attacks query the model from many places (a start search, bisections, an estimate, ...). Inside
    the attack's own traced program this ``jit`` is no separate compile: it lets JAX trace the model
    once per batch shape and lower it once, however many places ask points of that shape (HSJA at
    224x224: 7 places, 4 batch shapes). XLA still inlines each place's copy.
    """
    return jax.nn.softmax(model.apply({"params": params}, x), axis=-1)


def _model_scores(model, params, batch_size, x, keys):
    del keys

    try:
        hash(model)
        shared = True
    except TypeError:  # a module with unhashable fields: traced at each place instead
        shared = False

    def apply(xx):
        if shared:
            return _softmax_apply(model, params, xx)
        return jax.nn.softmax(model.apply({"params": params}, xx), axis=-1)

    n = x.shape[0]
    if batch_size is None or n <= batch_size:
        return apply(x)
    chunks = -(-n // batch_size)
    pad = chunks * batch_size - n
    xp = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
    out = jax.lax.map(apply, xp.reshape((chunks, batch_size) + x.shape[1:]))
    return out.reshape((chunks * batch_size,) + out.shape[2:])[:n]


def model_scorer(model, params, batch_size: int | None = None, compact: bool = False) -> Scorer:
    """The clean scorer of a Flax classifier returning logits: ``softmax(model.apply(x))``.

    A pytree (:mod:`rnd_jax.pytree`): ``params`` are its leaves, so a compiled attack receives them as
    arguments instead of compiling them in. ``batch_size``: evaluate a query batch in chunks of at most
    that many points (``lax.map``), which bounds activation memory for large models (ResNet-50 at 224:
    about 20 MB of activations per point); ``None`` evaluates the whole batch at once.

    ``compact=True``: inside a vmapped attack loop, evaluate the model on the live points only
    (:func:`rnd_jax.compact.compacted`): finished images stop costing model time, results unchanged.
    The experiments, sweeps and benchmarks turn it on; it adds a few copies of the model to each
    program (its buckets), so one-off programs compile a little longer.
    """
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    if not isinstance(compact, bool):
        raise ValueError(f"compact must be a bool, got {compact!r}")
    scorer = Partial(_model_scores, model, params, batch_size)
    if compact:
        from rnd_jax.compact import compacted
        scorer = compacted(scorer)
    return scorer


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
    for name, v in (("Beta alpha", a), ("Beta beta", b)):
        _check_f32(name, v, v)  # a float32 Beta sampler returns NaN for parameters beyond float32 (1e300)
    return a, b


def input_noise(scorer: Scorer, nu, clip: bool = False, scale=None) -> Scorer:
    """Gaussian noise of std ``nu`` on the query image (SND / RND): the model sees ``x + nu*eta``.

    With ``clip=True`` the noisy image is clipped to [0, 1]; the papers do not clip. With
    ``scale=(alpha, beta)`` the noise of each query is ``k*nu*eta`` with its own
    ``k ~ Beta(alpha, beta)`` (SND Sec. 4.7).
    """
    nu = check_level("nu", nu)
    if not isinstance(clip, (bool, np.bool_)):
        raise ValueError(f"input_noise clip must be a bool, got {clip!r}")
    clip = bool(clip)
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


FEATURE_STD = "feature_std"
"""The entry of ``params`` that holds per-feature stds for ``feature_noise(..., scale="std")``."""


def with_feature_std(params, stats) -> dict:
    """``params`` with per-feature stds ``{mark: f32[*feature shape]}`` (e.g. :func:`rnd_jax.train.feature_std`)
    under :data:`FEATURE_STD`, where ``feature_noise(..., scale="std")`` finds them: leaves of the scorer, so a
    compiled program takes them as arguments. The model ignores the extra entry."""
    return {**params, FEATURE_STD: {k: jnp.asarray(v, jnp.float32) for k, v in stats.items()}}


def feature_noise(model, params, nu, input_shape, layers=None, scale=None) -> Scorer:
    """Randomized feature defense (Algorithm 1): ``h_l(x) + nu_l * delta`` at marked layers.

    ``nu`` is one std for every layer in ``layers`` (default: the penultimate marked layer, i.e.
    the last mark before the logits), or a dict ``{layer: std}``. ``input_shape`` is the
    per-image ``(H, W, C)``, used to find the marked layers and their shapes. This is a base
    scorer (it replaces :func:`model_scorer`); other defenses compose on top of it.

    ``scale``: ``None`` (noise of std ``nu``), or per-feature stds as the authors' code uses them: the noise is
    ``nu * s * delta`` with ``s`` the per-element std of the layer's features over training data, so ``nu`` is
    relative to each feature's spread. ``"std"`` takes ``s`` from ``params[FEATURE_STD]`` (attached with
    :func:`with_feature_std`; :func:`rnd_jax.train.feature_std` computes and caches them), or give a dict
    ``{layer: f32[*feature shape]}``. The stds are leaves of the scorer (program arguments, never constants).
    """
    from rnd_jax.models import feature_shapes

    shapes = feature_shapes(model, tuple(input_shape))
    names = list(shapes)
    if not names:
        raise ValueError("this model marks no hidden layer with perturb(); feature noise needs one")
    if isinstance(nu, dict):
        levels = dict(nu)
    else:
        if not (layers is None or isinstance(layers, str)
                or (isinstance(layers, (list, tuple)) and all(isinstance(n, str) for n in layers))):
            raise ValueError(f"feature_noise layers must be a layer name or a list of names, got {layers!r}")
        chosen = [names[-1]] if layers is None else ([layers] if isinstance(layers, str) else list(layers))
        levels = {name: nu for name in chosen}
    unknown = [n for n in levels if n not in shapes]
    if unknown or not levels:
        raise ValueError(f"unknown or missing feature layer(s) {unknown}; this model marks {names}")
    levels = {n: check_level(f"nu[{n}]", v) for n, v in levels.items()}
    active = [n for n in names if n in levels and not _is_zero(levels[n])]
    scales = _feature_scales(scale, params, active, shapes)
    clean = model_scorer(model, params)
    if not active:
        return clean
    return Partial(_feature_noise, model, params, tuple(names), tuple(active), {n: levels[n] for n in active},
                   {n: tuple(shapes[n]) for n in names}, scales)


def _feature_scales(scale, params, active, shapes):
    """The per-feature stds of the active layers (``None`` without ``scale``), validated."""
    if scale is None:
        return None
    if isinstance(scale, str):
        if scale != "std":
            raise ValueError(f"feature_noise scale must be None, 'std' or a dict of per-feature stds, got {scale!r}")
        if params is None:  # shapes-only validation (a sweep's plan): the stds come with the trained params
            return None
        if not isinstance(params, dict) or FEATURE_STD not in params:
            raise ValueError("feature_noise scale='std' needs params[FEATURE_STD]: attach the training stds with "
                             "with_feature_std(params, rnd_jax.train.feature_std(...))")
        scale = params[FEATURE_STD]
    if not isinstance(scale, dict):
        raise ValueError(f"feature_noise scale must be None, 'std' or a dict of per-feature stds, got {scale!r}")
    missing = [n for n in active if n not in scale]
    if missing:
        raise ValueError(f"feature_noise scale has no stds for layer(s) {missing}")
    out = {}
    for n in active:
        s = scale[n]
        if _traced(s):
            out[n] = s
            continue
        a = np.asarray(s)
        if a.shape != tuple(shapes[n]) or not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"feature_noise scale[{n!r}] must be floats of the feature shape {tuple(shapes[n])}, got "
                             f"{a.dtype} {a.shape}")
        if not np.all(np.isfinite(a)) or np.any(a < 0):
            raise ValueError(f"feature_noise scale[{n!r}] must be finite and >= 0")
        out[n] = s if isinstance(s, jax.Array) else jnp.asarray(a, jnp.float32)
    return out


def _feature_noise(model, params, names, active, levels, shapes, scales, x, keys):
    from rnd_jax.models import PERTURBATIONS

    mine, _ = _split_keys(keys)
    pert = {}
    for i, n in enumerate(names):
        if n in active:
            k = jax.vmap(lambda kk: jax.random.fold_in(kk, i))(mine)
            noise = _normal(k, shapes[n], x.dtype)
            if scales is not None:
                noise = noise * scales[n].astype(x.dtype)
            pert[n] = levels[n] * noise
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
    """Random shrink-and-pad at the model's input size, after Xie et al. 2018, per query.

    An ``H x W`` image is resized (bilinear, ``jax.image.resize``) to ``(H + r) x (W + r)`` with
    ``r`` uniform in ``0..max_extra``, zero-padded at a random offset to
    ``(H + max_extra) x (W + max_extra)``, and always resized back to ``H x W`` before the model sees
    it: the model sees the image content shrunk by ``(H + r) / (H + max_extra) <= 1`` inside a zero
    border, at its own input size. Xie et al.'s defense as they define it (``r`` in ``[H, H_max)``,
    the *enlarged* padded image fed to the network) is :func:`random_resize_pad`.
    ``max_extra = 0`` is the identity.
    """
    max_extra = _check_int("resize_pad max_extra (pixels)", max_extra, 0, MAX_EXTRA)
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


MAX_EXTRA = 4096  # pixels a resize-and-pad defense may add: beyond any image this codebase reads


def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo or (hi is not None
                                                                                              and value > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ValueError(f"{name} must be an int {rng}, got {value!r}")
    return int(value)


def _check_positive(name: str, value) -> float:
    v = check_level(name, value)
    if not _traced(v) and float(v) <= 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return v


def random_resize_pad(scorer: Scorer, max_extra, resize_back: bool = False, method: str = "nearest") -> Scorer:
    """Random resizing and padding as Xie et al. define it (ICLR 2018, "Mitigating adversarial effects
    through randomization", Sec. 3), per query.

    An ``H x W`` query is *enlarged* to ``(H + e) x (W + e)`` with ``e`` uniform in ``0..max_extra - 1``
    (their ``rnd`` uniform in ``[299, 331)`` for 299 x 299 inputs: ``max_extra = 32``), then placed at a
    uniform offset ``(a, b)``, ``a, b`` in ``0..max_extra - e`` (their ``(331 - rnd + 1)^2`` padding
    patterns), in a zero image of ``(H + max_extra) x (W + max_extra)`` pixels, and that larger image is
    the model's input. ``method``: ``"nearest"`` (the authors' code; output pixel ``i`` takes source pixel
    ``floor((i + 1/2) H / r)``) or ``"bilinear"`` (half-pixel centres, edge clamped; equal to
    ``jax.image.resize(..., "linear")`` when enlarging).

    ``resize_back=True`` resizes the padded image back to ``H x W`` (bilinear) before the wrapped
    scorer sees it, for models that take only their training input size. Through :func:`build_defense`
    the choice is made from the model's shapes: the larger input is fed to the globally pooled networks
    (``cifar10_cnn``, ``resnet20``, ``wrn28_10``, ``resnet50``) and resized back for the others
    (``digits_cnn``, ``mnist_cnn`` and ``vgg16`` flatten a fixed-size map into their classifier,
    ``vit_b16`` has position embeddings of its training size); option ``resize_back`` overrides it.
    A non-square image grows by the same ``e`` pixels in both directions. :func:`resize_pad` is a
    different defense: it shrinks the content and always resizes back. ``max_extra = 0`` is the
    identity (the clean scorer itself).
    """
    max_extra = _check_int("random_resize_pad max_extra (pixels)", max_extra, 0, MAX_EXTRA)
    if not isinstance(resize_back, bool):
        raise ValueError(f"random_resize_pad resize_back must be a bool, got {resize_back!r}")
    if method not in RESIZE_METHODS:
        raise ValueError(f"unknown random_resize_pad method {method!r}; choose one of {RESIZE_METHODS}")
    if max_extra == 0:
        return scorer
    return Partial(_random_resize_pad, scorer, max_extra, resize_back, method)


RESIZE_METHODS = ("nearest", "bilinear")


def _resize_axis(n: int, r, out: int, offset, method: str):
    """Source indices and weights that enlarge an axis of ``n`` pixels to ``r`` (traced) and place it at
    ``offset`` in ``out`` pixels: (i0, i1, w1, inside), each ``[out]``; pixel = (1 - w1) x[i0] + w1 x[i1]."""
    i = jnp.arange(out) - offset
    inside = (i >= 0) & (i < r)
    centre = (i.astype(jnp.float32) + 0.5) * n / r.astype(jnp.float32)
    if method == "nearest":
        i0 = jnp.clip(jnp.floor(centre).astype(jnp.int32), 0, n - 1)
        return i0, i0, jnp.zeros(out, jnp.float32), inside
    s = centre - 0.5
    f = jnp.floor(s)
    i0 = jnp.clip(f.astype(jnp.int32), 0, n - 1)
    i1 = jnp.clip(f.astype(jnp.int32) + 1, 0, n - 1)
    return i0, i1, s - f, inside


def _random_resize_pad(scorer, max_extra, resize_back, method, x, keys):
    _, h, w, c = x.shape
    big_h, big_w = h + max_extra, w + max_extra

    def one(img, key):
        u = jax.random.uniform(key, (3,))
        e = jnp.minimum(jnp.floor(u[0] * max_extra).astype(jnp.int32), max_extra - 1)
        room = max_extra - e + 1
        oi, oj = (jnp.minimum(jnp.floor(v * room.astype(jnp.float32)).astype(jnp.int32), room - 1) for v in u[1:])
        r0, r1, rw, rin = _resize_axis(h, h + e, big_h, oi, method)
        c0, c1, cw, cin = _resize_axis(w, w + e, big_w, oj, method)
        rows = img[r0] * (1 - rw)[:, None, None] + img[r1] * rw[:, None, None]
        out = rows[:, c0] * (1 - cw)[None, :, None] + rows[:, c1] * cw[None, :, None]
        return jnp.where((rin[:, None] & cin[None, :])[..., None], out, jnp.zeros((), img.dtype)).astype(img.dtype)

    mine, inner = _split_keys(keys)
    big = jax.vmap(one)(x, mine)
    if resize_back:
        big = jax.image.resize(big, x.shape, "linear")
    return scorer(big, inner)


def _takes_larger_inputs(model, params, input_shape, shape) -> bool:
    """Whether ``model`` (with params for ``input_shape`` inputs) is size-agnostic enough to be fed ``shape``.

    Shapes only (``jax.eval_shape``). The model must map both ``shape`` and twice its height and width to
    logits: a globally pooled network does; a network that flattens into a dense layer refuses one of them
    (``digits_cnn`` accepts 10 x 10 as well as 8 x 8 because its pools floor both to 2 x 2, but not 20 x 20),
    and so does a ViT with position embeddings of its training size.
    """
    spec = lambda s: jax.ShapeDtypeStruct((1,) + tuple(s), jnp.float32)  # noqa: E731
    if params is None:
        params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), spec(input_shape))["params"]
    params = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), params)
    h, w, c = shape
    for probe in ((h, w, c), (2 * h, 2 * w, c)):
        try:
            out = jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, spec(probe))
        except Exception:  # a dense layer or a position embedding of the training size refuses other shapes
            return False
        if len(out.shape) != 2:
            return False
    return True


def _build_random_resize_pad(model, params, level, input_shape, resize_back=None, method="nearest"):
    max_extra = _check_int("random_resize_pad max_extra (pixels)", level, 0, MAX_EXTRA)
    if resize_back is None:
        if len(input_shape) != 3:
            raise ValueError(f"random_resize_pad needs input_shape (H, W, C), got {input_shape!r}")
        h, w, c = input_shape
        resize_back = max_extra > 0 and not _takes_larger_inputs(model, params, input_shape,
                                                           (h + max_extra, w + max_extra, c))
    return random_resize_pad(model_scorer(model, params), max_extra, resize_back, method)


def jpeg(scorer: Scorer, quality, subsample: bool = True, input_shape=None) -> Scorer:
    """JPEG compression of every query (Guo et al. 2018; Aithal & Li 2022, Tables 4 and 11).

    The wrapped scorer sees :func:`rnd_jax.jpeg.compress` of the query: 8-bit samples, YCbCr (grayscale
    for one channel), 8x8 DCT, quantisation with the standard IJG tables at ``quality`` (1..100, the IJG
    and Pillow quality scale; Guo et al. use 75), inverse DCT, RGB, ``/ 255`` in [0, 1].
    ``subsample=True`` (the default) halves the chroma resolution (4:2:0), as libjpeg, Pillow and so the
    papers' JPEG defense (PIL ``save(quality=q)``) do; ``False`` keeps 4:4:4. Deterministic: the keys
    pass through to the wrapped scorer. ``input_shape`` ``(H, W, C)``, when given, is checked now
    (C must be 1 or 3). No level turns JPEG off: quality 100 still rounds to 8 bits and quantises.
    The quantisation tables travel as arrays (leaves of the scorer), so one compiled program serves
    every quality.
    """
    from rnd_jax import jpeg as jpeg_codec

    quality = jpeg_codec.check_quality(quality)
    if not isinstance(subsample, bool):
        raise ValueError(f"jpeg subsample must be a bool, got {subsample!r}")
    if input_shape is not None and (len(input_shape) != 3 or input_shape[-1] not in (1, 3)):
        raise ValueError(f"jpeg needs images of shape (H, W, C) with C = 1 or 3, got input_shape {input_shape!r}")
    luma, chroma = (t.astype(np.float32) for t in jpeg_codec.quant_tables(quality))
    return Partial(_jpeg, scorer, luma, chroma, subsample, jpeg_codec.dct_matrix())


def _jpeg(scorer, luma, chroma, subsample, dct, x, keys):
    from rnd_jax import jpeg as jpeg_codec

    return scorer(jpeg_codec.compress_with_tables(x, luma, chroma, subsample, dct), keys)


def output_noise_park(scorer: Scorer, variance, mean=0.0) -> Scorer:
    """Park et al.'s test-time output randomization, as printed: ``d(p) = p + eps``.

    ``eps ~ N(mean, variance * I_C)`` is added to the probability vector ``p`` with **no**
    post-processing: no clipping, no renormalisation, so answers may be negative or above one and
    need not sum to one ("Note that d(p) does not necessarily represent a probability mass function",
    Park et al., "Adversarial Examples and Output Randomization", Sec. 5.1). ``variance`` is
    the paper's ``sigma^2`` (a **variance**, in probability units squared: their Table 1 uses 1e-4,
    1e-2 and 5.76e-2); ``mean`` is their ``mu`` (probability units), 0 in all their experiments (Sec. 7.1).
    Compare :func:`output_noise`, whose ``sigma`` is a standard deviation and whose answers are
    post-processed as Aithal & Li do. The attack losses of :mod:`rnd_jax.losses` floor answers
    ``<= 0`` before their logarithm, so they stay finite on these answers. Variance 0 and mean 0 give
    the clean scorer itself.
    """
    variance = check_level("variance", variance)
    mean = check_real("mean", mean)
    if _is_zero(variance) and _is_zero(mean):
        return scorer
    return Partial(_output_noise_park, scorer, variance, mean)


def _output_noise_park(scorer, variance, mean, x, keys):
    mine, inner = _split_keys(keys)
    p = scorer(x, inner)
    v = _normal(mine, p.shape[1:], p.dtype)
    return p + mean + jnp.sqrt(jnp.asarray(variance, p.dtype)) * v


AAA_KINDS = ("linear", "sine")


def aaa(scorer: Scorer, attractor_interval, reverse_step=1.0, kind: str = "linear", temperature=1.0,
        calibration_weight=5.0, num_iter: int = 100, lr=0.1, min_margin=1e-3) -> Scorer:
    """Adversarial Attack on Attackers (AAA; Chen et al., NeurIPS 2022, "Adversarial Attack on Attackers:
    Post-Process to Mitigate Black-Box Score-Based Query Attacks"), a deterministic post-processing of
    the logits that keeps every top-1 label.

    With ``z`` the clean logits (here ``log F(x)``, equal up to a per-row constant), ``y = argmax z`` and
    ``m = z_y - max_{j != y} z_j >= 0`` the logit margin (the attacker's margin loss on a correctly
    classified point), the defense picks an *attractor* ``a = (floor(m / tau) + 1/2) tau`` (the centre of
    ``m``'s interval of width ``tau = attractor_interval``, in logit units) and a *target margin*

    - ``kind="linear"`` (AAA-linear): ``t = a - beta (m - a)``, ``beta = reverse_step``: within each
      interval the margin seen by the attacker moves *against* the true one (``beta = 1`` reflects it);
    - ``kind="sine"`` (AAA-sine): ``t = m - 0.7 beta tau sin(pi (1 - 2 (m - a) / tau))``, a periodic
      curve (the authors' code uses amplitude ``0.7 tau``, i.e. ``beta = 1``).

    Then the answer is ``softmax(u)`` for logits ``u`` found as the original does: ``num_iter`` Adam steps
    (learning rate ``lr``, betas 0.9 / 0.999, eps 1e-8) from ``u = z`` on
    ``|margin(u) - t| + calibration_weight * |softmax(u)_y - max softmax(z / temperature)|``, where
    ``margin(u)`` is the top-1 minus top-2 logit of ``u``: the calibration term keeps the confidence of the
    answer at that of the temperature-scaled clean model. Where no logits have both (a margin ``t`` allows
    top-1 probabilities from ``1 / (1 + (K - 1) e^-t)`` to ``1 / (1 + e^-t)`` only: near the decision
    boundary, where the clean confidence is low), the steps settle on a compromise between the two terms,
    and the margin seen there need not move against the true one. Cost: ``num_iter`` gradient steps on
    ``K`` logits per query. The authors' defaults (their ``AAALinear``):
    ``tau = 4``, ``beta = 1``, 100 iterations, weight 5, lr 0.1, and the temperature fitted per model
    to minimise the expected calibration error on validation data (1 when not fitted).

    What differs from the original: it optimises the *mean* loss over the batch of queries with one
    Adam state; here each point runs its own Adam on its own loss (the batch loss separates over
    points, and Adam's per-coordinate normalisation removes the 1/B scale up to its eps), so a point's
    answer never depends on the batch it travels in. The temperature is a given option, not fitted
    here. The original does not guarantee the top-1 label; here, after the steps, the original top-1
    logit is raised to at least ``min_margin`` above the others when needed (rarely: only when the
    target margin is below ``min_margin`` or Adam overshoots), so the hard label is always that of the
    clean model. The original also rounds queries to 8 bits before the model; that is not part of AAA
    and is not done here.

    ``attractor_interval = 0`` is the identity (the clean scorer: every margin is its own attractor).
    Deterministic; the keys pass through to the wrapped scorer.
    """
    tau = check_level("attractor_interval", attractor_interval)
    beta = check_level("reverse_step", reverse_step)
    if kind not in AAA_KINDS:
        raise ValueError(f"unknown AAA kind {kind!r}; choose one of {AAA_KINDS}")
    temperature = _check_positive("temperature", temperature)
    weight = check_level("calibration_weight", calibration_weight)
    num_iter = _check_int("num_iter", num_iter, 0)
    lr = _check_positive("lr", lr)
    min_margin = _check_positive("min_margin", min_margin)
    if _is_zero(tau):
        return scorer
    return Partial(_aaa, scorer, tau, beta, kind, temperature, weight, num_iter, lr, min_margin)


def _top2(u):
    """(index of the largest entry, index of the second largest, their difference)."""
    first = jnp.argmax(u)
    rest = jnp.where(jnp.arange(u.shape[0]) == first, -jnp.inf, u)
    second = jnp.argmax(rest)
    return first, second, u[first] - u[second]


def aaa_target(margin, attractor_interval, reverse_step=1.0, kind: str = "linear"):
    """The target margin ``t(m)`` of AAA (see :func:`aaa`) for true margins ``margin >= 0``."""
    tau = attractor_interval
    a = (jnp.floor(margin / tau) + 0.5) * tau
    if kind == "linear":
        return a - reverse_step * (margin - a)
    return margin - 0.7 * reverse_step * tau * jnp.sin(jnp.pi * (1 - 2 * (margin - a) / tau))


def _aaa_point(z, tau, beta, kind, temperature, weight, num_iter, lr, min_margin):
    y, _, margin = _top2(z)
    target = aaa_target(margin, tau, beta, kind)
    p_target = jax.nn.softmax(z / temperature)[y]
    onehot = lambda i: jax.nn.one_hot(i, z.shape[0], dtype=z.dtype)  # noqa: E731

    def grad(u):
        # d/du of |margin(u) - target| + weight |softmax(u)_y - p_target| (sign(0) = 0, as autograd's abs)
        first, second, m = _top2(u)
        p = jax.nn.softmax(u)
        return (jnp.sign(m - target) * (onehot(first) - onehot(second))
                + weight * jnp.sign(p[y] - p_target) * p[y] * (onehot(y) - p))

    def step(i, carry):
        u, m, v = carry
        g = grad(u)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        t = (i + 1).astype(z.dtype)
        mhat, vhat = m / (1 - 0.9 ** t), v / (1 - 0.999 ** t)
        return u - lr * mhat / (jnp.sqrt(vhat) + 1e-8), m, v

    zeros = jnp.zeros_like(z)
    u = jax.lax.fori_loop(0, num_iter, step, (z, zeros, zeros))[0]
    others = jnp.max(jnp.where(jnp.arange(z.shape[0]) == y, -jnp.inf, u))
    return u.at[y].set(jnp.maximum(u[y], others + min_margin))


def _aaa(scorer, tau, beta, kind, temperature, weight, num_iter, lr, min_margin, x, keys):
    p = scorer(x, keys)
    z = jnp.log(jnp.maximum(p, jnp.finfo(p.dtype).tiny))
    u = jax.vmap(lambda zz: _aaa_point(zz, tau, beta, kind, temperature, weight, num_iter, lr, min_margin))(z)
    return jax.nn.softmax(u, axis=-1)


MAX_ENSEMBLE = 4096  # noisy passes one query may cost


def rse(model, params, ensemble=10) -> Scorer:
    """Random Self-Ensemble at inference (Liu et al., ECCV 2018): the mean of the probabilities of ``ensemble``
    forward passes of a model trained with RSE noise layers (:func:`rnd_jax.noisy.noisy_model`;
    ``TrainConfig(rse_init=..., rse_inner=...)``), each with its own noise. Query point ``q``'s pass ``m`` draws
    its noise from ``fold_in(key_q, m)`` (``key_q`` this defense's share of the point's key), so a point's answer
    never depends on its batch. ``ensemble`` (int >= 1; the paper averages 10 passes) multiplies the model
    time of every query. ``ValueError`` for a model without RSE noise."""
    return _trained_noise(model, params, ensemble, "rse")


def pni(model, params, ensemble=1) -> Scorer:
    """Parametric Noise Injection at inference (He, Rakin & Fan, CVPR 2019): a model trained with PNI noise
    (``TrainConfig(pni=..., adv_eps=...)``) answers with its noise on, one noisy pass per query (``ensemble`` > 1
    averages that many passes' probabilities, as :func:`rse` does). ``ValueError`` for a model without PNI."""
    return _trained_noise(model, params, ensemble, "pni")


def _trained_noise(model, params, ensemble, kind: str) -> Scorer:
    from rnd_jax.noisy import noise_config

    n = _check_int(f"{kind} ensemble (noisy passes per query)", ensemble, 1, MAX_ENSEMBLE)
    c = noise_config(model)
    has = (c["rse_init"] > 0 or c["rse_inner"] > 0) if kind == "rse" else bool(c["pni_weights"] or c["pni_acts"])
    if not has:
        fields = "rse_init / rse_inner" if kind == "rse" else "pni (with adv_eps)"
        raise ValueError(f"defense {kind!r} needs a model trained with {kind.upper()} noise layers "
                         f"(rnd_jax.train.TrainConfig {fields}); this model has none")
    return Partial(_trained_noise_scores, model, params, n)


def _trained_noise_scores(model, params, n, x, keys):
    from rnd_jax.noisy import NOISE_RNG

    mine, _ = _split_keys(keys)

    def one(xi, k):
        def member(m):
            logits = model.apply({"params": params}, xi[None], rngs={NOISE_RNG: jax.random.fold_in(k, m)})
            return jax.nn.softmax(logits[0], axis=-1)

        return jnp.mean(jax.vmap(member)(jnp.arange(n)), axis=0)

    return jax.vmap(one)(x, mine)


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
                lambda model, params, level, input_shape, layers=None, scale=None: feature_noise(
                    model, params, level, input_shape, layers, scale), True, ("layers", "scale")),
    DefenseSpec("quantize", "bits", _on_clean(quantize), False),
    DefenseSpec("correlated_noise", "alpha", _on_clean(correlated_noise), False, ("sigma",)),
    DefenseSpec("resize_pad", "max_extra", _on_clean(resize_pad), False),
    DefenseSpec("random_resize_pad", "max_extra", _build_random_resize_pad, False, ("resize_back", "method")),
    DefenseSpec("jpeg", "quality",
                lambda model, params, level, input_shape, subsample=True: jpeg(model_scorer(model, params), level,
                                                                             subsample, input_shape), False,
                ("subsample",)),
    DefenseSpec("output_noise_park", "variance", _on_clean(output_noise_park), True, ("mean",)),
    DefenseSpec("aaa", "attractor_interval", _on_clean(aaa), False,
                ("reverse_step", "kind", "temperature", "calibration_weight", "num_iter", "lr", "min_margin")),
    DefenseSpec("rse", "ensemble", lambda model, params, level, input_shape: rse(model, params, level), False),
    DefenseSpec("pni", "ensemble", lambda model, params, level, input_shape: pni(model, params, level), False),
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
        if level is not None and (isinstance(level, (bool, str)) or _traced(level) or check_level("level", level) != 0):
            raise ValueError(f"the undefended model ('none') takes no level (None or 0), got {level!r}")
        return spec.build(model, params, level, input_shape)
    return spec.build(model, params, level, tuple(input_shape), **options)
