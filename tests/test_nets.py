"""Standard architectures (rnd_jax.nets): perturbation marks, feature noise, normalisation fields, validation.

Tiny variants of the same code keep this fast; numerical agreement with PyTorch is in test_weights.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnd_jax import defenses, nets
from rnd_jax.models import MODELS, feature_shapes, get_model, perturb_names

BATCH = 2

# name -> (tiny model, per-example input shape, expected marks in forward order with shapes)
TINY = {
    "resnet8": (
        nets.CifarResNet(blocks_per_stage=1, width=4),
        (16, 16, 3),
        {"block1_0": (16, 16, 4), "block2_0": (8, 8, 8), "block3_0": (4, 4, 16)},
    ),
    "vgg": (
        nets.VGG(cfg=(8, "M", 16, 16, "M")),
        (8, 8, 3),
        {"conv1": (4, 4, 8), "conv2": (4, 4, 16), "conv3": (2, 2, 16)},
    ),
    "wrn10_1": (
        nets.WideResNet(depth=10, widen_factor=1),
        (8, 8, 3),
        {"block1_0": (8, 8, 16), "block2_0": (4, 4, 32), "block3_0": (2, 2, 64)},
    ),
    "resnet_tiny": (
        nets.ResNet(layers=(2, 1, 1, 1), width=4, num_classes=10),
        (16, 16, 3),
        {"block1_0": (4, 4, 16), "block1_1": (4, 4, 16), "block2_0": (2, 2, 32), "block3_0": (1, 1, 64),
         "block4_0": (1, 1, 128)},
    ),
    "vit_tiny": (
        nets.VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=10),
        (16, 16, 3),
        {"block0": (5, 16), "block1": (5, 16)},
    ),
}


def _random_params(model, shape, seed):
    """Random params of the right shapes, drawn with NumPy from ``eval_shape`` (no init compile).

    Kernels ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), BN/LN scales ~ U(0.5, 1.5), BN running means
    ~ N(0, 0.1^2) and variances ~ U(0.5, 2) (so that BN is not the identity), tokens ~ N(0, 0.02^2).
    """
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(functools.partial(model.init, jax.random.key(0)), jnp.zeros((1, *shape)))["params"]

    def draw(path, leaf):
        last = str(getattr(path[-1], "key", path[-1]))
        if last == "kernel":
            a = rng.normal(0.0, 1.0 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)
        elif last == "scale":
            a = rng.uniform(0.5, 1.5, leaf.shape)
        elif last == "var":
            a = rng.uniform(0.5, 2.0, leaf.shape)
        elif last in ("bias", "mean"):
            a = rng.normal(0.0, 0.1, leaf.shape)
        else:
            a = rng.normal(0.0, 0.02, leaf.shape)
        return jnp.asarray(a, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


@functools.cache
def _setup(name):
    model, shape, _ = TINY[name]
    x = jnp.asarray(np.random.default_rng(1).uniform(0.0, 1.0, (BATCH, *shape)), jnp.float32)
    return model, _random_params(model, shape, seed=sorted(TINY).index(name)), x


@pytest.mark.parametrize("name", sorted(TINY))
def test_marks_found_in_forward_order(name):
    model, shape, expected = TINY[name]
    assert perturb_names(model, shape) == tuple(expected)
    assert feature_shapes(model, shape) == expected
    variables = jax.eval_shape(functools.partial(model.init, jax.random.key(0)), jnp.zeros((1, *shape)))
    # Frozen BN statistics live in params: no batch_stats collection.
    assert set(variables) == {"params", "perturbations"}


@pytest.mark.parametrize("name", sorted(TINY))
def test_feature_perturbations_change_logits(name):
    model, params, x = _setup(name)
    shapes = feature_shapes(model, x.shape[1:])
    zeros = {n: jnp.zeros((BATCH, *s)) for n, s in shapes.items()}
    apply = jax.jit(lambda p, d, x: model.apply({"params": p, "perturbations": d}, x))
    plain = np.asarray(jax.jit(model.apply)({"params": params}, x))
    assert np.all(np.isfinite(plain)) and plain.shape == (BATCH, model.num_classes)
    np.testing.assert_allclose(apply(params, zeros, x), plain, rtol=0, atol=1e-6)
    rng = np.random.default_rng(0)
    for layer in shapes:
        # Random, not constant: a constant shift of a ViT token is removed by the next LayerNorm.
        bump = rng.normal(0.0, 1.0, zeros[layer].shape).astype(np.float32)
        bumped = dict(zeros, **{layer: bump})
        assert not np.allclose(apply(params, bumped, x), plain, atol=1e-4), f"perturbing {layer} did nothing"


def test_feature_noise_defense_runs_on_an_imported_architecture():
    model, params, x = _setup("wrn10_1")
    clean = defenses.model_scorer(model, params)
    noisy = defenses.feature_noise(model, params, 0.5, x.shape[1:])  # default: the last mark, block3_0
    keys = jax.random.split(jax.random.key(4), BATCH)
    p_clean, p_noisy = np.asarray(clean(x, keys)), np.asarray(noisy(x, keys))
    np.testing.assert_allclose(p_noisy.sum(axis=1), 1.0, atol=1e-5)
    assert not np.allclose(p_noisy, p_clean, atol=1e-4)
    np.testing.assert_array_equal(noisy(x, keys), p_noisy)  # same keys, same noise
    assert not np.allclose(noisy(x, jax.random.split(jax.random.key(5), BATCH)), p_noisy, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet8", "vgg"])
def test_normalisation_fields_equal_normalising_outside(name):
    model, params, x = _setup(name)
    mean, std = (0.2, 0.5, 0.7), (0.3, 0.25, 0.4)
    inside = model.clone(mean=mean, std=std).apply({"params": params}, x)
    outside = model.clone(mean=None, std=None).apply(
        {"params": params}, (x - jnp.asarray(mean)) / jnp.asarray(std))
    np.testing.assert_allclose(inside, outside, rtol=1e-5, atol=1e-5)
    # ... and the field really is used: another mean gives other logits.
    other = model.clone(mean=(0.5, 0.5, 0.5), std=std).apply({"params": params}, x)
    assert not np.allclose(other, inside, atol=1e-4)


def test_default_normalisation_per_weights_source():
    assert (nets.resnet50().mean, nets.resnet50().std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert (nets.vit_b16().mean, nets.vit_b16().std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert (nets.wrn28_10().mean, nets.wrn28_10().std) == (None, None)
    assert nets.resnet20().mean == nets.IMAGENET_MEAN
    assert nets.vgg16().std == nets.CIFAR10_STD


def test_frozen_batchnorm_is_pytorch_eval_batchnorm():
    c = 3
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, c))
    p = {"scale": jnp.array([1.0, 2.0, 0.5]), "bias": jnp.array([0.0, -1.0, 0.3]),
         "mean": jnp.array([0.1, -0.2, 0.3]), "var": jnp.array([1.0, 0.25, 4.0])}
    got = nets.FrozenBatchNorm().apply({"params": p}, x)
    want = (np.asarray(x) - np.asarray(p["mean"])) / np.sqrt(np.asarray(p["var"]) + 1e-5) * np.asarray(p["scale"]) \
        + np.asarray(p["bias"])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_count_params_leaves_out_running_statistics():
    model, params, _ = _setup("vgg")
    every = sum(a.size for a in jax.tree.leaves(params))
    stats = sum(2 * c for c in (8, 16, 16))  # mean and var of each BN
    assert nets.count_params(params) == every - stats


@pytest.mark.parametrize("name,classes", [("resnet20", 10), ("vgg16", 10), ("wrn28_10", 10),
                                          ("resnet50", 1000), ("vit_b16", 1000)])
def test_registered_and_built_with_num_classes(name, classes):
    assert MODELS[name]().num_classes == classes  # factory defaults: CIFAR-10 / ImageNet
    model = get_model(name, num_classes=7)
    assert model.num_classes == 7


def test_bad_fields_and_inputs_raise():
    with pytest.raises(ValueError, match="both"):
        nets.ResNet(mean=(0.5, 0.5, 0.5), std=None)
    with pytest.raises(ValueError, match="std"):
        nets.CifarResNet(std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="same length"):
        nets.VGG(mean=(0.5, 0.5), std=(0.2, 0.2, 0.2))
    with pytest.raises(ValueError, match="6n \\+ 4"):
        nets.WideResNet(depth=27)
    with pytest.raises(ValueError, match="'M'"):
        nets.VGG(cfg=(8, "X"))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        nets.VisionTransformer(img_size=30, patch_size=8)
    with pytest.raises(ValueError, match="num_heads"):
        nets.VisionTransformer(embed_dim=10, num_heads=3)
    with pytest.raises(ValueError, match="num_classes"):
        nets.resnet20(num_classes=1)
    model, params, x = _setup("vit_tiny")
    with pytest.raises(ValueError, match="16x16"):
        model.apply({"params": params}, jnp.zeros((1, 24, 24, 3)))
    with pytest.raises(ValueError, match="channels"):
        _setup("resnet8")[0].apply({"params": _setup("resnet8")[1]}, jnp.zeros((1, 16, 16, 1)))
    with pytest.raises(ValueError, match="inference-only"):
        model.apply({"params": params}, x, train=True)
    with pytest.raises(ValueError, match=r"f32\[B, H, W, C\]"):
        model.apply({"params": params}, x[0])
