"""Image classifiers (Flax linen) with marked hidden layers for feature-space defenses.

Every model maps ``x: f32[B, H, W, C]`` (pixels in ``[0, 1]``) to **logits** ``f32[B, K]``::

    model = get_model("digits_cnn")
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    logits = model.apply({"params": params}, x)

Hidden-layer marks
------------------
The output of every hidden block is passed through :meth:`flax.linen.Module.perturb`
(collection ``"perturbations"``) under a stable name (``"conv1"``, ``"conv2"``, ...,
``"dense1"``).  A mark is the *block output*: post-ReLU, and after the block's max-pool
when it has one (max-pooling commutes with ReLU, so this is still a post-activation
value).  Logits are not marked.  Consequences:

* ``apply({"params": p}, x)`` ignores the marks entirely (no extra cost).
* ``apply({"params": p, "perturbations": d}, x)`` adds ``d[name]`` to the marked tensor
  before the next layer sees it -- this is how feature-noise defenses inject noise.
  ``d`` must hold *every* marked name; each entry broadcasts against the activation
  ``f32[B, *feature_shapes(...)[name]]`` (so a per-example ``f32[*shape]`` entry is
  shared across the batch, a ``f32[B, *shape]`` entry is per-example).
* ``jax.grad`` of a loss with respect to ``d`` (zeros) is the gradient with respect to
  the hidden activations.

Models
------
``digits_cnn``
    Small CNN for 8x8 digits, sized for millions of queries on a CPU.
``mnist_cnn``
    MNIST / Fashion-MNIST model of Aithal & Li (2022).
``cifar10_cnn``
    7-layer all-convolutional CIFAR-10 model of Aithal & Li (2022).

Standard architectures (defined in :mod:`rnd_jax.nets`, for PyTorch weights imported with
:mod:`rnd_jax.weights`; inference only, input normalisation inside the model, frozen BatchNorm
statistics stored in ``params``; marks named ``block{s}_{i}`` / ``conv{i}`` / ``block{i}``):

``resnet20``
    ResNet-20 for CIFAR-10 (He et al. 2016, option-A shortcuts), 269,722 parameters.
``vgg16``
    VGG-16 with BatchNorm, CIFAR-10 layout (512 -> K classifier), 14,728,266 parameters.
``wrn28_10``
    WideResNet-28-10, RobustBench "Standard" layout, raw [0, 1] inputs, 36,479,194 parameters.
``resnet50``
    ResNet-50 for 224x224 ImageNet images (torchvision layout), 25,557,032 parameters at K=1000.
``vit_b16``
    ViT-B/16 for 224x224 ImageNet images (timm layout), 86,567,656 parameters at K=1000.

The factories' default ``num_classes`` is 10 for the CIFAR models and 1000 for the ImageNet ones;
:func:`get_model` passes its own ``num_classes`` (default 10), so ask for 1000 explicitly.

Aithal & Li (2022): M. B. Aithal and X. Li, "Boundary Defense Against Black-box
Adversarial Attacks", arXiv:2201.13444.  Where the paper leaves a detail open (padding,
pooling placement) the choice made here is stated in the model's docstring.

The three small models use no BatchNorm and the standard architectures keep their frozen
BatchNorm statistics inside ``params``, so ``params`` is the only variable collection needed at
inference and ``apply`` is a pure function of ``(params, x)``.  Dropout (``mnist_cnn``)
is active only for ``apply(..., train=True, rngs={"dropout": key})``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from rnd_jax import nets

__all__ = [
    "DEFAULT_MODEL",
    "INPUT_SHAPES",
    "MODELS",
    "Cifar10CNN",
    "DigitsCNN",
    "MnistCNN",
    "check_fits",
    "feature_shapes",
    "get_model",
    "models_for",
    "perturb_names",
]

PERTURBATIONS = "perturbations"


def _max_pool(h: jax.Array) -> jax.Array:
    return nn.max_pool(h, window_shape=(2, 2), strides=(2, 2), padding="VALID")


class DigitsCNN(nn.Module):
    """Small CNN for 8x8x1 inputs (scikit-learn digits).

    ``conv3x3(16)+ReLU -> maxpool2 -> conv3x3(32)+ReLU -> maxpool2 -> flatten
    -> dense(64)+ReLU -> dense(num_classes)``, SAME padding, stride 1.

    Shapes for an 8x8x1 input: ``conv1: 4x4x16``, ``conv2: 2x2x32``, ``dense1: 64``
    (marked after pooling).  13,706 parameters; 91,776 multiply-adds (~184k FLOPs)
    per image.

    Marks: ``conv1``, ``conv2``, ``dense1``.
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout; accepted so every model has the same call signature
        h = _max_pool(nn.relu(nn.Conv(16, (3, 3), padding="SAME", name="Conv_0")(x)))
        h = self.perturb("conv1", h)
        h = _max_pool(nn.relu(nn.Conv(32, (3, 3), padding="SAME", name="Conv_1")(h)))
        h = self.perturb("conv2", h)
        h = h.reshape(h.shape[0], -1)
        h = nn.relu(nn.Dense(64, name="Dense_0")(h))
        h = self.perturb("dense1", h)
        return nn.Dense(self.num_classes, name="Dense_1")(h)


