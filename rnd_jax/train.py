"""Training, evaluation and an on-disk checkpoint cache for the classifiers in :mod:`rnd_jax.models`.

::

    model, params = load_or_train("digits_cnn", "digits")   # trains once, then loads
    acc = accuracy(model, params, *rnd_jax.data.load("digits", "test"))

Randomness
----------
All randomness derives from ``jax.random.key(cfg.seed)`` (no NumPy or global RNG):
``init_key, data_key = split(key)``; epoch ``e`` uses ``fold_in(data_key, e)``, split into
the shuffle key (``jax.random.permutation``) and one key per step, which is split again
into the input-noise, dropout and logit-noise keys.  On a fixed backend and device the
same config gives bit-identical parameters (checked on CPU).

Optimisation
------------
AdamW (``optax.adamw``) with a cosine decay of the learning rate from
``cfg.learning_rate`` to 0 over all steps, softmax cross-entropy on integer labels.
Each epoch is one jitted ``lax.scan`` over ``N // batch_size`` minibatches of a fresh
permutation; the last ``N mod batch_size`` examples of each permutation are skipped
(a different subset every epoch), so every step has the same shape and nothing
recompiles. The epoch compiles at XLA's full backend optimisation
(:data:`EPOCH_COMPILER_OPTIONS`) whatever ``XLA_FLAGS`` says: an epoch runs hundreds of steps, so a
process that lowers XLA's level for its many short programs (the test suite does) still trains at full
speed, and a checkpoint does not depend on the level of the process that trained it.

Training-time defenses
----------------------
Options of :class:`TrainConfig` (every one off by default, so the configs of clean models and their cache keys
are those they always were):

* ``augment_noise``: plain Gaussian data augmentation, ``x + N(0, s^2)`` (clipped to [0, 1] by default).
* ``adv_eps`` > 0: PGD adversarial training (Madry et al., "Towards Deep Learning Models Resistant to
  Adversarial Attacks", ICLR 2018): each minibatch is replaced by ``adv_steps`` steps of l_inf PGD on the
  training loss (:func:`pgd_attack`: uniform random start in the eps-ball, signed-gradient ascent of size
  ``adv_step_size``, projection onto the ball and onto [0, 1]), inside the jitted epoch; the loss is
  ``(1 - adv_weight) CE(x) + adv_weight CE(x_adv)`` (Madry: ``adv_weight = 1``; PNI: 0.5). With input noise
  at inference this is RND-AT (Qin et al., "Random Noise Defense Against Query-Based Black-Box Attacks",
  NeurIPS 2021).
* ``gf_noise`` > 0: RND-GF, Gaussian augmentation fine-tuning as RND defines it: the loss is
  ``-log E_delta[F(x + delta)]_y``, ``delta ~ N(0, gf_noise^2 I)`` the test-time noise (not clipped), the
  expectation a Monte-Carlo mean of the *probabilities* over ``gf_samples`` draws inside the log
  (:func:`gf_loss`, computed as a log-mean-exp of log-probabilities, so it is finite wherever the log-softmax
  is). With ``finetune`` it starts from the clean checkpoint (see below), as RND's GF does.
* ``rse_init`` / ``rse_inner``: Random Self-Ensemble noise layers (:mod:`rnd_jax.noisy`), trained with them.
* ``pni``: Parametric Noise Injection on weights and/or activations (:mod:`rnd_jax.noisy`), to train with
  ``adv_eps`` > 0 as the paper does.
* ``finetune``: start from the clean model of the same name, dataset and seed (``TrainConfig(seed=seed)``,
  trained and cached first when missing) instead of a fresh initialisation; ``epochs`` and
  ``learning_rate`` are then the fine-tuning schedule. New noise scales (PNI) start at their initial value.

PNI's noise scales are excluded from AdamW's weight decay (a choice made here: decay would only pull them to 0).

The noise layers of RSE and PNI draw from the ``"noise"`` rng of each step; the model with noise layers is
:func:`build_model`'s, rebuilt from the config stored in the cache entry when it is loaded.

Cache
-----
:func:`load_or_train` stores a trained model under ``<cache_dir>/<model>-<dataset>-<key16>``,
``key`` = sha256 of the canonical JSON of ``(CACHE_VERSION, model name, dataset,
dataclasses.asdict(cfg))`` without the training-time-defense fields that are at their defaults (so adding such
a field changes no existing key).  The directory holds ``params/`` (an Orbax
``StandardCheckpointer`` checkpoint, written synchronously) and ``meta.json`` (config,
shapes, accuracies, timings, library versions).  It is assembled in a temporary sibling
directory and moved into place with one ``os.rename``, so an interrupted run leaves at
most a ``.tmp-*`` directory that is never read.  Bump :data:`CACHE_VERSION` whenever a
change to the models or to this training code changes what a config trains.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rnd_jax import data
from rnd_jax.defenses import F32_LEVEL_MAX
from rnd_jax.models import INPUT_SHAPES, check_fits, get_model
from rnd_jax.noisy import NOISE_RNG, PNI_KINDS, noisy_model

__all__ = [
    "CACHE_VERSION",
    "TrainConfig",
    "accuracy",
    "build_model",
    "cache_key",
    "cache_path",
    "default_cache_dir",
    "feature_std",
    "gf_loss",
    "load_or_train",
    "pgd_attack",
    "train",
]

CACHE_VERSION = 1
"""Part of every cache key; bump when models or training semantics change."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (frozen, hashable, validated).

    Attributes:
        epochs: passes over the training set (int >= 1).
        batch_size: examples per step (int >= 1, at most the training-set size).
        learning_rate: peak AdamW step size, cosine-decayed to 0 (finite, > 0).
        weight_decay: AdamW decoupled weight decay (finite, >= 0).
        seed: root of all randomness, ``jax.random.key(seed)`` (int >= 0).
        augment_noise: std of Gaussian noise added to training inputs (finite, >= 0;
            0 disables it).  A training-time companion to input-noise defenses.
        augment_clip: clip noisy training inputs back to ``[0, 1]``.
        logit_noise: std of Gaussian noise added to the logits inside the training loss
            (finite, >= 0; 0 disables it).
        adv_eps: l_inf radius of PGD adversarial training on [0, 1] pixels (finite, >= 0; 0 disables it;
            Madry et al. use 0.3 on MNIST and 8/255 on CIFAR-10: the radius is per pixel, so it does not scale
            with the input size).
        adv_steps: PGD steps per minibatch (int >= 1; Madry et al.: 40 on MNIST, 7 on CIFAR-10).
        adv_step_size: PGD step size (finite, >= 0; 0 means ``2.5 * adv_eps / adv_steps``, Madry et al.'s rule).
        adv_norm: the PGD threat model; only ``"linf"``.
        adv_random_start: start PGD at a uniform point of the eps-ball (Madry et al.) instead of at ``x``.
        adv_weight: weight of the adversarial loss, the clean loss getting ``1 - adv_weight`` (in [0, 1];
            Madry et al.: 1, PNI: 0.5).
        gf_noise: RND-GF: std of the test-time noise inside ``-log E[F(x + delta)]`` (finite, >= 0; 0 disables
            it; RND uses its inference noise, e.g. 0.02 on CIFAR-10).
        gf_samples: RND-GF: Monte-Carlo draws of ``delta`` per example (int >= 1).
        rse_init: RSE: std of the noise on the input, before the first convolution (finite, >= 0; the paper's
            CIFAR-10 setting: 0.2).
        rse_inner: RSE: std of the noise before the other convolutions (finite, >= 0; paper: 0.1).
        rse_layers: RSE: the marks that get ``rse_inner`` (a tuple of names; ``None``: the marks that feed a
            convolution, :data:`rnd_jax.noisy.RSE_LAYERS`).
        pni: PNI variant, one of ``""`` (off), ``"weight"`` (PNI-W), ``"activation"`` (PNI-A), ``"both"``.
        pni_init: initial PNI noise scale alpha (finite, >= 0; the authors' 0.25).
        pni_channelwise: one PNI weight scale per output channel instead of one per layer.
        finetune: start from the clean model ``TrainConfig(seed=seed)`` of the same model and dataset (RND-GF
            fine-tunes a trained model); ``epochs`` and ``learning_rate`` are the fine-tuning schedule.

    The defaults train ``digits_cnn`` on ``digits`` (22 steps/epoch) to 97.8-98.3% test
    accuracy over seeds 0-3 (98.06% for seed 0) in ~5-10 s on 2 CPU cores, ~1 s of it
    compilation.  Float fields are stored as ``float`` so that equal configs
    have equal cache keys (``1`` and ``1.0`` give the same key).  Invalid values raise
    ``ValueError``.
    """

    epochs: int = 40
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    augment_noise: float = 0.0
    augment_clip: bool = True
    logit_noise: float = 0.0
    adv_eps: float = 0.0
    adv_steps: int = 7
    adv_step_size: float = 0.0
    adv_norm: str = "linf"
    adv_random_start: bool = True
    adv_weight: float = 1.0
    gf_noise: float = 0.0
    gf_samples: int = 4
    rse_init: float = 0.0
    rse_inner: float = 0.0
    rse_layers: tuple[str, ...] | None = None
    pni: str = ""
    pni_init: float = 0.25
    pni_channelwise: bool = False
    finetune: bool = False

    def __post_init__(self):
        def integer(name, minimum):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an int, got {value!r}")
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")
            object.__setattr__(self, name, int(value))

        def real(name, positive):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ValueError(f"{name} must be a real number, got {value!r}")
            value = float(value)
            if not math.isfinite(value) or value < 0 or (positive and value == 0):
                bound = "> 0" if positive else ">= 0"
                raise ValueError(f"{name} must be finite and {bound}, got {value}")
            object.__setattr__(self, name, value)

        integer("epochs", 1)
        integer("batch_size", 1)
        integer("seed", 0)
        real("learning_rate", positive=True)
        real("weight_decay", positive=False)
        real("augment_noise", positive=False)
        real("logit_noise", positive=False)
        def boolean(name):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{name} must be a bool, got {value!r}")
            object.__setattr__(self, name, bool(value))

        boolean("augment_clip")
        for name in ("adv_eps", "adv_step_size", "gf_noise", "rse_init", "rse_inner", "pni_init"):
            real(name, positive=False)
        real("adv_weight", positive=False)
        if self.adv_weight > 1:
            raise ValueError(f"adv_weight must be in [0, 1], got {self.adv_weight}")
        integer("adv_steps", 1)
        integer("gf_samples", 1)
        for name in ("adv_random_start", "pni_channelwise", "finetune"):
            boolean(name)
        if self.adv_norm != "linf":
            raise ValueError(f"adv_norm must be 'linf' (the only PGD threat model here), got {self.adv_norm!r}")
        if not isinstance(self.pni, str) or self.pni not in PNI_KINDS:
            raise ValueError(f"pni must be one of {PNI_KINDS}, got {self.pni!r}")
        if self.rse_layers is not None:
            layers = self.rse_layers
            if isinstance(layers, str) or not isinstance(layers, (list, tuple)) or not all(
                    isinstance(n, str) and n for n in layers):
                raise ValueError(f"rse_layers must be None or a list of mark names, got {layers!r}")
            object.__setattr__(self, "rse_layers", tuple(layers))
        if self.gf_noise > 0 and self.logit_noise > 0:
            raise ValueError("gf_noise (RND-GF's loss) and logit_noise (noisy logits in the cross-entropy) are two "
                             "different training losses; set one of them")
        for name in ("adv_eps", "adv_step_size", "gf_noise", "rse_init", "rse_inner"):
            if getattr(self, name) > F32_LEVEL_MAX:
                raise ValueError(f"{name} = {getattr(self, name)} overflows float32 (at most {F32_LEVEL_MAX:.4g})")

    @property
    def defended(self) -> bool:
        """Whether any training-time-defense field differs from its default."""
        return any(getattr(self, f) != d for f, d in _DEFENSE_DEFAULTS.items())

    def clean(self) -> "TrainConfig":
        """The clean model a ``finetune`` config starts from: the default config with this seed."""
        return TrainConfig(seed=self.seed)


_ORIGINAL_FIELDS = ("epochs", "batch_size", "learning_rate", "weight_decay", "seed", "augment_noise", "augment_clip",
                    "logit_noise")
_DEFENSE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name not in _ORIGINAL_FIELDS}


# ----------------------------------------------------------------------------- training


def _log(msg: str) -> None:
    print(f"[rnd_jax] {msg}", file=sys.stderr, flush=True)


def _check_fits(model_name: str, dataset: str) -> None:
    """``ValueError`` before any data is read when ``model_name`` is not built for ``dataset``'s images
    (:func:`rnd_jax.models.check_fits`; e.g. ``cifar10_cnn`` on 8x8 digits)."""
    spec = data.info(dataset)
    check_fits(model_name, spec.image_shape, spec.num_classes, dataset)


def _num_classes(labels: np.ndarray) -> int:
    # The training split of every supported dataset contains every class.
    return max(int(np.max(labels)) + 1, 2)


def build_model(model_name: str, num_classes: int, cfg: TrainConfig = TrainConfig(), input_shape=None) -> nn.Module:
    """The module ``cfg`` trains: ``get_model(model_name, num_classes)``, with RSE / PNI noise layers when
    ``cfg`` asks for them (:func:`rnd_jax.noisy.noisy_model`; ``ValueError`` for unknown layers). Shapes only."""
    model = get_model(model_name, num_classes=num_classes)
    if not (cfg.rse_init or cfg.rse_inner or cfg.pni):
        return model
    shape = tuple(input_shape) if input_shape is not None else INPUT_SHAPES[model_name]
    return noisy_model(model, shape, rse_init=cfg.rse_init, rse_inner=cfg.rse_inner, rse_layers=cfg.rse_layers,
                       pni=cfg.pni, pni_init=cfg.pni_init, pni_channelwise=cfg.pni_channelwise,
                       model_name=model_name)


def _ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def pgd_attack(logits_fn, x, y, key, eps, steps: int, step_size, random_start: bool = True):
    """l_inf PGD on the cross-entropy (Madry et al. 2018): ``steps`` signed-gradient ascent steps of size
    ``step_size`` from a uniform point of the eps-ball (or from ``x``), each projected onto the ball around ``x``
    and onto [0, 1]. ``logits_fn(x_adv, i) -> logits`` (``i`` the step, for a fresh noise draw per step in a
    randomized model). Returns ``x_adv`` without gradient. Used inside the jitted training epoch."""
    if random_start:
        x0 = jnp.clip(x + jax.random.uniform(key, x.shape, x.dtype, -eps, eps), 0.0, 1.0)
    else:
        x0 = x

    def step(i, xa):
        g = jax.grad(lambda z: _ce(logits_fn(z, i), y).sum())(xa)
        xa = xa + step_size * jnp.sign(g)
        return jnp.clip(jnp.clip(xa, x - eps, x + eps), 0.0, 1.0)

    return jax.lax.stop_gradient(jax.lax.fori_loop(0, steps, step, x0))


def gf_loss(logits_fn, x, y, key, noise, samples: int):
    """RND-GF's loss, ``mean_i -log((1/M) sum_m F(x_i + delta_m)_{y_i})``, ``delta_m ~ N(0, noise^2 I)`` (not
    clipped), M = ``samples``; draw ``m`` is ``noise * normal(fold_in(key, m), x.shape)``. Computed as
    ``log M - logsumexp_m log_softmax(...)_y``, finite wherever the logits are (no log of a probability that
    underflowed to 0). ``logits_fn(x, m) -> logits``."""
    def one(m):
        delta = noise * jax.random.normal(jax.random.fold_in(key, m), x.shape, x.dtype)
        logp = jax.nn.log_softmax(logits_fn(x + delta, m), axis=-1)
        return jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]

    logp_y = jax.vmap(one)(jnp.arange(samples))  # [M, B]
    return jnp.mean(jnp.log(jnp.asarray(samples, logp_y.dtype)) - jax.scipy.special.logsumexp(logp_y, axis=0))


def _training_loss(model: nn.Module, cfg: TrainConfig):
    """``loss(params, x, y, key)`` of one minibatch, with every training-time defense of ``cfg``."""
    step_size = cfg.adv_step_size or 2.5 * cfg.adv_eps / cfg.adv_steps

    def logits(params, x, k_drop, k_noise, train=True):
        return model.apply({"params": params}, x, train=train, rngs={"dropout": k_drop, NOISE_RNG: k_noise})

    def loss_fn(params, x, y, key):
        k_aug, k_drop, k_logit, k_noise, k_adv, k_gf = jax.random.split(key, 6)
        if cfg.augment_noise > 0:
            x = x + cfg.augment_noise * jax.random.normal(k_aug, x.shape, x.dtype)
            if cfg.augment_clip:
                x = jnp.clip(x, 0.0, 1.0)

        def ce(xx, k):
            if cfg.gf_noise > 0:
                return gf_loss(lambda z, m: logits(params, z, jax.random.fold_in(k_drop, m), jax.random.fold_in(k, m)),
                               xx, y, k_gf, cfg.gf_noise, cfg.gf_samples)
            out = logits(params, xx, k_drop, k)
            if cfg.logit_noise > 0:
                out = out + cfg.logit_noise * jax.random.normal(k_logit, out.shape, out.dtype)
            return _ce(out, y).mean()

        if cfg.adv_eps <= 0:
            return ce(x, k_noise)
        k_start, k_attack = jax.random.split(k_adv)
        x_adv = pgd_attack(lambda z, i: logits(jax.lax.stop_gradient(params), z, k_drop,
                                               jax.random.fold_in(k_attack, i), train=False),
                           x, y, k_start, cfg.adv_eps, cfg.adv_steps, step_size, cfg.adv_random_start)
        adv = ce(x_adv, jax.random.fold_in(k_noise, 1))
        if cfg.adv_weight == 1:
            return adv
        return (1 - cfg.adv_weight) * ce(x, k_noise) + cfg.adv_weight * adv

    return loss_fn


# XLA's default CPU backend level: training epochs are long-running programs (see the module docstring).
EPOCH_COMPILER_OPTIONS = {"xla_backend_optimization_level": 3}


def _make_epoch(model: nn.Module, tx: optax.GradientTransformation, cfg: TrainConfig, steps: int):
    """Jitted ``(params, opt_state, images, labels, key) -> (params, opt_state, mean loss)``."""
    loss_fn = _training_loss(model, cfg)

    @partial(jax.jit, compiler_options=EPOCH_COMPILER_OPTIONS)
    def epoch(params, opt_state, images, labels, key):
        k_perm, k_steps = jax.random.split(key)
        order = jax.random.permutation(k_perm, images.shape[0])[: steps * cfg.batch_size]
        batches = order.reshape(steps, cfg.batch_size)

        def step(carry, inputs):
            params, opt_state = carry
            idx, k = inputs
            loss, grads = jax.value_and_grad(loss_fn)(params, images[idx], labels[idx], k)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(
            step, (params, opt_state), (batches, jax.random.split(k_steps, steps))
        )
        return params, opt_state, losses.mean()

    return epoch


def _fit(model: nn.Module, images: np.ndarray, labels: np.ndarray, cfg: TrainConfig, progress: bool, desc: str,
         init_params=None):
    """Train ``model`` on arrays, from scratch or from ``init_params`` (entries the model lacks are ignored, those
    it has beyond them keep their initial value); returns params (a pytree of ``jax.Array``)."""
    n = int(images.shape[0])
    if n != labels.shape[0]:
        raise ValueError(f"{n} images but {labels.shape[0]} labels")
    steps = n // cfg.batch_size
    if steps == 0:
        raise ValueError(f"batch_size {cfg.batch_size} exceeds the {n} training examples")
    init_key, data_key = jax.random.split(jax.random.key(cfg.seed))
    params = model.init(init_key, jnp.zeros((1, *images.shape[1:]), jnp.float32))["params"]
    if init_params is not None:
        params = {**params, **{k: v for k, v in init_params.items() if k in params}}
    schedule = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps=cfg.epochs * steps)
    # PNI's noise scales get no weight decay (it would only pull the noise towards zero).
    decay = None
    if any(k.startswith("pni_") for k in params):
        decay = {k: jax.tree.map(lambda _, k=k: not k.startswith("pni_"), v) for k, v in params.items()}
    tx = optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=decay)
    opt_state = tx.init(params)
    epoch = _make_epoch(model, tx, cfg, steps)
    x = jnp.asarray(images, jnp.float32)
    y = jnp.asarray(labels, jnp.int32)

    from tqdm.auto import tqdm

    bar = tqdm(range(cfg.epochs), desc=desc, unit="epoch", disable=not progress, file=sys.stderr)
    for e in bar:
        params, opt_state, loss = epoch(params, opt_state, x, y, jax.random.fold_in(data_key, e))
        if progress:
            bar.set_postfix(loss=f"{float(loss):.4f}")
    bar.close()
    return jax.block_until_ready(params)


def train(
    model_name: str,
    dataset: str,
    cfg: TrainConfig = TrainConfig(),
    data_dir: str | None = None,
    progress: bool = True,
):
    """Train ``model_name`` from scratch on the ``train`` split of ``dataset``; return params.

    The model is ``get_model(model_name, num_classes)`` with ``num_classes`` = largest
    training label + 1.  Returns the ``params`` pytree (``jax.Array`` leaves) for
    ``model.apply({"params": params}, x)`` (``model`` = :func:`build_model`'s).  ``progress`` shows a tqdm bar
    (per epoch, with the mean training loss) on stderr.  Deterministic given ``cfg``; no caching
    (see :func:`load_or_train`; with ``finetune`` the clean model is trained here first).
    """
    _check_fits(model_name, dataset)
    build_model(model_name, data.info(dataset).num_classes, cfg)  # noise layers validated before any data is read
    images, labels = data.load(dataset, "train", data_dir=data_dir)
    model = build_model(model_name, _num_classes(labels), cfg, images.shape[1:])
    init = None
    if cfg.finetune:
        init = _fit(get_model(model_name, num_classes=_num_classes(labels)), images, labels, cfg.clean(), progress,
                    desc=f"{model_name}/{dataset} (clean)")
    return _fit(model, images, labels, cfg, progress, desc=f"{model_name}/{dataset}", init_params=init)


@partial(jax.jit, static_argnums=0)
def _predict(model: nn.Module, params, x: jax.Array) -> jax.Array:
    return jnp.argmax(model.apply({"params": params}, x), axis=-1)


def accuracy(model: nn.Module, params, images, labels, batch_size: int = 1024) -> float:
    """Fraction of ``images`` whose arg-max logit equals ``labels`` (clean, no defense).

    Evaluated in chunks of ``min(batch_size, N)`` examples; the last chunk is zero-padded
    to the same size so one compiled function serves every chunk.
    """
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels)
    n = int(images.shape[0])
    if n == 0 or n != labels.shape[0]:
        raise ValueError(f"need matching non-empty images/labels, got {n} and {labels.shape[0]}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    b = min(batch_size, n)
    correct = 0
    for start in range(0, n, b):
        chunk = images[start : start + b]
        m = chunk.shape[0]
        if m < b:
            chunk = np.concatenate([chunk, np.zeros((b - m, *chunk.shape[1:]), np.float32)])
        pred = np.asarray(_predict(model, params, chunk))[:m]
        correct += int(np.sum(pred == labels[start : start + m]))
    return correct / n


# ----------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$RND_JAX_CACHE`` if set, else ``$XDG_CACHE_HOME/rnd_jax``, else ``~/.cache/rnd_jax``."""
    if os.environ.get("RND_JAX_CACHE"):
        return Path(os.environ["RND_JAX_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "rnd_jax"


def cache_key(model_name: str, dataset: str, cfg: TrainConfig) -> str:
    """Hex sha256 identifying the trained model for ``(model_name, dataset, cfg)``."""
    config = {k: v for k, v in dataclasses.asdict(cfg).items()
              if k in _ORIGINAL_FIELDS or v != _DEFENSE_DEFAULTS[k]}
    payload = {
        "cache_version": CACHE_VERSION,
        "model": model_name,
        "dataset": dataset,
        "config": config,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_path(model_name: str, dataset: str, cfg: TrainConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory where :func:`load_or_train` keeps this model (whether or not it exists yet)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root.resolve() / f"{model_name}-{dataset}-{cache_key(model_name, dataset, cfg)[:16]}"


def _abstract_params(model: nn.Module, input_shape: Sequence[int]):
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    return jax.eval_shape(partial(model.init, jax.random.key(0)), x)["params"]


def _load(path: Path):
    """(model, params) of a cache entry, restored onto this process's first device (Orbax would otherwise
    restore onto the devices that saved it, which other processes of a ``jax.distributed`` run lack)."""
    import orbax.checkpoint as ocp

    meta = json.loads((path / "meta.json").read_text())
    model = build_model(meta["model"], meta["num_classes"], TrainConfig(**meta["config"]), meta["input_shape"])
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=here),
                          _abstract_params(model, meta["input_shape"]))
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(path / "params", target)
    return model, params


def _save(path: Path, params, meta: dict) -> None:
    import orbax.checkpoint as ocp

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700; the entry is an ordinary shared directory
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", params)
            ckptr.wait_until_finished()
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "meta.json").exists():
                raise
            # A concurrent run finished the same entry first; keep theirs.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_or_train(
    model_name: str,
    dataset: str,
    cfg: TrainConfig = TrainConfig(),
    cache_dir: str | os.PathLike | None = None,
    data_dir: str | None = None,
    progress: bool = True,
) -> tuple[nn.Module, object]:
    """Return ``(model, params)`` for ``(model_name, dataset, cfg)``, training only on a cache miss.

    Hit (``<entry>/meta.json`` exists): params are restored from the Orbax checkpoint,
    no data is loaded and nothing is trained.  Miss: :func:`train`'s procedure runs, test
    accuracy is measured, and the entry is written atomically (see module docstring).
    Either way one line goes to stderr: ``trained ...`` or ``loaded from cache <path>`` (and with
    ``progress`` a ``training ...`` line and a per-epoch bar before training). A model not built
    for the dataset's images raises ``ValueError`` before anything is read or trained. With ``cfg.finetune`` the
    clean model (``cfg.clean()``) is loaded, or trained and cached, first. ``model`` is :func:`build_model`'s (with
    the noise layers of RSE / PNI configs); the test accuracy stored in ``meta.json`` is that of the model
    without noise. ``cache_dir`` defaults to :func:`default_cache_dir`; the entry is :func:`cache_path`.
    """
    _check_fits(model_name, dataset)
    build_model(model_name, data.info(dataset).num_classes, cfg)  # noise layers validated before any data is read
    path = cache_path(model_name, dataset, cfg, cache_dir)
    if (path / "meta.json").exists():
        model, params = _load(path)
        _log(f"loaded from cache {path}")
        return model, params

    init = None
    if cfg.finetune:
        _, init = load_or_train(model_name, dataset, cfg.clean(), cache_dir, data_dir, progress)
    images, labels = data.load(dataset, "train", data_dir=data_dir)
    model = build_model(model_name, _num_classes(labels), cfg, images.shape[1:])
    if progress:
        _log(f"training {model_name} on {dataset} ({cfg.epochs} epochs; cached as {path})")
    t0 = time.perf_counter()
    params = _fit(model, images, labels, cfg, progress, desc=f"{model_name}/{dataset}", init_params=init)
    seconds = time.perf_counter() - t0
    test_images, test_labels = data.load(dataset, "test", data_dir=data_dir)
    test_acc = accuracy(model, params, test_images, test_labels)

    import flax
    import orbax.checkpoint as ocp

    meta = {
        "cache_version": CACHE_VERSION,
        "key": cache_key(model_name, dataset, cfg),
        "model": model_name,
        "dataset": dataset,
        "num_classes": model.num_classes,
        "input_shape": list(images.shape[1:]),
        "config": dataclasses.asdict(cfg),
        "num_params": int(sum(p.size for p in jax.tree_util.tree_leaves(params))),
        "train_examples": int(images.shape[0]),
        "test_examples": int(test_images.shape[0]),
        "train_accuracy": accuracy(model, params, images, labels),
        "test_accuracy": test_acc,
        "train_seconds": round(seconds, 3),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backend": jax.default_backend(),
        "checkpoint_format": "orbax.checkpoint.StandardCheckpointer",
        "versions": {
            "jax": jax.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
            "orbax-checkpoint": getattr(ocp, "__version__", "unknown"),
        },
    }
    _save(path, params, meta)
    _log(f"trained {model_name} on {dataset} in {seconds:.1f}s, test accuracy {test_acc:.4f}; saved {path}")
    return model, params


FEATURE_STD = "feature_std.npz"


def feature_std(model_name: str, dataset: str, cfg: TrainConfig = TrainConfig(), cache_dir=None, data_dir=None,
                batch_size: int = 256, progress: bool = False) -> dict[str, np.ndarray]:
    """Per-feature std over the training split of every marked activation of the cached model, ``{mark:
    f32[*feature shape]}``: the scale of the randomized feature defense's official code, whose noise at a layer
    is ``nu * std * N(0, I)`` with ``std`` the per-element std of that layer's features on training data
    (:func:`rnd_jax.defenses.feature_noise`, ``scale="std"``). Population std (``ddof = 0``), accumulated in
    float64 over chunks of ``batch_size`` images of the model without noise. Computed once and stored in the
    cache entry (``feature_std.npz``, written atomically); later calls read it. The model is loaded or trained
    with :func:`load_or_train`."""
    model, params = load_or_train(model_name, dataset, cfg, cache_dir, data_dir, progress)
    path = cache_path(model_name, dataset, cfg, cache_dir) / FEATURE_STD
    if path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    images, _ = data.load(dataset, "train", data_dir=data_dir)
    stats = _feature_std(model, params, images, batch_size)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **stats)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return stats


@partial(jax.jit, static_argnums=0)
def _marked(model: nn.Module, params, x: jax.Array) -> dict:
    from rnd_jax.noisy import marked_values

    return marked_values(model, params, x)


def _feature_std(model, params, images, batch_size: int) -> dict[str, np.ndarray]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    images = np.asarray(images, np.float32)
    n = images.shape[0]
    if n < 1:
        raise ValueError("feature_std needs at least one image")
    b = min(batch_size, n)
    sums, squares = {}, {}
    for start in range(0, n, b):
        chunk = images[start:start + b]
        m = chunk.shape[0]
        if m < b:  # zero-padded to the chunk size (one compiled program), the padding dropped below
            chunk = np.concatenate([chunk, np.zeros((b - m, *chunk.shape[1:]), np.float32)])
        for k, v in _marked(model, params, chunk).items():
            v = np.asarray(v, np.float64)[:m]
            sums[k] = sums.get(k, 0.0) + v.sum(axis=0)
            squares[k] = squares.get(k, 0.0) + (v * v).sum(axis=0)
    return {k: np.sqrt(np.maximum(squares[k] / n - (sums[k] / n) ** 2, 0.0)).astype(np.float32) for k in sums}
