"""Training (accuracy, determinism, training-time noise), evaluation and the checkpoint cache, on digits."""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from rnd_jax import data
from rnd_jax.train import (
    TrainConfig,
    accuracy,
    cache_key,
    cache_path,
    default_cache_dir,
    load_or_train,
    train,
)

ONE_EPOCH = TrainConfig(epochs=1)


def _assert_same_params(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _differs(a, b):
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.fixture(scope="module")
def trained(digits_model, cache_dir):
    """digits_cnn trained with the default config: the session's model and its checkpoint cache (trained
    there once, under a lock, by whichever test needed it first)."""
    model, params = digits_model
    return model, params, cache_dir


@pytest.fixture(scope="module")
def digits_test_split():
    return data.load("digits", "test")


def test_default_config_reaches_95_percent(trained, digits_test_split):
    model, params, cache = trained
    acc = accuracy(model, params, *digits_test_split)
    assert acc >= 0.95
    meta = json.loads((cache_path("digits_cnn", "digits", TrainConfig(), cache) / "meta.json").read_text())
    assert meta["test_accuracy"] == acc
    assert meta["config"] == dataclasses.asdict(TrainConfig())
    assert meta["model"] == "digits_cnn" and meta["num_classes"] == 10 and meta["input_shape"] == [8, 8, 1]


def test_second_call_loads_identical_params_without_training(trained, capsys):
    model, params, cache = trained
    capsys.readouterr()
    model2, params2 = load_or_train("digits_cnn", "digits", TrainConfig(), cache_dir=cache, progress=False)
    err = capsys.readouterr().err
    entry = cache_path("digits_cnn", "digits", TrainConfig(), cache)
    assert "loaded from cache" in err and str(entry) in err and "trained" not in err
    assert model2 == model
    _assert_same_params(params, params2)
    # One complete entry, no leftover temporary directory of it.
    assert {p.name for p in entry.iterdir()} == {"meta.json", "params"}
    assert not list(Path(cache).glob(f".tmp-{entry.name}-*"))


def test_cache_keys():
    base = TrainConfig()
    assert len(cache_key("digits_cnn", "digits", base)) == 64
    assert cache_key("digits_cnn", "digits", base) == cache_key("digits_cnn", "digits", TrainConfig())
    # Equal configs (int vs float spelling) share a key; any changed field changes it.
    assert cache_key("digits_cnn", "digits", TrainConfig(learning_rate=1)) == cache_key(
        "digits_cnn", "digits", TrainConfig(learning_rate=1.0)
    )
    others = [dataclasses.replace(base, **{f.name: v}) for f, v in zip(
        dataclasses.fields(TrainConfig), (41, 32, 1e-3, 0.0, 1, 0.1, False, 0.1)
    )]
    keys = {cache_key("digits_cnn", "digits", c) for c in [base, *others]}
    assert len(keys) == len(others) + 1
    assert cache_key("mnist_cnn", "digits", base) != cache_key("digits_cnn", "digits", base)
    assert cache_path("digits_cnn", "digits", base, "/c") != cache_path("digits_cnn", "digits", others[0], "/c")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RND_JAX_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("RND_JAX_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "rnd_jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "rnd_jax"


def test_training_is_deterministic():
    a = train("digits_cnn", "digits", ONE_EPOCH, progress=False)
    b = train("digits_cnn", "digits", ONE_EPOCH, progress=False)
    _assert_same_params(a, b)
    c = train("digits_cnn", "digits", dataclasses.replace(ONE_EPOCH, seed=1), progress=False)
    assert _differs(a, c)


def test_training_noise_options_take_effect():
    clean = train("digits_cnn", "digits", ONE_EPOCH, progress=False)
    noisy = train(
        "digits_cnn", "digits", dataclasses.replace(ONE_EPOCH, augment_noise=0.1, logit_noise=0.5), progress=False
    )
    assert _differs(clean, noisy)
    assert all(bool(np.all(np.isfinite(x))) for x in jax.tree_util.tree_leaves(noisy))


def test_accuracy_chunking_matches(trained, digits_test_split):
    model, params, _ = trained
    images, labels = digits_test_split
    assert accuracy(model, params, images, labels, batch_size=7) == accuracy(model, params, images, labels)
    assert accuracy(model, params, images[:5], labels[:5]) in {k / 5 for k in range(6)}
    with pytest.raises(ValueError):
        accuracy(model, params, images[:0], labels[:0])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"learning_rate": -1e-3},
        {"learning_rate": 0.0},
        {"learning_rate": float("nan")},
        {"epochs": 0},
        {"epochs": 2.5},
        {"epochs": True},
        {"batch_size": 0},
        {"weight_decay": -1.0},
        {"seed": -1},
        {"augment_noise": float("nan")},
        {"augment_noise": -0.1},
        {"logit_noise": float("inf")},
        {"logit_noise": float("nan")},
        {"augment_clip": "yes"},
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        TrainConfig(**kwargs)


def test_config_is_frozen_and_hashable():
    cfg = TrainConfig()
    assert hash(cfg) == hash(TrainConfig()) and cfg == TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3  # type: ignore[misc]
    assert isinstance(TrainConfig(learning_rate=1).learning_rate, float)


def test_batch_larger_than_dataset_raises():
    with pytest.raises(ValueError):
        train("digits_cnn", "digits", TrainConfig(epochs=1, batch_size=100_000), progress=False)