class MnistCNN(nn.Module):
    """MNIST / Fashion-MNIST model of Aithal & Li (2022).

    ``conv3x3(32)+ReLU -> maxpool2 -> conv3x3(64)+ReLU -> maxpool2 -> flatten
    -> dense(1024)+ReLU -> dropout(0.2) -> dense(num_classes)``.

    The paper specifies the layer widths (conv 32, conv 64, dense 1024, dropout 0.2,
    dense 10).  Choices made here: 3x3 kernels, SAME padding, stride 1, and a 2x2
    max-pool after *each* conv (the classic "deep MNIST" layout), which keeps the
    flattened feature at 7x7x64 = 3136 and the model at ~3.24M parameters and
    ~7.1M multiply-adds per 28x28 image.  Dropout sits after the ``dense1`` mark, so
    feature perturbations and gradients at ``dense1`` are those of the pre-dropout
    activation (identical at inference, where dropout is the identity).

    Marks: ``conv1`` (14x14x32), ``conv2`` (7x7x64), ``dense1`` (1024).
    """

    num_classes: int = 10
    dropout_rate: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        h = _max_pool(nn.relu(nn.Conv(32, (3, 3), padding="SAME", name="Conv_0")(x)))
        h = self.perturb("conv1", h)
        h = _max_pool(nn.relu(nn.Conv(64, (3, 3), padding="SAME", name="Conv_1")(h)))
        h = self.perturb("conv2", h)
        h = h.reshape(h.shape[0], -1)
        h = nn.relu(nn.Dense(1024, name="Dense_0")(h))
        h = self.perturb("dense1", h)
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
        return nn.Dense(self.num_classes, name="Dense_1")(h)


