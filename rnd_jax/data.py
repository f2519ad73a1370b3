"""Image-classification datasets as numpy arrays.

``load(name, split, data_dir) -> (images, labels)`` with ``images`` float32 ``[N, H, W, C]`` in
``[0, 1]`` and ``labels`` int32 ``[N]``. ``info(name)`` gives shape and class count without loading.
ImageNet has its own loader, :func:`load_imagenet`, because it needs a choice of images.

=================  =============  ==============  ============================================
name               image shape    train / test    source
=================  =============  ==============  ============================================
``digits``         8x8x1          1437 / 360      scikit-learn's bundled copy (no download);
                                                  stratified 80/20 split, ``random_state=0``
``mnist``          28x28x1        60000 / 10000   tensorflow-datasets, prepared ``array_record``
``fashion_mnist``  28x28x1        60000 / 10000   tensorflow-datasets, prepared ``array_record``
``cifar10``        32x32x3        50000 / 10000   the official python batches
                                                  (``cifar-10-batches-py``), else
                                                  tensorflow-datasets (``array_record``)
``imagenet``       224x224x3      ``"val"`` only  a local ILSVRC2012 validation folder, via
                   (1000 classes)                 :func:`load_imagenet` (``load`` refuses it)
=================  =============  ==============  ============================================

``DATASETS`` lists the 10-class train/test datasets that :func:`load` serves; ``info`` also
knows ``"imagenet"``. Nothing is ever downloaded here: missing data raises
:class:`DatasetNotPreparedError` at once, with instructions for getting it.

tfds datasets
-------------
These are read with ``tfds`` random-access data sources, which need neither TensorFlow nor
network access, but only work on a dataset that is already prepared on disk in
``array_record`` format: ``<data_dir>/<name>/<version>/`` holding ``dataset_info.json``,
``features.json`` and ``<name>-<split>.array_record-*`` shards. ``data_dir`` defaults to
``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets`` (read at call time).

Preparing (once, on a machine with internet; downloading and encoding need TensorFlow)::

    pip install "rnd_jax[prepare]"            # adds tensorflow-cpu
    tfds build mnist --data_dir ~/tensorflow_datasets --file_format array_record
    # or, from Python:
    python -c "import tensorflow_datasets as tfds; tfds.builder('mnist', \\
        data_dir='~/tensorflow_datasets', file_format='array_record').download_and_prepare()"

``--file_format array_record`` matters: tfds writes TFRecord by default, which the data sources
cannot read (convert an existing one with ``tfds convert_format --dataset_version_dir
<data_dir>/mnist/3.0.1 --out_file_format array_record``). A prepared version directory (e.g.
``mnist/3.0.1``, ``fashion_mnist/3.0.1``, ``cifar10/3.0.2`` for tensorflow-datasets 4.9.10) can
also be copied from another machine into ``<data_dir>/<name>/``.

CIFAR-10
--------
Looked up in this order (the first that exists is used, with no mixing):

1. ``<data_dir>/cifar-10-batches-py/`` -- the folder that the official tarball unpacks to;
2. ``<data_dir>`` itself, if it holds ``data_batch_1`` or ``test_batch`` (``data_dir`` pointed
   straight at that folder);
3. the tfds dataset ``<data_dir>/cifar10/<version>/`` (above).

The python batches are ``data_batch_1`` .. ``data_batch_5`` (train, concatenated in that order)
and ``test_batch``: pickles (protocol 2) of dicts with bytes keys, ``b"data"`` uint8
``[10000, 3072]`` (each row the 1024 red, then green, then blue values of a 32x32 image in
row-major order) and ``b"labels"`` (10000 ints). ``batches.meta`` is not needed. They are
unpickled with an allow-list (numpy arrays only), so a foreign pickle cannot run code. To get
them (by hand; about 163 MB)::

    wget https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz
    md5sum cifar-10-python.tar.gz       # c58f30108f718f92721af3b95e74349a
    tar xzf cifar-10-python.tar.gz -C <data_dir>   # creates <data_dir>/cifar-10-batches-py/

ImageNet validation subset
--------------------------
``load_imagenet(data_dir, "val", n=..., balanced=..., index_file=..., labels_file=...)`` reads
a local ILSVRC2012 validation folder in either layout:

* class folders ``<data_dir>/<wnid>/*.JPEG`` (any depth below the wnid folder; extensions
  ``.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp``, any case): the class index is the
  position of the wnid among the sorted sub-folder names, as torchvision's ``ImageFolder``
  does -- so all 1000 folders must be present for indices to match the standard ones;
* the official flat folder ``<data_dir>/ILSVRC2012_val_*.JPEG`` plus a label file (default
  ``<data_dir>/val.txt``, or ``labels_file=``) of lines ``<file name> <class index>``, the
  file name relative to ``data_dir`` and the index 0-based in sorted-wnid order (the ``val.txt``
  of Caffe's ``ilsvrc12`` auxiliary data has this form). The devkit's
  ``ILSVRC2012_validation_ground_truth.txt`` uses another numbering and must be converted.

With ``labels_file`` given the flat layout is read; without it, a ``data_dir`` that has any
sub-folder is read as class folders, otherwise as the flat layout with ``val.txt``.
The images are ``ILSVRC2012_img_val.tar`` from image-net.org (registration needed); unpack with
``mkdir val && tar xf ILSVRC2012_img_val.tar -C val``.

*Which images.* The subset is a fixed list saved as JSON, a list of ``{"file": <path relative to
data_dir, "/"-separated>, "label": <class index>}`` in load order. If ``index_file`` (default
``<data_dir>/rnd_jax_val_index_n<n>[_balanced].json``) exists it is read back and nothing is
chosen again, even if files were added to the folder since; otherwise ``n`` images are chosen
and the list is written there before anything is decoded. The choice is a fixed rule, with no
randomness: every image is ranked by the SHA-256 hex digest of its file *name* (ties by path),
which is the same in both layouts. ``balanced=False`` takes the ``n`` first-ranked images;
``balanced=True`` deals round-robin -- the best-ranked image of every class, then the
second-best of every class that has one, and so on, each round in rank order -- and takes the
first ``n`` (``n=1000`` on the full set is one image per class). Any prefix of the list is thus
itself a spread-out sample.
The steps are public too: :func:`imagenet_files` lists a folder, :func:`choose_imagenet`
applies the rule, :func:`imagenet_index` reads or chooses and saves the list.

*Preprocessing* (deterministic, as torchvision's ``Resize(256)`` + ``CenterCrop(224)`` on PIL
images): convert to RGB; resize so the shorter side is ``resize`` (the longer side
``int(resize * long / short)``, PIL bilinear; skipped if already that size); crop the central
``crop x crop`` window (offsets ``int(round((size - crop) / 2))``); divide by 255. Images are
decoded one at a time into one preallocated float32 array (1000 images at 224: 0.6 GB).

Caching
-------
Loaded arrays are cached in-process (per ``(name, split, data_dir)`` for :func:`load`; the last
two image lists for :func:`load_imagenet`) and returned read-only (the same objects on every
call); copy them (``np.array(x)``) before modifying in place. :func:`clear_cache` drops them.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import hashlib
import json
import os
import pickle

import numpy as np

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")  # what load() serves
SPLITS = ("train", "test")
IMAGENET = "imagenet"  # served by load_imagenet()
IMAGENET_SPLITS = ("val",)

_TFDS_DATASETS = ("mnist", "fashion_mnist", "cifar10")
_READ_BATCH = 8192  # records decoded per data-source read; bounds transient memory


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset: ``name``, ``image_shape`` ``(H, W, C)``, ``num_classes``."""

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int


