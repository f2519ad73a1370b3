"""Standard image classifiers (Flax linen) laid out for PyTorch weights imported with :mod:`rnd_jax.weights`.

Every model here keeps the contract of :mod:`rnd_jax.models`: ``x: f32[B, H, W, C]`` with pixels in
``[0, 1]`` goes in, logits ``f32[B, K]`` come out, ``model.apply({"params": p}, x)`` is a pure
function of ``(p, x)``, and the output of every block is marked with ``h = self.perturb(name, h)``
(collection ``"perturbations"``) so that :func:`rnd_jax.models.feature_shapes` and the
feature-noise defense work on them unchanged.

Models (registered in :data:`rnd_jax.models.MODELS` under the names in brackets)
-------------------------------------------------------------------------------
:class:`CifarResNet` [``resnet20``]
    ResNet-(6n+2) for 32x32 inputs, He et al. (2016) Sec. 4.2; ``n=3`` is ResNet-20.
:class:`VGG` [``vgg16``]
    VGG-16 with BatchNorm in the usual CIFAR-10 layout (13 conv+BN+ReLU, 5 max-pools, one linear).
:class:`WideResNet` [``wrn28_10``]
    WRN-depth-k of Zagoruyko & Komodakis (2016), pre-activation blocks, RobustBench's layout.
:class:`ResNet` [``resnet50``]
    Bottleneck ResNet for ImageNet as in torchvision (stride on the 3x3 conv, "v1.5").
:class:`VisionTransformer` [``vit_b16``]
    ViT of Dosovitskiy et al. (2021) as in timm (class token, learned position embedding).

Depth and width are constructor fields, so tiny versions of exactly the same code exist for tests
(``WideResNet(depth=16, widen_factor=2)``, ``VisionTransformer(img_size=32, patch_size=8,
embed_dim=64, depth=2, num_heads=4)``, ``ResNet(layers=(1, 1, 1, 1), width=8)``, ...).

Inference only
--------------
These models are for imported weights and inference. BatchNorm is :class:`FrozenBatchNorm`: its
scale, bias, running mean and running variance all live in the ``"params"`` collection and are used
as constants (PyTorch's ``eval()`` behaviour, eps ``1e-5``), so ``apply({"params": p}, x)`` stays a
pure function of the params and no ``batch_stats`` collection exists. Training them with
:mod:`rnd_jax.train` is not supported: ``apply(..., train=True)`` raises ``ValueError`` (a gradient
step would also move the running statistics, which are params here). Parameter counts in the
PyTorch sense (no running statistics) are given by :func:`count_params`.

Input normalisation
-------------------
Each model takes ``[0, 1]`` pixels and applies ``(x - mean) / std`` itself (fields ``mean`` and
``std``, per channel; ``None`` for none), so every attack keeps the ``[0, 1]`` interface. Defaults
follow the source of the weights each layout matches:

* ``resnet20``: ``(0.485, 0.456, 0.406) / (0.229, 0.224, 0.225)`` (the ImageNet statistics that the
  widely used CIFAR ResNet-20 training script with this naming normalises with);
* ``vgg16``: CIFAR-10 ``(0.4914, 0.4822, 0.4465) / (0.2023, 0.1994, 0.2010)``, the common
  CIFAR-10 training recipe for this layout;
* ``wrn28_10``: none (RobustBench models take raw ``[0, 1]`` inputs);
* ``resnet50``: torchvision's ``(0.485, 0.456, 0.406) / (0.229, 0.224, 0.225)``;
* ``vit_b16``: timm's ``(0.5, 0.5, 0.5) / (0.5, 0.5, 0.5)`` (``vit_base_patch16_224``).

Check the statistics of the checkpoint you import and pass ``mean``/``std`` if they differ.

PyTorch numerics
----------------
Layout is NHWC; every convolution and pooling uses PyTorch's explicit symmetric padding (never
Flax ``"SAME"``, which pads asymmetrically for stride 2 on even sizes); max-pool padding is
``-inf``; BN eps ``1e-5``; LayerNorm eps ``1e-6`` with the two-pass variance; exact (erf) GELU.
Flattening before a linear layer (VGG) is done in PyTorch's channel-major order.

Flax module names mirror the PyTorch module names, with ``.N`` written ``_N`` (``layer1_0`` for
``layer1.0``, ``features_3`` for ``features.3``, ``blocks_0`` for ``blocks.0``); WideResNet's
``block1.layer.0`` is ``block1_layer_0``. :func:`rnd_jax.weights.import_params` relies on this.

Perturbation marks (in forward order)
-------------------------------------
* ``CifarResNet``: ``block{s}_{i}``, the output (after the residual addition and ReLU) of block
  ``i`` (0-based) of stage ``s`` (1-based), i.e. of PyTorch's ``layer{s}.{i}``: ``block1_0`` ...
  ``block3_2`` for ResNet-20 (32x32x16, 16x16x32, 8x8x64).
* ``VGG``: ``conv1`` ... ``conv13``, the output of each conv+BN+ReLU, after the max-pool that
  follows it, if any (``conv13``: 1x1x512 for 32x32 inputs).
* ``WideResNet``: ``block{s}_{i}``, the output of ``block{s}.layer.{i}`` (the residual sum; the
  blocks are pre-activation, so this is before the next BN+ReLU): ``block1_0`` ... ``block3_3``.
* ``ResNet``: ``block{s}_{i}``, the output of bottleneck ``layer{s}.{i}`` (after the addition and
  ReLU): ``block1_0`` ... ``block4_2`` for ResNet-50 (56x56x256 ... 7x7x2048 at 224x224).
* ``VisionTransformer``: ``block{i}``, the token sequence ``f32[N+1, D]`` (class token first) after
  transformer block ``blocks.{i}``: ``block0`` ... ``block11`` for ViT-B/16.

References: K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition", CVPR
2016. K. Simonyan, A. Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015. S. Zagoruyko, N. Komodakis, "Wide Residual Networks", BMVC 2016.
A. Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021. F. Croce et al., "RobustBench",
NeurIPS 2021 Datasets and Benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TIMM_VIT_MEAN",
    "TIMM_VIT_STD",
    "VGG16_CFG",
    "CifarResNet",
    "FrozenBatchNorm",
    "ResNet",
    "VGG",
    "VisionTransformer",
    "WideResNet",
    "count_params",
    "resnet20",
    "resnet50",
    "vgg16",
    "vit_b16",
    "wrn28_10",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
TIMM_VIT_MEAN = (0.5, 0.5, 0.5)
TIMM_VIT_STD = (0.5, 0.5, 0.5)

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
"""VGG-16 feature layout: an int is a 3x3 conv (padding 1) + BN + ReLU of that width, ``"M"`` a 2x2 max-pool."""

BN_EPS = 1e-5
LN_EPS = 1e-6


# ----------------------------------------------------------------------------------------------
# Validation and shared pieces
# ----------------------------------------------------------------------------------------------


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_num_classes(value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {value!r}")


def _check_normalization(mean, std) -> None:
    if mean is None and std is None:
        return
    if mean is None or std is None:
        raise ValueError(f"mean and std must both be set or both be None, got mean={mean!r}, std={std!r}")
    try:
        m = [float(v) for v in mean]
        s = [float(v) for v in std]
    except (TypeError, ValueError):
        raise ValueError(f"mean and std must be sequences of numbers, got mean={mean!r}, std={std!r}") from None
    if len(m) != len(s) or not m:
        raise ValueError(f"mean and std need one entry per input channel (same length), got {mean!r} and {std!r}")
    if not all(math.isfinite(v) for v in m) or not all(math.isfinite(v) and v > 0 for v in s):
        raise ValueError(f"mean must be finite and std finite and > 0, got mean={mean!r}, std={std!r}")


def _check_input(x: jax.Array, mean, train: bool) -> None:
    if train:
        raise ValueError(
            "this model is inference-only (frozen BatchNorm statistics live in params); train=True is not supported"
        )
    if x.ndim != 4:
        raise ValueError(f"expected images f32[B, H, W, C], got shape {tuple(x.shape)}")
    if mean is not None and x.shape[-1] != len(mean):
        raise ValueError(f"input has {x.shape[-1]} channels but mean/std have {len(mean)} entries")


def _normalize(x: jax.Array, mean, std) -> jax.Array:
    if mean is None:
        return x
    return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


def _pad(p: int):
    return ((p, p), (p, p))


def _conv(features: int, kernel: int, stride: int, padding: int, name: str, bias: bool = False) -> nn.Conv:
    """PyTorch ``Conv2d(kernel, stride, padding)``: explicit symmetric zero padding."""
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=_pad(padding), use_bias=bias,
                   name=name)


def _max_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """PyTorch ``MaxPool2d``: padding counts as ``-inf``, so it never wins."""
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=_pad(padding))


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics: ``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis.

    All four per-channel vectors are ``params`` (``scale``, ``bias``, ``mean``, ``var``; PyTorch's
    ``weight``, ``bias``, ``running_mean``, ``running_var``), initialised to the identity transform.
    This is PyTorch's ``BatchNorm2d`` in ``eval()`` mode; there is no training mode.
    """

    epsilon: float = BN_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        mean = self.param("mean", nn.initializers.zeros, (c,), jnp.float32)
        var = self.param("var", nn.initializers.ones, (c,), jnp.float32)
        mult = scale * lax.rsqrt(var + self.epsilon)
        return (x - mean.astype(x.dtype)) * mult.astype(x.dtype) + bias.astype(x.dtype)


