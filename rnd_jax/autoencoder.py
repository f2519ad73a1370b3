"""A small convolutional autoencoder of a dataset's images, whose decoder spans AutoZOOM-AE's perturbations.

Tu, Ting, Chen, Liu, Zhang, Yi, Hsieh & Cheng, "AutoZOOM: Autoencoder-based Zeroth Order Optimization
Method for Attacking Black-box Neural Networks", AAAI 2019, Sec. 3.3: the attacker trains an autoencoder
offline on unlabeled images of the task (here the training split), then searches a latent code ``z`` of
reduced dimension ``d'`` and perturbs the image by the decoder's output ``D(z)``
(:mod:`rnd_jax.attacks.score.autoencoder_zoo`). The paper's codes are ``14 x 14 x 1`` for MNIST
(``d'/d = 25%``) and ``8 x 8 x 3`` for CIFAR-10 (6.25%); scaled to the input, the default latent side is
``H // 2`` for one-channel images and ``H // 4`` for colour images, with as many channels as the image
(digits 8x8x1: a ``4 x 4 x 1`` code, ``d' = 16``). The side must divide the image by a power of two.

Architecture (``width`` channels in every hidden layer, 3x3 kernels, ReLU): the encoder is a conv layer,
one stride-2 conv per halving, and a linear conv to the code's channels; the decoder mirrors it (a conv,
one stride-2 transposed conv per doubling, a linear conv to the image's channels). The autoencoder works
on centred images ``x - 1/2`` (the reference's pixel range [-0.5, 0.5]) and the decoder has **no bias
terms** and only activations with ``f(0) = 0``, so ``D(0) = 0``: the zero code is the zero perturbation and
an attack starting from ``z = 0`` starts at ``x0``, as ZOO and AutoZOOM do. (The reference's decoder has
biases, so its first point is ``x0 + D(0)``.) The reconstruction of ``x`` is ``1/2 + D(E(x - 1/2))``.

Training: Adam with a cosine-decayed step size on the mean squared reconstruction error, minibatches of
a fresh permutation every epoch (the remainder skipped), all randomness from ``key(cfg.seed)``. The default
config trains on the 1 437 training digits in a few seconds on 2 CPU cores, and the reconstruction error on
the test digits is several times smaller than that of the mean training image (``tests/test_autoencoder_attacks.py``).

Cache: :func:`load_or_train` keeps the trained autoencoder beside the classifiers, in the checkpoint cache
of :mod:`rnd_jax.train` (:func:`~rnd_jax.train.default_cache_dir`), under ``autoencoder-<dataset>-<key16>``
with ``key`` the sha256 of ``(CACHE_VERSION, "autoencoder", dataset, AutoencoderConfig)``, written
atomically by the classifiers' ``_save`` (an Orbax checkpoint and ``meta.json``).

The attacks receive only the decoder, as a :class:`Decoder` pytree whose leaves are the decoder's weights
(arguments of any compiled program, :mod:`rnd_jax.pytree`) and whose static part is the Flax module.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rnd_jax import data, train

NAME = "autoencoder"  # the model name of the cache entries
CACHE_VERSION = 1  # part of every cache key; bump when the architecture or the training changes what a config trains


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture and training of the autoencoder (frozen, validated; part of the cache key).

    ``latent``: side ``r`` of the ``r x r' x C`` code (``None``: ``H // 2`` for one channel, ``H // 4`` for
    more; ``r' = r W / H``); ``width``: channels of the hidden layers; then the training's epochs, batch size,
    peak Adam step size and seed."""

    latent: int | None = None
    width: int = 8
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 1e-2
    seed: int = 0

    def __post_init__(self):
        for name, minimum in (("width", 1), ("epochs", 1), ("batch_size", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < minimum:
                raise ValueError(f"AutoencoderConfig.{name} must be an int >= {minimum}, got {v!r}")
            object.__setattr__(self, name, int(v))
        r = self.latent
        if r is not None:
            if isinstance(r, (bool, np.bool_)) or not isinstance(r, (int, np.integer)) or r < 1:
                raise ValueError(f"AutoencoderConfig.latent must be None or an int >= 1, got {r!r}")
            object.__setattr__(self, "latent", int(r))
        lr = self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, (int, float, np.integer, np.floating)) \
                or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"AutoencoderConfig.learning_rate must be a finite number > 0, got {lr!r}")
        object.__setattr__(self, "learning_rate", float(lr))

    def latent_shape(self, image_shape) -> tuple[int, int, int]:
        """The code's shape for images of ``image_shape`` (``ValueError`` if the side does not fit)."""
        H, W, C = (int(s) for s in image_shape)
        r = self.latent if self.latent is not None else max(1, H // (2 if C == 1 else 4))
        if r > H or H % r or (H // r) & (H // r - 1) or (W * r) % H:
            raise ValueError(f"latent side {r} must divide the image height {H} by a power of two (and its width "
                             f"{W} by the same factor)")
        return (r, W * r // H, C)


def _halvings(image_shape, latent_shape) -> int:
    return int(round(math.log2(image_shape[0] // latent_shape[0])))


class Encoder(nn.Module):
    latent_shape: tuple
    width: int
    halvings: int

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(self.width, (3, 3))(x))
        for _ in range(self.halvings):
            h = nn.relu(nn.Conv(self.width, (3, 3), strides=(2, 2))(h))
        return nn.Conv(self.latent_shape[-1], (3, 3))(h)


class DecoderNet(nn.Module):
    """The decoder: no biases and ReLU hidden layers, so ``D(0) = 0``."""

    image_shape: tuple
    latent_shape: tuple
    width: int
    halvings: int

    @nn.compact
    def __call__(self, z):
        h = nn.relu(nn.Conv(self.width, (3, 3), use_bias=False)(z))
        for _ in range(self.halvings):
            h = nn.relu(nn.ConvTranspose(self.width, (3, 3), strides=(2, 2), use_bias=False)(h))
        return nn.Conv(self.image_shape[-1], (3, 3), use_bias=False)(h)


class ConvAutoencoder(nn.Module):
    """``x_centred -> D(E(x_centred))`` (see the module docstring)."""

    image_shape: tuple
    latent_shape: tuple
    width: int

    def setup(self):
        k = _halvings(self.image_shape, self.latent_shape)
        self.encoder = Encoder(self.latent_shape, self.width, k)
        self.decoder = DecoderNet(self.image_shape, self.latent_shape, self.width, k)

    def __call__(self, x):
        return self.decoder(self.encoder(x))

    def encode(self, x):
        return self.encoder(x)


def build(image_shape, cfg: AutoencoderConfig = AutoencoderConfig()) -> ConvAutoencoder:
    """The (untrained) module for images of ``image_shape``."""
    image_shape = tuple(int(s) for s in image_shape)
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (H, W, C), got {image_shape}")
    return ConvAutoencoder(image_shape, cfg.latent_shape(image_shape), cfg.width)


@jax.tree_util.register_pytree_node_class
class Decoder:
    """The attacker's decoder ``D``: ``D(z: f32[..., *latent_shape]) -> f32[..., *image_shape]``.

    A pytree: the decoder's weights are its leaves, the Flax module (shapes, width) its static part."""

    def __init__(self, module: DecoderNet, params):
        self.module = module
        self.params = params

    @property
    def latent_shape(self) -> tuple:
        return tuple(self.module.latent_shape)

    @property
    def image_shape(self) -> tuple:
        return tuple(self.module.image_shape)

    def __call__(self, z):
        z = jnp.asarray(z, jnp.float32)
        lead = z.shape[:z.ndim - 3]
        out = self.module.apply({"params": self.params}, z.reshape((-1,) + z.shape[-3:]))
        return out.reshape(lead + self.image_shape)

    def tree_flatten(self):
        return (self.params,), self.module

    @classmethod
    def tree_unflatten(cls, module, children):
        return cls(module, children[0])

    def __repr__(self):
        return f"Decoder(latent {self.latent_shape} -> image {self.image_shape})"


def decoder(module: ConvAutoencoder, params) -> Decoder:
    """The :class:`Decoder` of a trained autoencoder ``(module, params)``."""
    k = _halvings(module.image_shape, module.latent_shape)
    return Decoder(DecoderNet(module.image_shape, module.latent_shape, module.width, k), params["decoder"])


def init(module: ConvAutoencoder, key):
    """Fresh (untrained) params of ``module``."""
    return module.init(key, jnp.zeros((1,) + module.image_shape, jnp.float32))["params"]


def placeholder(image_shape, cfg: AutoencoderConfig = AutoencoderConfig()) -> Decoder:
    """An untrained decoder of the right shapes: lets attacks be built and validated without training."""
    module = build(image_shape, cfg)
    return decoder(module, init(module, jax.random.key(0)))


def reconstruct(module: ConvAutoencoder, params, x):
    """``1/2 + D(E(x - 1/2))`` for images ``x: f32[N, H, W, C]`` in [0, 1]."""
    x = jnp.asarray(x, jnp.float32)
    return 0.5 + module.apply({"params": params}, x - 0.5)


def fit(module: ConvAutoencoder, images, cfg: AutoencoderConfig, progress: bool = False):
    """Train ``module`` from scratch on ``images`` (f32[N, H, W, C] in [0, 1]); returns its params."""
    x = jnp.asarray(images, jnp.float32) - 0.5
    n = int(x.shape[0])
    steps = n // cfg.batch_size
    if steps == 0:
        raise ValueError(f"batch_size {cfg.batch_size} exceeds the {n} training images")
    init_key, data_key = jax.random.split(jax.random.key(cfg.seed))
    params = init(module, init_key)
    tx = optax.adam(optax.cosine_decay_schedule(cfg.learning_rate, decay_steps=cfg.epochs * steps))
    opt_state = tx.init(params)

    def loss_fn(p, batch):
        return jnp.mean((module.apply({"params": p}, batch) - batch) ** 2)

    @functools.partial(jax.jit, compiler_options=train.EPOCH_COMPILER_OPTIONS)  # a long-running program
    def epoch(params, opt_state, x, key):
        order = jax.random.permutation(key, n)[: steps * cfg.batch_size].reshape(steps, cfg.batch_size)

        def step(carry, idx):
            p, s = carry
            loss, g = jax.value_and_grad(loss_fn)(p, x[idx])
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), order)
        return params, opt_state, losses.mean()

    for e in range(cfg.epochs):
        params, opt_state, loss = epoch(params, opt_state, x, jax.random.fold_in(data_key, e))
        if progress and (e + 1) % 10 == 0:
            print(f"[rnd_jax] autoencoder epoch {e + 1}/{cfg.epochs}: mse {float(loss):.5f}", file=sys.stderr,
                  flush=True)
    return jax.block_until_ready(params)


def mse(module: ConvAutoencoder, params, images) -> float:
    """Mean squared reconstruction error on ``images`` (pixel units)."""
    x = jnp.asarray(images, jnp.float32)
    return float(jnp.mean((reconstruct(module, params, x) - x) ** 2))


def _restore(path: Path, module: ConvAutoencoder):
    import orbax.checkpoint as ocp

    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.eval_shape(lambda: init(module, jax.random.key(0)))
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=here), abstract)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path / "params", target)