_INFO = {
    "digits": DatasetInfo("digits", (8, 8, 1), 10),
    "mnist": DatasetInfo("mnist", (28, 28, 1), 10),
    "fashion_mnist": DatasetInfo("fashion_mnist", (28, 28, 1), 10),
    "cifar10": DatasetInfo("cifar10", (32, 32, 3), 10),
    IMAGENET: DatasetInfo(IMAGENET, (224, 224, 3), 1000),  # at the default resize/crop
}


class DatasetNotPreparedError(FileNotFoundError):
    """A dataset is absent from ``data_dir`` (or, for tfds, not stored as ``array_record``).

    Raised before any download is attempted; the message says where the loader looked and how to
    get the data.
    """


def info(name: str) -> DatasetInfo:
    """Shape and class count of dataset ``name`` (one of ``DATASETS`` or ``"imagenet"``)."""
    if name not in _INFO:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS + (IMAGENET,)}")
    return _INFO[name]


def load(
    name: str = "digits", split: str = "train", data_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load ``split`` of dataset ``name`` as ``(images f32[N,H,W,C] in [0,1], labels i32[N])``.

    ``data_dir`` is the data root (ignored for ``digits``); ``None`` means ``$TFDS_DATA_DIR`` or
    ``~/tensorflow_datasets``. ``cifar10`` is read from ``<data_dir>/cifar-10-batches-py`` if
    present (see the module docstring for the full lookup order), else from tfds. Results are
    cached per ``(name, split, resolved data_dir)`` and are read-only.

    Raises:
      ValueError: unknown ``name`` or ``split``, or data on disk that does not match ``info(name)``.
      DatasetNotPreparedError: the dataset is not under ``data_dir`` in a readable format; raised
        immediately, never after a download attempt.
    """
    _check_name(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    root = None if name == "digits" else _resolve_data_dir(data_dir)
    return _load_cached(name, split, root)


def clear_cache() -> None:
    """Drop all arrays cached by :func:`load` and :func:`load_imagenet`."""
    _load_cached.cache_clear()
    _imagenet_cached.cache_clear()


def _check_name(name: str) -> None:
    if name == IMAGENET:
        raise ValueError(
            "imagenet needs a choice of images: use data.load_imagenet(data_dir, 'val', n=...); "
            f"load() serves {DATASETS}"
        )
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")


def _resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
    """Absolute tfds root: ``data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
    if data_dir is None:
        data_dir = os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets")
    path = os.path.expanduser(os.fspath(data_dir))
    return path if "://" in path else os.path.abspath(path)  # leave gs:// etc. untouched


def _freeze(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    if name == "digits":
        images, labels = _digits(split)
    elif name == "cifar10" and (batches := _cifar_batches_dir(data_dir)) is not None:
        images, labels = _cifar_batches(batches, split)
    else:
        images, labels = _tfds(name, split, data_dir)
    spec = _INFO[name]
    if images.shape[1:] != spec.image_shape or labels.shape != images.shape[:1]:
        raise ValueError(
            f"{name}/{split}: got images {images.shape}, labels {labels.shape}; "
            f"expected [N, {', '.join(map(str, spec.image_shape))}] and [N]"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise ValueError(f"{name}/{split}: labels outside [0, {spec.num_classes})")
    return _freeze(images, labels)


def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / np.float32(16.0))[..., None]
    labels = bunch.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=0.2, random_state=0, stratify=labels
    )
    return (x_tr, y_tr) if split == "train" else (x_te, y_te)


# --------------------------------------------------------------------------- CIFAR-10 batches

_CIFAR_DIRNAME = "cifar-10-batches-py"
_CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"


def _cifar_batches_hint(data_dir: str) -> str:
    return (
        "Either get the official python batches (by hand, ~163 MB):\n"
        f"  wget {_CIFAR_URL}   # md5 {_CIFAR_MD5}\n"
        f"  tar xzf cifar-10-python.tar.gz -C {data_dir}\n"
        f"which creates {os.path.join(data_dir, _CIFAR_DIRNAME)}/ (data_batch_1..5, test_batch, "
        "batches.meta); or prepare the tfds dataset:\n"
    )


def _cifar_batches_dir(data_dir: str) -> str | None:
    """The python-batches folder for ``data_dir`` (lookup order in the module docstring)."""
    if "://" in data_dir:
        return None
    nested = os.path.join(data_dir, _CIFAR_DIRNAME)
    if os.path.isdir(nested):
        return nested
    if any(os.path.isfile(os.path.join(data_dir, f)) for f in ("data_batch_1", "test_batch")):
        return data_dir
    return None


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR python batches, refusing every global except what a numpy array needs."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
        ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes pickled by Python 3 under protocol 2
    }

    def find_class(self, module, name):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}") from None


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise ValueError(f"{path} is not a CIFAR-10 python batch: {e}") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path}: expected a dict with keys b'data' and b'labels', got {keys}")
    x, y = batch[b"data"], np.asarray(batch[b"labels"])
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        what = f"{x.dtype}{list(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"{path}: b'data' is {what}, expected uint8[N, 3072]")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{path}: b'labels' has shape {y.shape}, expected {len(x)} integers")
    return x, y


