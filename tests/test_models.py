"""Model registry, output shapes and the ``perturbations`` hidden-layer marks (shapes only, no training)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnd_jax.models import DEFAULT_MODEL, MODELS, feature_shapes, get_model, perturb_names

INPUT_SHAPE = {"digits_cnn": (8, 8, 1), "mnist_cnn": (28, 28, 1), "cifar10_cnn": (32, 32, 3)}
STANDARD = ("resnet20", "vgg16", "wrn28_10", "resnet50", "vit_b16")  # tests/test_nets.py, tests/test_weights.py
EXPECTED_NAMES = {
    "digits_cnn": ("conv1", "conv2", "dense1"),
    "mnist_cnn": ("conv1", "conv2", "dense1"),
    "cifar10_cnn": tuple(f"conv{i}" for i in range(1, 7)),
}
BATCH = 2


@functools.cache
def _setup(name, num_classes=10):
    """(model, params, x) for a registered model; initialised once per test module."""
    model = get_model(name, num_classes=num_classes)
    x = jax.random.uniform(jax.random.key(1), (BATCH, *INPUT_SHAPE[name]))
    params = jax.jit(model.init)(jax.random.key(0), x[:1])["params"]
    return model, params, x


def _zeros(model, shape, batch=BATCH):
    return {n: jnp.zeros((batch, *s)) for n, s in feature_shapes(model, shape).items()}


def test_every_registered_model_is_covered():
    assert set(INPUT_SHAPE) | set(STANDARD) == set(MODELS)
    assert set(DEFAULT_MODEL.values()) <= set(MODELS)
    assert DEFAULT_MODEL["digits"] == "digits_cnn"


@pytest.mark.parametrize("name", sorted(INPUT_SHAPE))
def test_logits_shape(name):
    model, params, x = _setup(name)
    logits = model.apply({"params": params}, x)
    assert logits.shape == (BATCH, 10) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    # No state besides params (no BatchNorm): the only other collection holds the marks.
    variables = jax.eval_shape(functools.partial(model.init, jax.random.key(0)), x[:1])
    assert set(variables) == {"params", "perturbations"}


def test_num_classes():
    model, params, x = _setup("digits_cnn", num_classes=7)
    assert model.apply({"params": params}, x).shape == (BATCH, 7)


@pytest.mark.parametrize("name", sorted(INPUT_SHAPE))
def test_perturb_names_forward_order(name):
    model = get_model(name)
    names = perturb_names(model, INPUT_SHAPE[name])
    assert names == EXPECTED_NAMES[name]
    shapes = feature_shapes(model, INPUT_SHAPE[name])
    assert tuple(shapes) == names
    variables = jax.eval_shape(functools.partial(model.init, jax.random.key(0)), jnp.zeros((1, *INPUT_SHAPE[name])))
    assert set(variables["perturbations"]) == set(names)
    for n in names:
        assert variables["perturbations"][n].shape == (1, *shapes[n])


def test_digits_feature_shapes():
    assert feature_shapes(get_model("digits_cnn"), (8, 8, 1)) == {
        "conv1": (4, 4, 16),
        "conv2": (2, 2, 32),
        "dense1": (64,),
    }


def test_perturb_names_uses_forward_not_alphabetical_order():
    class Reversed(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = self.perturb("zz", nn.relu(nn.Dense(3)(x.reshape(x.shape[0], -1))))
            h = self.perturb("mm", nn.relu(nn.Dense(4)(h)))
            h = self.perturb("aa", nn.relu(nn.Dense(5)(h)))
            return nn.Dense(2)(h)

    model = Reversed()
    assert perturb_names(model, (2, 2, 1)) == ("zz", "mm", "aa")
    assert feature_shapes(model, (2, 2, 1)) == {"zz": (3,), "mm": (4,), "aa": (5,)}


@pytest.mark.parametrize("name", sorted(INPUT_SHAPE))
def test_zero_perturbation_is_identity_and_nonzero_changes_logits(name):
    model, params, x = _setup(name)
    zeros = _zeros(model, INPUT_SHAPE[name])
    # Op by op, adding exact zeros leaves every intermediate bit-identical.
    np.testing.assert_array_equal(
        model.apply({"params": params, "perturbations": zeros}, x), model.apply({"params": params}, x)
    )
    apply = jax.jit(lambda p, d, x: model.apply({"params": p, "perturbations": d}, x))
    plain = apply(params, zeros, x)
    for layer in zeros:
        bumped = dict(zeros, **{layer: jnp.ones_like(zeros[layer])})
        out = apply(params, bumped, x)
        assert not np.allclose(out, plain), f"perturbing {layer} left the logits unchanged"


def test_per_example_perturbation_broadcasts_over_batch():
    model, params, x = _setup("digits_cnn")
    shapes = feature_shapes(model, INPUT_SHAPE["digits_cnn"])
    shared = {n: jnp.full(s, 0.3) for n, s in shapes.items()}
    batched = {n: jnp.full((BATCH, *s), 0.3) for n, s in shapes.items()}
    np.testing.assert_array_equal(
        model.apply({"params": params, "perturbations": shared}, x),
        model.apply({"params": params, "perturbations": batched}, x),
    )


def test_grad_wrt_perturbations_is_grad_wrt_hidden_activations():
    model, params, x = _setup("digits_cnn")
    zeros = _zeros(model, INPUT_SHAPE["digits_cnn"])

    def logit0(d):
        return model.apply({"params": params, "perturbations": d}, x)[:, 0].sum()

    grads = jax.grad(logit0)(zeros)
    assert set(grads) == set(zeros)
    for n in zeros:
        assert grads[n].shape == zeros[n].shape
    # The last hidden layer feeds the logits linearly: its gradient is the logit-0 weight row.
    w = params["Dense_1"]["kernel"][:, 0]
    np.testing.assert_allclose(grads["dense1"], jnp.broadcast_to(w, (BATCH, w.shape[0])), rtol=1e-6)
    assert float(jnp.abs(grads["conv1"]).sum()) > 0


def test_dropout_only_in_training_mode():
    model, params, x = _setup("mnist_cnn")
    plain = model.apply({"params": params}, x)
    np.testing.assert_array_equal(model.apply({"params": params}, x, train=False), plain)
    dropped = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(3)})
    assert dropped.shape == plain.shape and not np.allclose(dropped, plain)


def test_unknown_model_raises_listing_valid_names():
    with pytest.raises(ValueError, match="digits_cnn"):
        get_model("resnet9000")
    with pytest.raises(ValueError):
        get_model("digits_cnn", num_classes=1)


def test_perturb_names_rejects_batched_input_shape():
    with pytest.raises(ValueError):
        perturb_names(get_model("digits_cnn"), (1, 8, 8, 1))