def cache_key(dataset: str, cfg: AutoencoderConfig = AutoencoderConfig()) -> str:
    """Hex sha256 of the canonical JSON of ``(CACHE_VERSION, "autoencoder", dataset, cfg)``."""
    payload = {"cache_version": CACHE_VERSION, "model": NAME, "dataset": dataset, "config": dataclasses.asdict(cfg)}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_path(dataset: str, cfg: AutoencoderConfig = AutoencoderConfig(), cache_dir=None) -> Path:
    """The cache entry ``<cache_dir>/autoencoder-<dataset>-<key16>`` (whether or not it exists yet); the
    cache folder is the classifiers' (:func:`rnd_jax.train.default_cache_dir` unless given)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else train.default_cache_dir()
    return root.resolve() / f"{NAME}-{dataset}-{cache_key(dataset, cfg)[:16]}"


def load_or_train(dataset: str, cfg: AutoencoderConfig = AutoencoderConfig(), cache_dir=None, data_dir=None,
                  progress: bool = True) -> tuple[ConvAutoencoder, object]:
    """``(module, params)`` of the autoencoder of ``dataset``'s training split, trained only on a cache miss."""
    if not isinstance(cfg, AutoencoderConfig):
        raise ValueError(f"cfg must be an AutoencoderConfig, got {type(cfg).__name__}")
    module = build(data.info(dataset).image_shape, cfg)
    path = cache_path(dataset, cfg, cache_dir)
    if (path / "meta.json").exists():
        params = _restore(path, module)
        if progress:
            print(f"[rnd_jax] autoencoder loaded from cache {path}", file=sys.stderr, flush=True)
        return module, params
    images, _ = data.load(dataset, "train", data_dir=data_dir)
    t0 = time.perf_counter()
    params = fit(module, images, cfg, progress)
    seconds = time.perf_counter() - t0
    test_images, _ = data.load(dataset, "test", data_dir=data_dir)
    mean_image = np.asarray(images, np.float32).mean(0)
    meta = {
        "cache_version": CACHE_VERSION, "key": cache_key(dataset, cfg), "model": NAME,
        "dataset": dataset, "config": dataclasses.asdict(cfg), "input_shape": list(module.image_shape),
        "latent_shape": list(module.latent_shape),
        "num_params": int(sum(p.size for p in jax.tree_util.tree_leaves(params))),
        "train_mse": mse(module, params, images), "test_mse": mse(module, params, test_images),
        "test_mse_mean_image": float(np.mean((np.asarray(test_images, np.float32) - mean_image) ** 2)),
        "train_seconds": round(seconds, 3), "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backend": jax.default_backend(), "checkpoint_format": "orbax.checkpoint.StandardCheckpointer",
    }
    train._save(path, params, meta)
    if progress:
        print(f"[rnd_jax] trained the {dataset} autoencoder in {seconds:.1f}s, test mse {meta['test_mse']:.5f} "
              f"(mean image {meta['test_mse_mean_image']:.5f}); saved {path}", file=sys.stderr, flush=True)
    return module, params


def load_decoder(dataset: str, cfg: AutoencoderConfig = AutoencoderConfig(), cache_dir=None, data_dir=None,
                 progress: bool = True) -> Decoder:
    """The :class:`Decoder` of :func:`load_or_train`'s autoencoder."""
    return decoder(*load_or_train(dataset, cfg, cache_dir, data_dir, progress))


def read_meta(dataset: str, cfg: AutoencoderConfig = AutoencoderConfig(), cache_dir=None) -> dict | None:
    """The cache entry's ``meta.json`` (``None`` if not trained yet)."""
    p = cache_path(dataset, cfg, cache_dir) / "meta.json"
    return json.loads(p.read_text()) if p.exists() else None