def _cifar_batches(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    names = _CIFAR_FILES[split]
    missing = [f for f in names if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DatasetNotPreparedError(
            f"CIFAR-10 python batches in {folder!r} lack {missing} (needed for split {split!r}). "
            "Nothing is downloaded automatically.\n"
            + _cifar_batches_hint(os.path.dirname(folder) or ".")
            + _prepare_hint("cifar10", os.path.dirname(folder) or ".", "<version>")
        )
    parts = [_read_cifar_batch(os.path.join(folder, f)) for f in names]
    n = sum(len(x) for x, _ in parts)
    images = np.empty((n, 32, 32, 3), np.float32)
    labels = np.empty((n,), np.int32)
    start = 0
    for x, y in parts:
        chw = x.reshape(len(x), 3, 32, 32).transpose(0, 2, 3, 1)  # rows are R, G, B planes
        np.divide(chw, np.float32(255), out=images[start : start + len(x)], dtype=np.float32)
        labels[start : start + len(x)] = y
        start += len(x)
    return images, labels


# --------------------------------------------------------------------------- tfds


def _prepare_hint(name: str, data_dir: str, version: object) -> str:
    return (
        "Prepare it once, on a machine with internet access:\n"
        '  pip install "rnd_jax[prepare]"   # adds tensorflow-cpu, needed to download/encode\n'
        f"  tfds build {name} --data_dir {data_dir} --file_format array_record\n"
        "or equivalently\n"
        f"  python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
        f"data_dir='{data_dir}', file_format='array_record').download_and_prepare()\"\n"
        f"or copy a prepared '{name}/{version}' directory (e.g. from ~/tensorflow_datasets on "
        f"another machine) to {os.path.join(data_dir, name, str(version))}, or point data_dir / "
        "TFDS_DATA_DIR at a directory that has it."
    )


def _full_hint(name: str, data_dir: str, version: object) -> str:
    extra = _cifar_batches_hint(data_dir) if name == "cifar10" else ""
    return extra + _prepare_hint(name, data_dir, version)


def _where(name: str, data_dir: str) -> str:
    if name != "cifar10":
        return ""
    return (
        f" (looked for python batches in {os.path.join(data_dir, _CIFAR_DIRNAME)!r} and "
        f"{data_dir!r}, then for the tfds dataset)"
    )


def _prepared_builder(name: str, data_dir: str):
    """The tfds builder for ``name`` under ``data_dir``, checked to be readable offline."""
    if "://" not in data_dir and not os.path.isdir(os.path.join(data_dir, name)):
        # Nothing there at all: fail before importing tensorflow_datasets (which is slow).
        version = "<version>"  # tfds's expected version is only known after importing it
        raise DatasetNotPreparedError(
            f"dataset {name!r} is not under {data_dir!r}{_where(name, data_dir)}: no "
            f"{os.path.join(data_dir, name)} directory. Nothing is downloaded automatically.\n"
            + _full_hint(name, data_dir, version)
        )
    import tensorflow_datasets as tfds

    # Constructing a registered builder only computes paths; it reads local files at most.
    builder = tfds.builder(name, data_dir=data_dir)
    hint = _full_hint(name, data_dir, builder.version)
    if not builder.is_prepared():
        dataset_dir = os.path.join(data_dir, name)
        found = (
            sorted(
                v
                for v in os.listdir(dataset_dir)
                if os.path.isfile(os.path.join(dataset_dir, v, "dataset_info.json"))
            )
            if os.path.isdir(dataset_dir)
            else []
        )
        other = (
            f" Found other prepared versions {found}, which this tensorflow-datasets "
            "does not load by default."
            if found
            else ""
        )
        raise DatasetNotPreparedError(
            f"dataset {name!r} version {builder.version} is not prepared under {data_dir!r}"
            f"{_where(name, data_dir)} (no dataset_info.json/features.json in "
            f"{builder.data_dir}).{other} Nothing is downloaded automatically.\n" + hint
        )
    formats = builder.info.available_file_formats()
    if tfds.core.file_adapters.FileFormat.ARRAY_RECORD not in formats:
        have = ", ".join(sorted(f.value for f in formats)) or "unknown"
        raise DatasetNotPreparedError(
            f"dataset {name!r} at {builder.data_dir} is stored as {have}, but reading without "
            "TensorFlow needs array_record (tfds's default file format is tfrecord). Convert it:\n"
            '  pip install "rnd_jax[prepare]"\n'
            f"  tfds convert_format --dataset_version_dir {builder.data_dir} "
            "--out_file_format array_record\n"
            "or rebuild it with --file_format array_record.\n" + hint
        )
    return builder


def _tfds(name: str, split: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    builder = _prepared_builder(name, data_dir)
    if split not in builder.info.splits:
        raise ValueError(
            f"{name} at {builder.data_dir} has splits {sorted(builder.info.splits)}, not {split!r}"
        )
    source = builder.as_data_source(split=split, file_format="array_record")
    n = len(source)
    shape = _INFO[name].image_shape
    images = np.empty((n, *shape), np.float32)
    labels = np.empty((n,), np.int32)
    for start in range(0, n, _READ_BATCH):
        stop = min(start + _READ_BATCH, n)
        records = source.__getitems__(range(start, stop))  # one batched read + decode
        batch = np.stack([r["image"] for r in records])
        if batch.shape[1:] != shape or batch.dtype != np.uint8:
            raise ValueError(
                f"{name}/{split} at {builder.data_dir}: images are "
                f"{batch.dtype}{list(batch.shape[1:])}, expected uint8{list(shape)}"
            )
        np.divide(batch, np.float32(255), out=images[start:stop], dtype=np.float32)
        labels[start:stop] = [r["label"] for r in records]
    return images, labels


# --------------------------------------------------------------------------- ImageNet val subset

# File endings torchvision's ImageFolder accepts (matched case-insensitively).
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_IMAGENET_LABELS = "val.txt"


def _imagenet_hint(data_dir: str) -> str:
    return (
        "Get ILSVRC2012_img_val.tar from https://image-net.org (registration needed; nothing is "
        "downloaded automatically), then either\n"
        f"  mkdir -p {data_dir} && tar xf ILSVRC2012_img_val.tar -C {data_dir}\n"
        f"and put a label file of '<file name> <class index>' lines (0-based, sorted-wnid order; "
        f"e.g. Caffe's ilsvrc12 val.txt) at {os.path.join(data_dir, _IMAGENET_LABELS)} or pass "
        "labels_file=; or sort the images into one folder per wnid under it "
        "(<data_dir>/<wnid>/*.JPEG)."
    )


def _imagenet_root(data_dir: str | os.PathLike) -> str:
    root = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
    if not os.path.isdir(root):
        raise DatasetNotPreparedError(
            f"ImageNet validation folder {root!r} does not exist.\n" + _imagenet_hint(root)
        )
    return root


def _check_relative(name: str, where: str) -> str:
    """``name`` as a clean "/"-separated path inside the data folder, or ValueError."""
    parts = name.replace(os.sep, "/").split("/")
    if not name or os.path.isabs(name) or ".." in parts or "" in parts:
        raise ValueError(f"{where}: {name!r} is not a relative path inside the data folder")
    return "/".join(parts)


def _check_present(root: str, files: list[str], where: str) -> None:
    # One listing instead of 50000 stat calls for the flat layout.
    top = {e.name for e in os.scandir(root) if e.is_file()}
    absent = [
        f
        for f in files
        if not (f in top if "/" not in f else os.path.isfile(os.path.join(root, f)))
    ]
    if absent:
        raise ValueError(
            f"{where} names {len(absent)} file(s) absent from {root!r}, e.g. {absent[:3]}"
        )


def _check_labels(labels: list[int], where: str) -> None:
    k = _INFO[IMAGENET].num_classes
    bad = [y for y in labels if not isinstance(y, int) or isinstance(y, bool) or not 0 <= y < k]
    if bad:
        raise ValueError(f"{where}: labels {bad[:3]} are not class indices in [0, {k})")


def imagenet_files(
    data_dir: str | os.PathLike, labels_file: str | os.PathLike | None = None
) -> list[tuple[str, int]]:
    """Every ``(relative path, class index)`` of an ImageNet validation folder, sorted by path.

    Layouts and the class numbering are in the module docstring. Reads directory listings and
    the label file only; decodes nothing.

    Raises:
      DatasetNotPreparedError: ``data_dir`` (or a flat layout's label file) does not exist.
      ValueError: more than 1000 class folders; a malformed label file line, a class index outside
        ``[0, 1000)``, a file listed twice or absent from ``data_dir``; no images found.
    """
    root = _imagenet_root(data_dir)
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if labels_file is None and subdirs:
        k = _INFO[IMAGENET].num_classes
        if len(subdirs) > k:
            raise ValueError(
                f"{root!r} has {len(subdirs)} class folders; ImageNet has {k} "
                f"(e.g. {subdirs[:3]}...)"
            )
        files = []
        for label, wnid in enumerate(subdirs):
            for dirpath, dirnames, names in os.walk(os.path.join(root, wnid), followlinks=True):
                dirnames.sort()
                rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
                files += [
                    (f"{rel}/{f}", label)
                    for f in sorted(names)
                    if f.lower().endswith(_IMAGE_EXTENSIONS)
                ]
    else:
        path = os.path.join(root, _IMAGENET_LABELS) if labels_file is None else labels_file
        path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        if not os.path.isfile(path):
            raise DatasetNotPreparedError(
                f"{root!r} has no class folders and label file {path!r} does not exist.\n"
                + _imagenet_hint(root)
            )
        files, seen = [], set()
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                fields = line.strip().rsplit(maxsplit=1)
                if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
                    raise ValueError(f"{where}: expected '<file name> <class index>', got {line!r}")
                name, label = _check_relative(fields[0], where), int(fields[1])
                _check_labels([label], where)
                if name in seen:
                    raise ValueError(f"{where}: {name!r} is listed twice")
                seen.add(name)
                files.append((name, label))
        _check_present(root, [name for name, _ in files], f"label file {path!r}")
        files.sort()
    if not files:
        raise DatasetNotPreparedError(f"no images found in {root!r}.\n" + _imagenet_hint(root))
    return files


def _rank(entry: tuple[str, int]) -> tuple[str, str]:
    """Selection rank: SHA-256 of the file name (the same in both layouts), ties by path."""
    name = entry[0].rsplit("/", 1)[-1]
    return hashlib.sha256(name.encode("utf-8")).hexdigest(), entry[0]


def choose_imagenet(
    files: list[tuple[str, int]], n: int, balanced: bool = False
) -> list[tuple[str, int]]:
    """``n`` of ``files`` by the fixed rule of the module docstring (no randomness).

    ``balanced=False``: the ``n`` best-ranked; ``balanced=True``: round-robin over classes (round
    ``r`` holds each class's ``r``-th best-ranked image, in rank order), first ``n``.
    """
    _check_n(n)
    if n > len(files):
        raise ValueError(f"n={n} images requested but only {len(files)} are available")
    if not balanced:
        return sorted(files, key=_rank)[:n]
    by_class: dict[int, list[tuple[str, int]]] = {}
    for entry in sorted(files, key=_rank):
        by_class.setdefault(entry[1], []).append(entry)
    dealt = sorted(
        ((r, _rank(e), e) for members in by_class.values() for r, e in enumerate(members))
    )
    return [e for _, _, e in dealt[:n]]


def _check_n(n) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")


def _read_index(path: str, root: str) -> list[tuple[str, int]]:
    where = f"index file {path!r}"
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON: {e}") from e
    if not isinstance(raw, list) or not raw or not all(
        isinstance(e, dict) and set(e) == {"file", "label"} and isinstance(e["file"], str)
        for e in raw
    ):
        raise ValueError(
            f'{where}: expected a non-empty JSON list of {{"file": ..., "label": ...}} objects'
        )
    entries = [(_check_relative(e["file"], where), e["label"]) for e in raw]
    _check_labels([y for _, y in entries], where)
    if len({f for f, _ in entries}) != len(entries):
        raise ValueError(f"{where} lists a file more than once")
    _check_present(root, [f for f, _ in entries], where)
    return entries


def _write_index(path: str, entries: list[tuple[str, int]]) -> None:
    text = "[\n" + ",\n".join(json.dumps({"file": f, "label": y}) for f, y in entries) + "\n]\n"
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)  # atomic: a concurrent reader sees no half-written list
    except OSError as e:
        raise ValueError(
            f"cannot write the image list to {path!r} ({e}); pass index_file= a writable path"
        ) from e


def imagenet_index(
    data_dir: str | os.PathLike,
    split: str = "val",
    *,
    n: int | None = None,
    balanced: bool = False,
    index_file: str | os.PathLike | None = None,
    labels_file: str | os.PathLike | None = None,
) -> tuple[list[tuple[str, int]], str]:
    """The fixed image list ``[(relative path, class index)]`` and the index file holding it.

    Reads ``index_file`` if it exists (``n``, if given, must match its length); otherwise chooses
    ``n`` images with :func:`choose_imagenet` and writes them there. ``index_file`` defaults to
    ``<data_dir>/rnd_jax_val_index_n<n>[_balanced].json``. Decodes nothing.

    Raises:
      ValueError: unknown ``split``; ``n`` missing (with no index file given), not positive, or
        larger than the images available; a malformed index or label file, one naming absent files
        or class indices outside ``[0, 1000)``; an index file that cannot be written.
      DatasetNotPreparedError: ``data_dir`` or the label file does not exist.
    """
    if split not in IMAGENET_SPLITS:
        raise ValueError(f"unknown imagenet split {split!r}; choose one of {IMAGENET_SPLITS}")
    if n is not None:
        _check_n(n)
    if not isinstance(balanced, bool):
        raise ValueError(f"balanced must be a bool, got {balanced!r}")
    if index_file is None and n is None:
        raise ValueError("give n (how many images to choose) or an existing index_file")
    root = _imagenet_root(data_dir)
    if index_file is None:
        index_file = os.path.join(root, f"rnd_jax_val_index_n{n}{'_balanced' * balanced}.json")
    path = os.path.abspath(os.path.expanduser(os.fspath(index_file)))
    if os.path.exists(path):
        entries = _read_index(path, root)
        if n is not None and n != len(entries):
            raise ValueError(
                f"index file {path!r} lists {len(entries)} images, not n={n}; pass its n, "
                "n=None, or another index_file"
            )
        return entries, path
    if n is None:
        raise ValueError(f"index file {path!r} does not exist; give n to choose the images")
    entries = choose_imagenet(imagenet_files(root, labels_file), n, balanced)
    _write_index(path, entries)
    return entries, path


def load_imagenet(
    data_dir: str | os.PathLike,
    split: str = "val",
    *,
    n: int | None = None,
    balanced: bool = False,
    index_file: str | os.PathLike | None = None,
    labels_file: str | os.PathLike | None = None,
    resize: int = 256,
    crop: int = 224,
) -> tuple[np.ndarray, np.ndarray]:
    """A fixed ImageNet val subset: ``(images f32[n,crop,crop,3] in [0,1], labels i32[n])``.

    The images are those of :func:`imagenet_index` (read back from ``index_file`` if it exists,
    else chosen and saved), in its order, preprocessed as in the module docstring: RGB, shorter
    side resized to ``resize`` (bilinear), central ``crop`` x ``crop``. Every argument and the
    whole list are checked before the first image is decoded. Cached for the last two lists;
    read-only.

    Raises:
      ValueError: bad ``resize``/``crop`` (positive ints, ``crop <= resize``), and everything
        :func:`imagenet_index` rejects; an image that cannot be decoded.
      DatasetNotPreparedError: ``data_dir`` or the label file does not exist.
    """
    for arg, v in (("resize", resize), ("crop", crop)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{arg} must be a positive int, got {v!r}")
    if crop > resize:
        raise ValueError(f"crop={crop} is larger than resize={resize}")
    entries, _ = imagenet_index(
        data_dir, split, n=n, balanced=balanced, index_file=index_file, labels_file=labels_file
    )
    return _imagenet_cached(_imagenet_root(data_dir), tuple(entries), resize, crop)


@functools.lru_cache(maxsize=2)
def _imagenet_cached(
    root: str, entries: tuple[tuple[str, int], ...], resize: int, crop: int
) -> tuple[np.ndarray, np.ndarray]:
    images = np.empty((len(entries), crop, crop, 3), np.float32)
    for i, (rel, _) in enumerate(entries):
        pixels = _preprocess(os.path.join(root, rel), resize, crop)
        np.divide(pixels, np.float32(255), out=images[i], dtype=np.float32)
    labels = np.array([y for _, y in entries], np.int32)
    return _freeze(images, labels)


def _preprocess(path: str, resize: int, crop: int) -> np.ndarray:
    """uint8 ``[crop, crop, 3]``: RGB, shorter side to ``resize`` (bilinear), center crop."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except OSError as e:
        raise ValueError(f"cannot decode image {path!r}: {e}") from e
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    if short != resize:
        new_long = int(resize * long / short)
        im = im.resize((resize, new_long) if w <= h else (new_long, resize), Image.BILINEAR)
        w, h = im.size
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    return np.asarray(im.crop((left, top, left + crop, top + crop)), dtype=np.uint8)