def count_params(params) -> int:
    """Number of parameters in the PyTorch sense: every leaf except BatchNorm running statistics.

    (``mean``/``var`` leaves of :class:`FrozenBatchNorm` are buffers in PyTorch, not parameters.)
    Works on concrete params and on ``jax.eval_shape`` output alike.
    """
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if str(getattr(path[-1], "key", path[-1])) in ("mean", "var"):
            continue
        total += math.prod(leaf.shape)
    return total


# ----------------------------------------------------------------------------------------------
# ResNet-(6n+2) for CIFAR
# ----------------------------------------------------------------------------------------------


class _CifarBasicBlock(nn.Module):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, plus an option-A shortcut, then ReLU."""

    features: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out = nn.relu(FrozenBatchNorm(name="bn1")(_conv(self.features, 3, self.stride, 1, "conv1")(x)))
        out = FrozenBatchNorm(name="bn2")(_conv(self.features, 3, 1, 1, "conv2")(out))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            # Option A (He et al. 2016, Sec. 3.3 / 4.2): subsample by 2, zero-pad the new channels,
            # half before and half after the existing ones; no parameters.
            extra = self.features - x.shape[-1]
            shortcut = jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        return nn.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR-10 (He et al. 2016, Sec. 4.2); the defaults are ResNet-20.

    ``conv3x3(width)-BN-ReLU``, then three stages of ``blocks_per_stage`` basic blocks with
    ``width, 2*width, 4*width`` channels (16/32/64 by default; stages 2 and 3 start with a stride-2
    block), global average pooling and a linear layer. Shortcuts follow **option A** of the paper
    (identity; where the shape changes, stride-2 subsampling and zero channels, half on each side),
    the choice He et al. make for CIFAR-10, so the model has 269,722 parameters at the defaults
    (0.27M, the paper's Table 6).

    Imports the PyTorch naming of the widely used CIFAR ResNet implementation:
    ``conv1``, ``bn1``, ``layer{s}.{i}.conv1/bn1/conv2/bn2``, ``linear``.
    Marks: ``block{s}_{i}`` (see the module docstring).
    """

    num_classes: int = 10
    blocks_per_stage: int = 3
    width: int = 16
    mean: Sequence[float] | None = IMAGENET_MEAN
    std: Sequence[float] | None = IMAGENET_STD

    def __post_init__(self):
        _check_num_classes(self.num_classes)
        _check_positive_int("blocks_per_stage", self.blocks_per_stage)
        _check_positive_int("width", self.width)
        if self.width % 2:
            raise ValueError(f"width must be even (option-A shortcuts pad width/2 channels), got {self.width}")
        _check_normalization(self.mean, self.std)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _check_input(x, self.mean, train)
        h = _normalize(x, self.mean, self.std)
        h = nn.relu(FrozenBatchNorm(name="bn1")(_conv(self.width, 3, 1, 1, "conv1")(h)))
        for s in range(1, 4):
            for i in range(self.blocks_per_stage):
                stride = 2 if (s > 1 and i == 0) else 1
                h = _CifarBasicBlock(self.width * 2 ** (s - 1), stride, name=f"layer{s}_{i}")(h)
                h = self.perturb(f"block{s}_{i}", h)
        h = jnp.mean(h, axis=(1, 2))
        return nn.Dense(self.num_classes, name="linear")(h)