class Cifar10CNN(nn.Module):
    """7-layer all-convolutional CIFAR-10 model of Aithal & Li (2022).

    Seven conv layers with widths 64, 128, 128, 256, 256, 512, ``num_classes``; the last
    is a 1x1 conv producing per-location class scores, global-average-pooled into the
    logits (no dense layer).

    The paper specifies the widths and the conv-only / global-pooling structure.
    Choices made here: 3x3 kernels, SAME padding and stride 1 for conv1..conv6, ReLU
    after each of them, and 2x2 max-pools after conv2, conv4 and conv6
    (32 -> 16 -> 8 -> 4), i.e. three stages of two convs; conv7 is 1x1, linear (it
    produces logits).  ~2.29M parameters, ~304M multiply-adds per 32x32x3 image.

    Marks: ``conv1`` (32x32x64), ``conv2`` (16x16x128), ``conv3`` (16x16x128),
    ``conv4`` (8x8x256), ``conv5`` (8x8x256), ``conv6`` (4x4x512) -- block outputs,
    after the pool where a block has one.
    """

    num_classes: int = 10
    widths: Sequence[int] = (64, 128, 128, 256, 256, 512)
    pool_after: Sequence[int] = (2, 4, 6)  # 1-based conv indices followed by a 2x2 max-pool

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout; accepted so every model has the same call signature
        h = x
        for i, width in enumerate(self.widths, start=1):
            h = nn.relu(nn.Conv(width, (3, 3), padding="SAME", name=f"Conv_{i - 1}")(h))
            if i in self.pool_after:
                h = _max_pool(h)
            h = self.perturb(f"conv{i}", h)
        h = nn.Conv(self.num_classes, (1, 1), name=f"Conv_{len(self.widths)}")(h)
        return jnp.mean(h, axis=(1, 2))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "mnist_cnn": MnistCNN,
    "cifar10_cnn": Cifar10CNN,
    "resnet20": nets.resnet20,
    "vgg16": nets.vgg16,
    "wrn28_10": nets.wrn28_10,
    "resnet50": nets.resnet50,
    "vit_b16": nets.vit_b16,
}
"""Model name -> factory called as ``factory(num_classes=K)``."""

DEFAULT_MODEL: dict[str, str] = {
    "digits": "digits_cnn",
    "mnist": "mnist_cnn",
    "fashion_mnist": "mnist_cnn",
    "cifar10": "cifar10_cnn",
    "imagenet": "resnet50",  # inference only: its weights are imported (rnd_jax.weights)
}
"""Dataset name -> name of the model in :data:`MODELS` used for it by default."""

INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "digits_cnn": (8, 8, 1),
    "mnist_cnn": (28, 28, 1),
    "cifar10_cnn": (32, 32, 3),
    "resnet20": (32, 32, 3),
    "vgg16": (32, 32, 3),
    "wrn28_10": (32, 32, 3),
    "resnet50": (224, 224, 3),
    "vit_b16": (224, 224, 3),
}
"""Model name -> the per-example input shape ``(H, W, C)`` it is built for.

Several models would run on other sizes (the convolutional ones pool globally), but they are sized
for these inputs: ``cifar10_cnn`` trained on 8x8 digits spends ~300M multiply-adds per image on a
problem ``digits_cnn`` solves with 0.1M. The class count is not declared: every factory takes it
(``num_classes``), and experiments pass the dataset's."""


def models_for(image_shape: Sequence[int]) -> list[str]:
    """Registered models built for inputs of ``image_shape`` ``(H, W, C)``, sorted."""
    shape = tuple(int(d) for d in image_shape)
    return sorted(n for n, s in INPUT_SHAPES.items() if s == shape)


def check_fits(name: str, image_shape: Sequence[int], num_classes: int, dataset: str = "the dataset") -> None:
    """``ValueError`` unless the registered model ``name`` is built for ``image_shape`` inputs and
    ``num_classes`` classes (an int >= 2); the message lists the models that fit. Shapes only: nothing is
    built or traced."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    shape = tuple(int(d) for d in image_shape)
    expected = INPUT_SHAPES[name]
    if shape != expected:
        fit = models_for(shape)
        raise ValueError(f"model {name!r} takes {'x'.join(map(str, expected))} images, but {dataset} has "
                         f"{'x'.join(map(str, shape))}; models that fit: {fit or 'none registered'}")


def get_model(name: str, num_classes: int = 10) -> nn.Module:
    """Instantiate the registered model ``name`` with ``num_classes`` output logits.

    Raises ``ValueError`` (listing the valid names) for an unknown ``name`` and for
    ``num_classes < 2``.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    return MODELS[name](num_classes=num_classes)


