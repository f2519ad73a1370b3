"""rnd_jax.data on real file formats: CIFAR-10 python batches and local ImageNet val folders.

Every dataset here is written in its real on-disk format into tmp_path (pickled dicts with
bytes keys for CIFAR-10; PIL-written PNG/JPEG files, class folders or a flat folder plus
``val.txt`` for ImageNet) and read back through the public API.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from rnd_jax import data


@pytest.fixture(autouse=True)
def _fresh_cache():
    data.clear_cache()
    yield
    data.clear_cache()


# --------------------------------------------------------------------------- CIFAR-10 batches


def _hwc_images(n: int, seed: int) -> np.ndarray:
    """n distinct uint8 [32, 32, 3] images (fixed arithmetic pattern, no RNG)."""
    i = np.arange(n * 32 * 32 * 3).reshape(n, 32, 32, 3)
    return ((i * (2 * seed + 3) + 11 * seed) % 256).astype(np.uint8)


def _write_batch(path, images_hwc: np.ndarray, labels: list[int], name: bytes, protocol=2):
    """One batch exactly as the official files: bytes keys, uint8 rows of R, G, B planes."""
    rows = images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), 3072)
    batch = {
        b"batch_label": name,
        b"labels": list(labels),
        b"data": np.ascontiguousarray(rows),
        b"filenames": [b"img_%d.png" % i for i in range(len(labels))],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=protocol)


def _write_cifar(root, train_sizes=(2, 1, 3, 1, 2), n_test=3):
    """A tiny cifar-10-batches-py folder; returns the expected (train, test) image/label arrays."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = [], []
    for b, size in enumerate(train_sizes, 1):
        x = _hwc_images(size, seed=b)
        y = [(3 * b + j) % 10 for j in range(size)]
        _write_batch(folder / f"data_batch_{b}", x, y, b"training batch %d of 5" % b)
        xs.append(x)
        ys += y
    x_te = _hwc_images(n_test, seed=9)
    y_te = [9 - j for j in range(n_test)]
    _write_batch(folder / "test_batch", x_te, y_te, b"testing batch 1 of 1")
    meta = {b"num_cases_per_batch": 10000, b"label_names": [b"c%d" % i for i in range(10)],
            b"num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return (np.concatenate(xs), np.array(ys)), (x_te, np.array(y_te))


def test_cifar_batches_roundtrip_exact(tmp_path):
    (x_tr, y_tr), (x_te, y_te) = _write_cifar(tmp_path)
    for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        images, labels = data.load("cifar10", split, data_dir=tmp_path)
        assert images.shape == (len(x), 32, 32, 3) and images.dtype == np.float32
        assert labels.dtype == np.int32
        np.testing.assert_array_equal(labels, y)  # batches concatenated in file order
        np.testing.assert_array_equal(images, x.astype(np.float32) / 255)
        assert not images.flags.writeable and not labels.flags.writeable
        assert data.load("cifar10", split, data_dir=str(tmp_path))[0] is images  # cached
    # The row layout, stated directly on the first stored row: R plane, G plane, B plane.
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        row = pickle.load(f, encoding="bytes")[b"data"][0]
    images, _ = data.load("cifar10", "test", data_dir=tmp_path)
    assert images[0, 0, 1, 0] == row[1] / np.float32(255)  # red, row 0, column 1
    assert images[0, 1, 0, 0] == row[32] / np.float32(255)  # red, row 1, column 0
    assert images[0, 0, 0, 1] == row[1024] / np.float32(255)  # green, pixel (0, 0)
    assert images[0, 0, 0, 2] == row[2048] / np.float32(255)  # blue, pixel (0, 0)


def test_cifar_batches_folder_given_directly(tmp_path):
    _, (x_te, y_te) = _write_cifar(tmp_path)
    images, labels = data.load("cifar10", "test", data_dir=tmp_path / "cifar-10-batches-py")
    np.testing.assert_array_equal(images, x_te.astype(np.float32) / 255)
    np.testing.assert_array_equal(labels, y_te)


def test_cifar_python2_numpy_module_name(tmp_path):
    """The official pickles name numpy.core.multiarray (older numpy); those must load too."""
    _, (x_te, y_te) = _write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    raw = path.read_bytes()
    assert b"numpy._core.multiarray\n_reconstruct" in raw  # what this numpy writes
    path.write_bytes(raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    images, labels = data.load("cifar10", "test", data_dir=tmp_path)
    np.testing.assert_array_equal(images, x_te.astype(np.float32) / 255)
    np.testing.assert_array_equal(labels, y_te)


class _MakesDir:
    """Unpickling this calls os.mkdir(path): a stand-in for a pickle that runs code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.path,))


def test_cifar_refuses_foreign_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": _MakesDir(tmp_path / "ran"), b"labels": [0]}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing global posix.mkdir"):
        data.load("cifar10", "test", data_dir=tmp_path)
    assert not (tmp_path / "ran").exists()
    # A well-formed pickle of the wrong shape is named as such.
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 1536), np.uint8), b"labels": [1, 2]}, f, protocol=2)
    with pytest.raises(ValueError, match=r"expected uint8\[N, 3072\]"):
        data.load("cifar10", "test", data_dir=tmp_path)


def test_cifar_missing_fails_fast_with_both_recipes(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(data.DatasetNotPreparedError) as exc:
        data.load("cifar10", "train", data_dir=tmp_path)
    assert time.monotonic() - t0 < 0.5
    msg = str(exc.value)
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg
    assert f"tar xzf cifar-10-python.tar.gz -C {tmp_path}" in msg
    assert str(tmp_path / "cifar-10-batches-py") in msg
    assert "tfds build cifar10" in msg and "array_record" in msg


def test_missing_data_needs_no_tfds_import(tmp_path):
    """In a fresh interpreter, absent data is reported before tensorflow_datasets is imported."""
    code = f"""
import sys, time
from rnd_jax import data
t0 = time.monotonic()
for call in (lambda: data.load("cifar10", "test", data_dir={str(tmp_path)!r}),
             lambda: data.load_imagenet({str(tmp_path / "none")!r}, n=5)):
    try:
        call()
    except data.DatasetNotPreparedError:
        pass
    else:
        raise SystemExit("no error")
print(time.monotonic() - t0, "tensorflow_datasets" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, imported = out.stdout.split()
    assert imported == "False" and float(seconds) < 0.5


def test_cifar_incomplete_folder(tmp_path):
    _write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(data.DatasetNotPreparedError, match="data_batch_3"):
        data.load("cifar10", "train", data_dir=tmp_path)
    assert data.load("cifar10", "test", data_dir=tmp_path)[0].shape == (3, 32, 32, 3)
    with pytest.raises(ValueError, match="unknown split"):
        data.load("cifar10", "val", data_dir=tmp_path)


# --------------------------------------------------------------------------- ImageNet layouts


def _pattern(h: int, w: int, k: int) -> np.ndarray:
    i = np.arange(h * w * 3).reshape(h, w, 3)
    return ((i * (k + 5) + 17 * k) % 256).astype(np.uint8)


def _expected(arr: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """Resize(shorter side) + CenterCrop, spelled out with PIL for the reference."""
    h, w = arr.shape[:2]
    im = Image.fromarray(arr)
    if min(h, w) != resize:
        size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
        im = im.resize(size, Image.BILINEAR)
    out = np.asarray(im)
    top, left = int(round((out.shape[0] - crop) / 2)), int(round((out.shape[1] - crop) / 2))
    return out[top : top + crop, left : left + crop].astype(np.float32) / 255


# Class folders, created out of sorted order: the class index is the sorted position.
_WNIDS = ["n03000000", "n01000000", "n02000000"]  # -> labels 2, 0, 1
_SIZES = [(8, 11), (13, 8), (8, 8), (20, 9), (9, 16)]  # (h, w); shorter side 8 = no resize


def _write_class_folders(root, counts=(2, 1, 3)) -> dict[str, np.ndarray]:
    """PNG (lossless) images in <root>/<wnid>/; returns relative path -> pixels."""
    written, k = {}, 0
    for wnid, count in zip(_WNIDS, counts):
        (root / wnid).mkdir(parents=True)
        for j in range(count):
            h, w = _SIZES[k % len(_SIZES)]
            arr = _pattern(h, w, k)
            rel = f"{wnid}/ILSVRC2012_val_{k + 1:08d}.PNG"
            Image.fromarray(arr).save(root / rel)
            written[rel] = arr
            k += 1
    (root / _WNIDS[0] / "notes.txt").write_text("not an image")
    return written


def _write_index(path, entries):
    path.write_text(json.dumps([{"file": f, "label": y} for f, y in entries]))


def test_class_folders_labels_and_exact_pixels(tmp_path):
    root = tmp_path / "val"
    written = _write_class_folders(root)
    files = data.imagenet_files(root)
    label_of = {w: i for i, w in enumerate(sorted(_WNIDS))}
    assert files == sorted((rel, label_of[rel.split("/")[0]]) for rel in written)
    # An explicit list, in a chosen order, comes back in that order with exact pixels.
    order = [files[4], files[0], files[5], files[2]]
    _write_index(tmp_path / "mine.json", order)
    images, labels = data.load_imagenet(root, index_file=tmp_path / "mine.json", resize=8, crop=6)
    assert images.shape == (4, 6, 6, 3) and images.dtype == np.float32
    assert labels.dtype == np.int32 and labels.tolist() == [y for _, y in order]
    for img, (rel, _) in zip(images, order):
        np.testing.assert_array_equal(img, _expected(written[rel], 8, 6))
    # A shorter side already equal to `resize` is only cropped: offsets round((size - crop) / 2).
    rel = next(r for r in written if written[r].shape[:2] == (8, 11))
    idx = [r for r, _ in order].index(rel)
    np.testing.assert_array_equal(images[idx], written[rel][1:7, 2:8].astype(np.float32) / 255)
    assert not images.flags.writeable and not labels.flags.writeable


def test_default_sizes_and_rgb_conversion(tmp_path):
    root = tmp_path / "val"
    (root / "n01").mkdir(parents=True)
    Image.new("L", (300, 260), 77).save(root / "n01" / "a.JPEG")  # grey JPEG: decodes exactly
    images, labels = data.load_imagenet(root, n=1)
    assert images.shape == (1, 224, 224, 3) == (1, *data.info("imagenet").image_shape)
    assert np.all(images == np.float32(77) / 255) and labels.tolist() == [0]
    assert data.info("imagenet") == data.DatasetInfo("imagenet", (224, 224, 3), 1000)


def _write_flat(root, labels: dict[str, int], extra_lines: str = "") -> None:
    root.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(labels):
        Image.new("RGB", (12, 10), (10 * k,) * 3).save(root / name)  # solid grey JPEGs
    (root / "val.txt").write_text(
        "".join(f"{name} {y}\n" for name, y in labels.items()) + extra_lines
    )


_FLAT = {f"ILSVRC2012_val_{i:08d}.JPEG": y for i, y in [(1, 65), (2, 970), (3, 230), (4, 0)]}


def test_flat_folder_with_label_file(tmp_path):
    root = tmp_path / "val"
    _write_flat(root, _FLAT, extra_lines="\n")  # a trailing blank line is allowed
    assert data.imagenet_files(root) == sorted(_FLAT.items())
    entries, path = data.imagenet_index(root, n=4)
    images, labels = data.load_imagenet(root, n=4, resize=10, crop=8)
    assert images.shape == (4, 8, 8, 3)
    names = list(_FLAT)
    for img, y, (rel, y_saved) in zip(images, labels, entries):
        assert y == y_saved == _FLAT[rel]
        assert np.all(img == np.float32(10 * names.index(rel)) / 255)
    # The same label file elsewhere, passed explicitly.
    other = tmp_path / "labels.txt"
    other.write_text((root / "val.txt").read_text())
    (root / "val.txt").unlink()
    assert data.imagenet_files(root, labels_file=other) == sorted(_FLAT.items())


# --------------------------------------------------------------------------- the saved index


def test_index_file_round_trip_ignores_new_files(tmp_path):
    root = tmp_path / "val"
    _write_class_folders(root)
    x1, y1 = data.load_imagenet(root, n=3, resize=8, crop=6)
    saved = root / "rnd_jax_val_index_n3.json"
    listed = json.loads(saved.read_text())
    chosen = data.choose_imagenet(data.imagenet_files(root), 3)
    assert listed == [{"file": f, "label": y} for f, y in chosen]
    assert y1.tolist() == [y for _, y in chosen]
    # New images that the rule would now pick first.
    before = {f for f, _ in chosen}
    added = 0
    for j in range(40):
        name = f"new_{j}.PNG"
        if hashlib.sha256(name.encode()).hexdigest() < min(
            hashlib.sha256(f.split("/")[-1].encode()).hexdigest() for f in before
        ):
            Image.fromarray(_pattern(8, 8, 100 + j)).save(root / _WNIDS[1] / name)
            added += 1
    assert added > 0
    assert {f for f, _ in data.choose_imagenet(data.imagenet_files(root), 3)} != before
    data.clear_cache()
    x2, y2 = data.load_imagenet(root, n=3, resize=8, crop=6)
    assert x2 is not x1  # really read again
    np.testing.assert_array_equal(x2, x1)
    np.testing.assert_array_equal(y2, y1)
    assert json.loads(saved.read_text()) == listed
    # n=None reads an existing list; a different n for that list is refused.
    assert data.load_imagenet(root, index_file=saved, resize=8, crop=6)[1].tolist() == y1.tolist()
    with pytest.raises(ValueError, match="lists 3 images, not n=2"):
        data.load_imagenet(root, n=2, index_file=saved)


def test_choice_rule_and_balance(tmp_path):
    root = tmp_path / "val"
    _write_class_folders(root, counts=(5, 1, 3))
    files = data.imagenet_files(root)
    digest = {f: hashlib.sha256(f.split("/")[-1].encode()).hexdigest() for f, _ in files}
    # Unbalanced: the n smallest digests of the file names, in digest order.
    plain = data.choose_imagenet(files, 4)
    assert [f for f, _ in plain] == sorted(digest, key=digest.get)[:4]
    # Balanced: one per class first (each class's best), then second-bests, ...
    # Folder sizes 5, 1, 3 for wnids sorted to labels 2, 0, 1: per-label sizes 1, 3, 5.
    for n, counts in [(3, [1, 1, 1]), (5, [1, 2, 2]), (8, [1, 3, 4]), (9, [1, 3, 5])]:
        chosen = data.choose_imagenet(files, n, balanced=True)
        assert len({f for f, _ in chosen}) == n
        assert np.bincount([y for _, y in chosen], minlength=3).tolist() == counts
        assert {y for _, y in chosen[:3]} == {0, 1, 2}
    first = data.choose_imagenet(files, 3, balanced=True)
    best = {y: min((f for f, c in files if c == y), key=digest.get) for y in range(3)}
    assert sorted(first) == sorted((f, y) for y, f in best.items())
    assert [f for f, _ in first] == sorted(best.values(), key=digest.get)
    # Same rule, same answer, whatever the layout: a flat copy picks the same file names.
    flat = tmp_path / "flat"
    flat.mkdir()
    for f, y in files:
        (flat / f.split("/")[-1]).write_bytes((root / f).read_bytes())
    (flat / "val.txt").write_text("".join(f"{f.split('/')[-1]} {y}\n" for f, y in files))
    flat_files = data.imagenet_files(flat)
    for balanced in (False, True):
        a = data.choose_imagenet(files, 5, balanced)
        b = data.choose_imagenet(flat_files, 5, balanced)
        assert [(f.split("/")[-1], y) for f, y in a] == b
    # Through the loader, the balanced list is saved under its own name.
    _, labels = data.load_imagenet(root, n=3, balanced=True, resize=8, crop=6)
    assert sorted(labels.tolist()) == [0, 1, 2]
    assert (root / "rnd_jax_val_index_n3_balanced.json").is_file()


# --------------------------------------------------------------------------- fail fast


def test_imagenet_bad_arguments(tmp_path):
    root = tmp_path / "val"
    _write_class_folders(root)
    Image.new("RGB", (9, 9)).save(root / _WNIDS[0] / "zz.PNG")
    (root / _WNIDS[0] / "zz.PNG").write_bytes(b"not an image")  # decoding would fail
    with pytest.raises(ValueError, match="unknown imagenet split 'train'"):
        data.load_imagenet(root, "train", n=1)
    with pytest.raises(ValueError, match="n=8 images requested but only 7"):
        data.load_imagenet(root, n=8)
    assert not list(root.glob("*.json"))  # nothing saved for a refused request
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="positive int"):
            data.load_imagenet(root, n=bad)
    with pytest.raises(ValueError, match="give n"):
        data.load_imagenet(root)
    with pytest.raises(ValueError, match="crop=9 is larger than resize=8"):
        data.load_imagenet(root, n=1, resize=8, crop=9)
    with pytest.raises(ValueError, match="imagenet needs a choice of images"):
        data.load("imagenet", "val", data_dir=root)
    # Index files: absent files, bad labels, bad shape -- all before anything is decoded.
    good = data.imagenet_files(root)[0]
    cases = [
        ([good, (f"{_WNIDS[0]}/gone.JPEG", 2)], "absent"),
        ([good, (f"{_WNIDS[0]}/zz.PNG", 1000)], r"not class indices in \[0, 1000\)"),
        ([(f"{_WNIDS[0]}/zz.PNG", 2), ("../val/x.PNG", 0)], "not a relative path"),
        ([good, good], "more than once"),
    ]
    for entries, match in cases:
        _write_index(tmp_path / "bad.json", entries)
        with pytest.raises(ValueError, match=match):
            data.load_imagenet(root, index_file=tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text('{"file": "a"}')
    with pytest.raises(ValueError, match="JSON list"):
        data.load_imagenet(root, index_file=tmp_path / "bad.json")
    _write_index(tmp_path / "zz.json", [(f"{_WNIDS[0]}/zz.PNG", 2)])
    with pytest.raises(ValueError, match="cannot decode"):
        data.load_imagenet(root, index_file=tmp_path / "zz.json")
    with pytest.raises(ValueError, match="1001 class folders"):
        many = tmp_path / "many"
        for i in range(1001):
            (many / f"n{i:08d}").mkdir(parents=True)
        data.imagenet_files(many)


def test_imagenet_bad_label_files(tmp_path):
    root = tmp_path / "val"
    _write_flat(root, _FLAT)
    lines = (root / "val.txt").read_text()
    for extra, match in [
        ("ILSVRC2012_val_00000099.JPEG 3\n", r"absent .*ILSVRC2012_val_00000099"),
        ("ILSVRC2012_val_00000001.JPEG 1000\n", r"not class indices in \[0, 1000\)"),
        ("ILSVRC2012_val_00000001.JPEG -1\n", r"not class indices in \[0, 1000\)"),
        ("ILSVRC2012_val_00000001.JPEG\n", "expected '<file name> <class index>'"),
        ("ILSVRC2012_val_00000001.JPEG 4\n", "listed twice"),
    ]:
        (root / "val.txt").write_text(lines + extra)
        with pytest.raises(ValueError, match=match):
            data.load_imagenet(root, n=1)
        assert not list(root.glob("*.json"))


def test_imagenet_missing_fails_fast(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(data.DatasetNotPreparedError, match="image-net.org") as exc:
        data.load_imagenet(tmp_path / "nowhere", n=10)
    assert time.monotonic() - t0 < 0.5
    assert isinstance(exc.value, FileNotFoundError)
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(data.DatasetNotPreparedError, match="val.txt"):
        data.load_imagenet(tmp_path / "flat", n=1)