# ----------------------------------------------------------------------------------------------
# VGG with BatchNorm (CIFAR layout)
# ----------------------------------------------------------------------------------------------


class VGG(nn.Module):
    """VGG with BatchNorm for 32x32 inputs (Simonyan & Zisserman 2015, configuration D = VGG-16).

    ``cfg`` lists the feature layers: an int is ``conv3x3(padding 1, with bias)-BN-ReLU`` of that
    width, ``"M"`` is a 2x2 max-pool with stride 2. The features are flattened (in PyTorch's
    channel-major order) into one linear layer to the logits; with :data:`VGG16_CFG` a 32x32 image
    ends at 1x1x512, so the classifier is 512 -> ``num_classes``: 14,728,266 parameters for 10
    classes (13 convs 14,714,688 + 13 BNs 8,448 + linear 5,130).

    Imports the common CIFAR layout: ``features.{N}`` with ``N`` the index in one
    ``nn.Sequential`` (conv, BN, ReLU, ..., MaxPool, ...; a trailing 1x1 stride-1 average pool is
    the identity), and ``classifier``. Marks: ``conv1`` ... ``conv{n_convs}``.
    """

    num_classes: int = 10
    cfg: Sequence[int | str] = VGG16_CFG
    mean: Sequence[float] | None = CIFAR10_MEAN
    std: Sequence[float] | None = CIFAR10_STD

    def __post_init__(self):
        _check_num_classes(self.num_classes)
        cfg = tuple(self.cfg)
        if not any(not isinstance(v, str) for v in cfg):
            raise ValueError(f"cfg needs at least one conv width, got {self.cfg!r}")
        for v in cfg:
            if isinstance(v, str):
                if v != "M":
                    raise ValueError(f"cfg entries are conv widths (int >= 1) or 'M', got {v!r}")
            else:
                _check_positive_int("a cfg conv width", v)
        _check_normalization(self.mean, self.std)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _check_input(x, self.mean, train)
        h = _normalize(x, self.mean, self.std)
        cfg = tuple(self.cfg)
        index, n_conv, pending = 0, 0, None  # index: position in PyTorch's ``features`` Sequential
        for v in cfg:
            if v == "M":
                if h.shape[1] < 2 or h.shape[2] < 2:
                    raise ValueError(f"input too small for cfg {cfg}: a max-pool meets a {h.shape[1:3]} map")
                h = _max_pool(h, 2, 2, 0)
                index += 1
            else:
                if pending is not None:
                    h = self.perturb(pending, h)
                h = _conv(v, 3, 1, 1, f"features_{index}", bias=True)(h)
                h = nn.relu(FrozenBatchNorm(name=f"features_{index + 1}")(h))
                index += 3
                n_conv += 1
                pending = f"conv{n_conv}"
                continue
            if pending is not None:  # a conv block's mark sits after the pool that follows it
                h = self.perturb(pending, h)
                pending = None
        if pending is not None:
            h = self.perturb(pending, h)
        h = h.transpose(0, 3, 1, 2).reshape(h.shape[0], -1)
        return nn.Dense(self.num_classes, name="classifier")(h)


