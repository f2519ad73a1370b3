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
recompiles.

Cache
-----
:func:`load_or_train` stores a trained model under ``<cache_dir>/<model>-<dataset>-<key16>``,
``key`` = sha256 of the canonical JSON of ``(CACHE_VERSION, model name, dataset,
dataclasses.asdict(cfg))``.  The directory holds ``params/`` (an Orbax
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
from rnd_jax.models import check_fits, get_model

__all__ = [
    "CACHE_VERSION",
    "TrainConfig",
    "accuracy",
    "cache_key",
    "cache_path",
    "default_cache_dir",
    "load_or_train",
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
        if not isinstance(self.augment_clip, (bool, np.bool_)):
            raise ValueError(f"augment_clip must be a bool, got {self.augment_clip!r}")
        object.__setattr__(self, "augment_clip", bool(self.augment_clip))


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


def _make_epoch(model: nn.Module, tx: optax.GradientTransformation, cfg: TrainConfig, steps: int):
    """Jitted ``(params, opt_state, images, labels, key) -> (params, opt_state, mean loss)``."""

    def loss_fn(params, x, y, key):
        k_aug, k_drop, k_logit = jax.random.split(key, 3)
        if cfg.augment_noise > 0:
            x = x + cfg.augment_noise * jax.random.normal(k_aug, x.shape, x.dtype)
            if cfg.augment_clip:
                x = jnp.clip(x, 0.0, 1.0)
        logits = model.apply({"params": params}, x, train=True, rngs={"dropout": k_drop})
        if cfg.logit_noise > 0:
            logits = logits + cfg.logit_noise * jax.random.normal(k_logit, logits.shape, logits.dtype)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
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


def _fit(model: nn.Module, images: np.ndarray, labels: np.ndarray, cfg: TrainConfig, progress: bool, desc: str):
    """Train ``model`` from scratch on arrays; returns params (a pytree of ``jax.Array``)."""
    n = int(images.shape[0])
    if n != labels.shape[0]:
        raise ValueError(f"{n} images but {labels.shape[0]} labels")
    steps = n // cfg.batch_size
    if steps == 0:
        raise ValueError(f"batch_size {cfg.batch_size} exceeds the {n} training examples")
    init_key, data_key = jax.random.split(jax.random.key(cfg.seed))
    params = model.init(init_key, jnp.zeros((1, *images.shape[1:]), jnp.float32))["params"]
    schedule = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps=cfg.epochs * steps)
    tx = optax.adamw(schedule, weight_decay=cfg.weight_decay)
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
    ``model.apply({"params": params}, x)``.  ``progress`` shows a tqdm bar (per epoch,
    with the mean training loss) on stderr.  Deterministic given ``cfg``; no caching
    (see :func:`load_or_train`).
    """
    _check_fits(model_name, dataset)
    images, labels = data.load(dataset, "train", data_dir=data_dir)
    model = get_model(model_name, num_classes=_num_classes(labels))
    return _fit(model, images, labels, cfg, progress, desc=f"{model_name}/{dataset}")


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
    payload = {
        "cache_version": CACHE_VERSION,
        "model": model_name,
        "dataset": dataset,
        "config": dataclasses.asdict(cfg),
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
    model = get_model(meta["model"], num_classes=meta["num_classes"])
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
    for the dataset's images raises ``ValueError`` before anything is read or trained.
    ``cache_dir`` defaults to :func:`default_cache_dir`; the entry is
    :func:`cache_path`.
    """
    _check_fits(model_name, dataset)
    path = cache_path(model_name, dataset, cfg, cache_dir)
    if (path / "meta.json").exists():
        model, params = _load(path)
        _log(f"loaded from cache {path}")
        return model, params

    images, labels = data.load(dataset, "train", data_dir=data_dir)
    model = get_model(model_name, num_classes=_num_classes(labels))
    if progress:
        _log(f"training {model_name} on {dataset} ({cfg.epochs} epochs; cached as {path})")
    t0 = time.perf_counter()
    params = _fit(model, images, labels, cfg, progress, desc=f"{model_name}/{dataset}")
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
