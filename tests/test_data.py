"""Tests for rnd_jax.data: the bundled digits split and real tfds array_record round trips."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from rnd_jax import data


# --------------------------------------------------------------------------- info / validation


def test_info_static():
    assert data.DATASETS == ("digits", "mnist", "fashion_mnist", "cifar10")
    assert data.info("digits") == data.DatasetInfo("digits", (8, 8, 1), 10)
    assert data.info("mnist").image_shape == (28, 28, 1)
    assert data.info("fashion_mnist").image_shape == (28, 28, 1)
    assert data.info("cifar10").image_shape == (32, 32, 3)
    assert all(data.info(n).num_classes == 10 for n in data.DATASETS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.info("digits").num_classes = 3


@pytest.mark.parametrize("call", [lambda: data.load("imagenet"), lambda: data.info("svhn")])
def test_unknown_name_raises(call):
    with pytest.raises(ValueError, match="cifar10"):
        call()


def test_unknown_split_raises():
    with pytest.raises(ValueError, match="train"):
        data.load("digits", "validation")
    with pytest.raises(ValueError, match="test"):
        data.load("mnist", "val", data_dir="/nonexistent")  # split checked before any disk access


# --------------------------------------------------------------------------- digits


def test_digits_shapes_range_split():
    x_tr, y_tr = data.load("digits", "train")
    x_te, y_te = data.load("digits", "test")
    assert x_tr.shape == (1437, 8, 8, 1) and x_te.shape == (360, 8, 8, 1)
    assert len(y_tr) + len(y_te) == 1797
    assert x_tr.dtype == np.float32 and y_tr.dtype == np.int32 and y_te.dtype == np.int32
    for x in (x_tr, x_te):
        assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() == 1.0
    assert set(y_tr.tolist()) == set(range(10)) == set(y_te.tolist())
    # Stratified: per-class test share is ~20%.
    frac = np.bincount(y_te, minlength=10) / (np.bincount(y_te, minlength=10) + np.bincount(y_tr))
    assert np.all(np.abs(frac - 0.2) < 0.02)
    # Disjoint, and together exactly the full dataset (its 1797 images are pairwise distinct).
    from sklearn.datasets import load_digits

    bunch = load_digits()
    rows = (bunch.images.astype(np.float32) / 16.0).reshape(1797, -1)
    label_of = {bytes(r): int(t) for r, t in zip(rows, bunch.target)}
    tr = {bytes(r) for r in x_tr.reshape(len(x_tr), -1)}
    te = {bytes(r) for r in x_te.reshape(len(x_te), -1)}
    assert len(tr) == len(x_tr) and len(te) == len(x_te)
    assert not tr & te and tr | te == set(label_of)
    # Labels stay attached to their images.
    for x, y in ((x_tr, y_tr), (x_te, y_te)):
        assert [label_of[bytes(r)] for r in x.reshape(len(x), -1)] == y.tolist()


def test_digits_deterministic_and_cache_read_only():
    x1, y1 = data.load("digits", "train")
    data.clear_cache()
    x2, y2 = data.load("digits", "train")
    assert x1 is not x2  # really recomputed
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert data.load("digits", "train")[0] is x2  # cached
    for a in (x2, y2):
        assert not a.flags.writeable
        with pytest.raises(ValueError):
            a[0] = 0
    assert data.load("digits", "train", data_dir="/ignored")[0] is x2  # data_dir unused for digits


# --------------------------------------------------------------------------- tfds round trip


def _pattern(k: int, shape: tuple[int, int, int]) -> np.ndarray:
    """A distinct uint8 image per k, covering 0..255."""
    n = int(np.prod(shape))
    return ((np.arange(n) * (2 * k + 1) + 37 * k) % 256).astype(np.uint8).reshape(shape)


# Per split: the labels written (one image per label, so read-back order does not matter).
_SPLIT_LABELS = {"train": list(range(10)), "test": [7, 2, 9]}


def _write_tfds(root, ds_name: str, shape: tuple[int, int, int]) -> None:
    """Write `ds_name` under `root` with tfds itself, in array_record format, without TensorFlow.

    The builder takes the registered name and version of the real tfds builder, so the loader's
    `tfds.builder(ds_name, data_dir=root)` finds it; `skip_registration` keeps it out of tfds's
    registry (no clash with the real one).
    """
    version = str(tfds.builder_cls(ds_name).VERSION)  # the version tfds.builder(ds_name) expects
    mode = "L" if shape[-1] == 1 else "RGB"

    class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = ds_name
        VERSION = tfds.core.Version(version)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=shape),
                        "label": tfds.features.ClassLabel(num_classes=10),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(labels) for s, labels in _SPLIT_LABELS.items()}

        def _generate_examples(self, labels):
            for label in labels:
                img = _pattern(label, shape)
                pil = Image.fromarray(img[..., 0] if mode == "L" else img, mode=mode)
                yield f"ex{label}", {"image": pil, "label": label}

    builder = Builder(data_dir=str(root), file_format="array_record")
    builder.download_and_prepare()
    assert builder.is_prepared()


@pytest.fixture(scope="module")
def tfds_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    _write_tfds(root, "mnist", (28, 28, 1))
    _write_tfds(root, "cifar10", (32, 32, 3))
    return root


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_tfds_roundtrip_exact(tfds_root, name, split):
    images, labels = data.load(name, split, data_dir=tfds_root)
    shape = data.info(name).image_shape
    assert images.shape == (len(_SPLIT_LABELS[split]), *shape)
    assert images.dtype == np.float32 and labels.dtype == np.int32
    assert sorted(labels.tolist()) == sorted(_SPLIT_LABELS[split])
    for img, label in zip(images, labels):
        np.testing.assert_array_equal(img, _pattern(int(label), shape).astype(np.float32) / 255)
    assert images.min() == 0.0 and images.max() == 1.0
    assert not images.flags.writeable and not labels.flags.writeable
    # Same cache entry whether data_dir is a Path or a str.
    assert data.load(name, split, data_dir=str(tfds_root))[0] is images


def test_tfds_default_data_dir_from_env(tfds_root, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_root))
    images, labels = data.load("mnist", "test")
    assert data.load("mnist", "test", data_dir=tfds_root)[0] is images


# --------------------------------------------------------------------------- fail fast


def _assert_prepare_hint(msg: str, name: str):
    assert "rnd_jax[prepare]" in msg
    assert f"tfds build {name}" in msg and "array_record" in msg


@pytest.mark.parametrize("sub", ["empty", "missing/dir"])
def test_unprepared_fails_fast(tmp_path, sub):
    root = tmp_path / sub
    if sub == "empty":
        root.mkdir()
    t0 = time.monotonic()
    with pytest.raises(data.DatasetNotPreparedError) as exc:
        data.load("cifar10", "train", data_dir=root)
    assert time.monotonic() - t0 < 10
    assert isinstance(exc.value, FileNotFoundError)
    _assert_prepare_hint(str(exc.value), "cifar10")
    assert str(root) in str(exc.value)


def test_other_version_is_reported(tfds_root, tmp_path):
    src = next((tfds_root / "mnist").glob("*/dataset_info.json")).parent
    shutil.copytree(src, tmp_path / "mnist" / "1.0.0")
    with pytest.raises(data.DatasetNotPreparedError, match=r"other prepared versions \['1.0.0'\]"):
        data.load("mnist", "train", data_dir=tmp_path)


def test_tfrecord_only_is_reported(tfds_root, tmp_path):
    """A prepared dataset whose metadata says TFRecord (tfds's default) cannot be read offline.

    Writing TFRecord shards needs TensorFlow, so this copies the real array_record dataset and
    sets its recorded file format to tfrecord, which is what such a dataset's metadata holds.
    """
    mnist_dir = next((tfds_root / "mnist").glob("*/dataset_info.json")).parent
    dst = tmp_path / "mnist" / mnist_dir.name
    shutil.copytree(mnist_dir, dst)
    info_path = dst / "dataset_info.json"
    meta = json.loads(info_path.read_text())
    meta["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(meta))
    t0 = time.monotonic()
    with pytest.raises(data.DatasetNotPreparedError) as exc:
        data.load("mnist", "test", data_dir=tmp_path)
    assert time.monotonic() - t0 < 10
    msg = str(exc.value)
    assert "tfrecord" in msg and "convert_format" in msg and "array_record" in msg