# ----------------------------------------------------------------------------------------------
# WideResNet (RobustBench layout)
# ----------------------------------------------------------------------------------------------


def _wide_basic_block(x: jax.Array, features: int, stride: int, prefix: str) -> jax.Array:
    """Pre-activation block: BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3, plus the shortcut.

    Where the width changes the shortcut is ``convShortcut`` (1x1, stride) applied to the
    pre-activated input ``relu(bn1(x))``; otherwise it is ``x`` itself (RobustBench / TRADES code).
    Called inside :class:`WideResNet`'s compact ``__call__``, so its layers are top-level modules
    named ``f"{prefix}_bn1"``, ... (PyTorch: ``f"{prefix}.bn1"`` with ``prefix`` dotted).
    """
    act = nn.relu(FrozenBatchNorm(name=f"{prefix}_bn1")(x))
    out = _conv(features, 3, stride, 1, f"{prefix}_conv1")(act)
    out = nn.relu(FrozenBatchNorm(name=f"{prefix}_bn2")(out))
    out = _conv(features, 3, 1, 1, f"{prefix}_conv2")(out)
    if x.shape[-1] == features:
        return x + out
    return _conv(features, 1, stride, 0, f"{prefix}_convShortcut")(act) + out


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` (Zagoruyko & Komodakis 2016) in RobustBench's layout; defaults WRN-28-10.

    ``conv3x3(16)``, three groups of ``n = (depth - 4) / 6`` pre-activation basic blocks with
    ``16k, 32k, 64k`` channels (groups 2 and 3 start with stride 2), then ``BN-ReLU``, global
    average pooling (PyTorch's ``avg_pool2d(8)`` on 32x32 inputs) and a linear layer. No dropout
    (RobustBench's "Standard" model uses none). 36,479,194 parameters at the defaults.

    Inputs are raw ``[0, 1]`` pixels (``mean = std = None``), as in RobustBench.

    PyTorch naming (RobustBench ``Standard``): ``conv1``, ``block{g}.layer.{i}.bn1/conv1/bn2/conv2``,
    ``block{g}.layer.0.convShortcut`` where the width changes, ``bn1``, ``fc``. The flax modules of
    ``block{g}.layer.{i}`` are top-level and named ``block{g}_layer_{i}_<layer>``.
    Marks: ``block{g}_{i}`` (see the module docstring).
    """

    num_classes: int = 10
    depth: int = 28
    widen_factor: int = 10
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None

    def __post_init__(self):
        _check_num_classes(self.num_classes)
        _check_positive_int("depth", self.depth)
        _check_positive_int("widen_factor", self.widen_factor)
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {self.depth}")
        _check_normalization(self.mean, self.std)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _check_input(x, self.mean, train)
        h = _normalize(x, self.mean, self.std)
        n = (self.depth - 4) // 6
        h = _conv(16, 3, 1, 1, "conv1")(h)
        for g in range(1, 4):
            width = 16 * self.widen_factor * 2 ** (g - 1)
            for i in range(n):
                stride = 2 if (g > 1 and i == 0) else 1
                h = _wide_basic_block(h, width, stride, f"block{g}_layer_{i}")
                h = self.perturb(f"block{g}_{i}", h)
        h = nn.relu(FrozenBatchNorm(name="bn1")(h))
        h = jnp.mean(h, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(h)


# ----------------------------------------------------------------------------------------------
# ResNet for ImageNet (torchvision layout)
# ----------------------------------------------------------------------------------------------


class _Bottleneck(nn.Module):
    """conv1x1-BN-ReLU, conv3x3(stride, padding 1)-BN-ReLU, conv1x1(4x)-BN, + shortcut, ReLU."""

    planes: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_ch = 4 * self.planes
        out = nn.relu(FrozenBatchNorm(name="bn1")(_conv(self.planes, 1, 1, 0, "conv1")(x)))
        out = nn.relu(FrozenBatchNorm(name="bn2")(_conv(self.planes, 3, self.stride, 1, "conv2")(out)))
        out = FrozenBatchNorm(name="bn3")(_conv(out_ch, 1, 1, 0, "conv3")(out))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != out_ch:
            shortcut = FrozenBatchNorm(name="downsample_1")(_conv(out_ch, 1, self.stride, 0, "downsample_0")(x))
        return nn.relu(out + shortcut)


class ResNet(nn.Module):
    """Bottleneck ResNet for ImageNet in torchvision's layout; the defaults are ResNet-50.

    Stem ``conv7x7(width, stride 2, padding 3)-BN-ReLU-maxpool3x3(stride 2, padding 1)``, four
    stages of ``layers`` bottleneck blocks with ``width, 2w, 4w, 8w`` inner channels (x4 out;
    stages 2-4 start with stride 2, placed on the 3x3 conv as torchvision does), global average
    pooling and ``fc``. 25,557,032 parameters at the defaults with 1000 classes.

    Inputs are normalised with torchvision's ImageNet mean/std by default.

    PyTorch naming (torchvision): ``conv1``, ``bn1``, ``layer{s}.{i}.conv1/bn1/conv2/bn2/conv3/bn3``,
    ``layer{s}.0.downsample.0`` (1x1 conv) / ``.1`` (BN), ``fc``.
    Marks: ``block{s}_{i}`` (see the module docstring).
    """

    num_classes: int = 1000
    layers: Sequence[int] = (3, 4, 6, 3)
    width: int = 64
    mean: Sequence[float] | None = IMAGENET_MEAN
    std: Sequence[float] | None = IMAGENET_STD

    def __post_init__(self):
        _check_num_classes(self.num_classes)
        if len(tuple(self.layers)) != 4:
            raise ValueError(f"layers must list the blocks of the 4 stages, got {self.layers!r}")
        for n in self.layers:
            _check_positive_int("every entry of layers", n)
        _check_positive_int("width", self.width)
        _check_normalization(self.mean, self.std)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _check_input(x, self.mean, train)
        h = _normalize(x, self.mean, self.std)
        h = nn.relu(FrozenBatchNorm(name="bn1")(_conv(self.width, 7, 2, 3, "conv1")(h)))
        h = _max_pool(h, 3, 2, 1)
        for s, n in enumerate(self.layers, start=1):
            for i in range(n):
                stride = 2 if (s > 1 and i == 0) else 1
                h = _Bottleneck(self.width * 2 ** (s - 1), stride, name=f"layer{s}_{i}")(h)
                h = self.perturb(f"block{s}_{i}", h)
        h = jnp.mean(h, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(h)


# ----------------------------------------------------------------------------------------------
# Vision Transformer (timm layout)
# ----------------------------------------------------------------------------------------------


def _layer_norm(name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, name=name)


class _PatchEmbed(nn.Module):
    embed_dim: int
    patch_size: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        h = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", name="proj")(x)
        return h.reshape(h.shape[0], -1, h.shape[-1])  # row-major patches, as PyTorch's flatten(2)


class _Attention(nn.Module):
    """Multi-head self-attention with timm's fused ``qkv`` projection (output order q, k, v; heads inside)."""

    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        hd = d // self.num_heads
        qkv = nn.Dense(3 * d, name="qkv")(x).reshape(b, n, 3, self.num_heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # f32[B, N, H, hd]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * hd**-0.5, k)
        attn = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, d)
        return nn.Dense(d, name="proj")(out)


class _Mlp(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.gelu(nn.Dense(self.hidden, name="fc1")(x), approximate=False)
        return nn.Dense(x.shape[-1], name="fc2")(h)


class _Block(nn.Module):
    num_heads: int
    mlp_hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + _Attention(self.num_heads, name="attn")(_layer_norm("norm1")(x))
        return x + _Mlp(self.mlp_hidden, name="mlp")(_layer_norm("norm2")(x))


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2021) in timm's layout; the defaults are ViT-B/16 at 224x224.

    ``patch_size`` x ``patch_size`` patches embedded by a strided conv, a class token prepended,
    a learned position embedding added, ``depth`` pre-norm transformer blocks
    (``x + attn(norm1(x))``, ``x + mlp(norm2(x))``, exact GELU, LayerNorm eps 1e-6), a final
    LayerNorm and a linear ``head`` on the class token. 86,567,656 parameters at the defaults with
    1000 classes. The position embedding fixes the input size to ``img_size`` x ``img_size``.

    Inputs are normalised with timm's ``(0.5, 0.5, 0.5)`` mean and std by default (those of
    ``vit_base_patch16_224``).

    PyTorch naming (timm): ``cls_token``, ``pos_embed``, ``patch_embed.proj``,
    ``blocks.{i}.norm1``, ``blocks.{i}.attn.qkv`` (fused, rows ``[q; k; v]``, kept fused here),
    ``blocks.{i}.attn.proj``, ``blocks.{i}.norm2``, ``blocks.{i}.mlp.fc1/fc2``, ``norm``, ``head``.
    Marks: ``block{i}`` (see the module docstring).
    """

    num_classes: int = 1000
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    mean: Sequence[float] | None = TIMM_VIT_MEAN
    std: Sequence[float] | None = TIMM_VIT_STD

    def __post_init__(self):
        _check_num_classes(self.num_classes)
        for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"):
            _check_positive_int(name, getattr(self, name))
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")
        if not (isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio > 0
                and float(self.mlp_ratio * self.embed_dim).is_integer()):
            raise ValueError(f"mlp_ratio * embed_dim must be a positive integer, got mlp_ratio={self.mlp_ratio!r}")
        _check_normalization(self.mean, self.std)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _check_input(x, self.mean, train)
        if x.shape[1:3] != (self.img_size, self.img_size):
            raise ValueError(f"this ViT takes {self.img_size}x{self.img_size} images, got {x.shape[1]}x{x.shape[2]}")
        h = _normalize(x, self.mean, self.std)
        h = _PatchEmbed(self.embed_dim, self.patch_size, name="patch_embed")(h)
        n_tokens = (self.img_size // self.patch_size) ** 2 + 1
        init = nn.initializers.normal(0.02)
        cls = self.param("cls_token", init, (1, 1, self.embed_dim), jnp.float32)
        pos = self.param("pos_embed", init, (1, n_tokens, self.embed_dim), jnp.float32)
        h = jnp.concatenate([jnp.broadcast_to(cls.astype(h.dtype), (h.shape[0], 1, self.embed_dim)), h], axis=1)
        h = h + pos.astype(h.dtype)
        hidden = int(self.mlp_ratio * self.embed_dim)
        for i in range(self.depth):
            h = _Block(self.num_heads, hidden, name=f"blocks_{i}")(h)
            h = self.perturb(f"block{i}", h)
        h = _layer_norm("norm")(h)
        return nn.Dense(self.num_classes, name="head")(h[:, 0])


# ----------------------------------------------------------------------------------------------
# Registry factories
# ----------------------------------------------------------------------------------------------


def resnet20(num_classes: int = 10, **kwargs) -> CifarResNet:
    """ResNet-20 for CIFAR-10 (3 stages x 3 basic blocks, 16/32/64 channels, option-A shortcuts)."""
    return CifarResNet(num_classes=num_classes, blocks_per_stage=3, width=16, **kwargs)


def vgg16(num_classes: int = 10, **kwargs) -> VGG:
    """VGG-16 with BatchNorm for CIFAR-10 (512 -> ``num_classes`` classifier)."""
    return VGG(num_classes=num_classes, cfg=VGG16_CFG, **kwargs)


def wrn28_10(num_classes: int = 10, **kwargs) -> WideResNet:
    """WideResNet-28-10 for CIFAR-10, RobustBench "Standard" layout, raw [0, 1] inputs."""
    return WideResNet(num_classes=num_classes, depth=28, widen_factor=10, **kwargs)


def resnet50(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-50 for ImageNet, torchvision layout and normalisation."""
    return ResNet(num_classes=num_classes, layers=(3, 4, 6, 3), width=64, **kwargs)


def vit_b16(num_classes: int = 1000, **kwargs) -> VisionTransformer:
    """ViT-B/16 for 224x224 ImageNet images, timm layout and normalisation."""
    return VisionTransformer(num_classes=num_classes, img_size=224, patch_size=16, embed_dim=768, depth=12,
                             num_heads=12, mlp_ratio=4.0, **kwargs)