def _abstract_variables(model: nn.Module, input_shape: Sequence[int]):
    """Variables of ``model`` for a batch of one ``input_shape`` image, shapes only."""
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be per-example (H, W, C), got {input_shape}")
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    return jax.eval_shape(partial(model.init, jax.random.key(0)), x), x


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def perturb_names(model: nn.Module, input_shape: Sequence[int]) -> tuple[str, ...]:
    """Names of the layers ``model`` marks with ``perturb``, in forward order.

    ``input_shape`` is the per-example shape ``(H, W, C)``.  Nothing is computed on
    real data: the ``perturbations`` collection is obtained with ``jax.eval_shape`` on
    ``init``; its entries come back sorted by key (as after any pytree round-trip), so
    they are put in forward order by the first equation of the traced ``apply``
    (``jax.make_jaxpr``) that consumes each one.  Marks inside submodules are named
    with their scope path joined by ``/``.  Works for any Flax module, not only those in
    :data:`MODELS`.
    """
    variables, x = _abstract_variables(model, input_shape)
    perts = variables.get(PERTURBATIONS, {})
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(perts)
    if not leaves_with_path:
        return ()
    names = [_path_name(p) for p, _ in leaves_with_path]
    leaves = [leaf for _, leaf in leaves_with_path]

    def apply(params, pert_leaves, inputs):
        tree = jax.tree_util.tree_unflatten(treedef, pert_leaves)
        return model.apply({"params": params, PERTURBATIONS: tree}, inputs)

    closed = jax.make_jaxpr(apply)(variables["params"], leaves, x)
    n_params = len(jax.tree_util.tree_leaves(variables["params"]))
    pert_vars = closed.jaxpr.invars[n_params : n_params + len(leaves)]
    # Keyed by id(): equation inputs may be Literals, which are unhashable.
    first_use = {id(v): len(closed.jaxpr.eqns) for v in pert_vars}
    for i, eqn in enumerate(reversed(closed.jaxpr.eqns)):
        for v in eqn.invars:
            if id(v) in first_use:
                first_use[id(v)] = len(closed.jaxpr.eqns) - 1 - i
    order = sorted(range(len(names)), key=lambda j: (first_use[id(pert_vars[j])], j))
    return tuple(names[j] for j in order)


def feature_shapes(model: nn.Module, input_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Per-example shape of every marked activation, keyed by name, in forward order.

    ``input_shape`` is ``(H, W, C)``; shapes exclude the batch dimension.  Shapes only
    (``jax.eval_shape``), no FLOPs spent.
    """
    variables, _ = _abstract_variables(model, input_shape)
    flat = {
        _path_name(p): tuple(leaf.shape[1:])
        for p, leaf in jax.tree_util.tree_flatten_with_path(variables.get(PERTURBATIONS, {}))[0]
    }
    return {name: flat[name] for name in perturb_names(model, input_shape)}


def input_and_feature_grad_norms(model: nn.Module, params, x: jax.Array, labels: jax.Array):
    """Per-example L2 norms of the gradient of the clean cross-entropy at ``x`` and at each mark.

    Returns ``(g_x f32[B], {name: g_h f32[B]})`` with ``g_x = ||grad_x L||`` and
    ``g_h = ||grad_{h(x)} L||`` for every ``perturb``-marked layer, ``L = -log softmax(f(x))_y``
    summed over the batch (so each example's gradient is its own). These are the norms in the
    randomized feature defense's Theorem 1 ratio ``2 nu ||grad_h||^2 / (mu ||grad_x||^2)``.
    """
    shapes = feature_shapes(model, x.shape[1:])
    zeros = {n: jnp.zeros((x.shape[0],) + s, x.dtype) for n, s in shapes.items()}

    def loss(xx, pert):
        logits = model.apply({"params": params, PERTURBATIONS: pert}, xx)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.sum(jnp.take_along_axis(logp, labels[:, None], axis=-1))

    gx, gh = jax.grad(loss, argnums=(0, 1))(x, zeros)
    norm = lambda g: jnp.sqrt(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1))
    return norm(gx), {n: norm(gh[n]) for n in shapes}
