"""Image-classification datasets as numpy arrays.

``load(name, split, data_dir) -> (images, labels)`` with ``images`` float32 ``[N, H, W, C]`` in
``[0, 1]`` and ``labels`` int32 ``[N]``. ``info(name)`` gives shape and class count without loading.

Datasets (all 10 classes, splits ``"train"`` / ``"test"``):

=================  ===========  ==============  ==============================================
name               image shape  train / test    source
=================  ===========  ==============  ==============================================
``digits``         8x8x1        1437 / 360      scikit-learn's bundled copy (no download);
                                                stratified 80/20 split, ``random_state=0``
``mnist``          28x28x1      60000 / 10000   tensorflow-datasets, prepared ``array_record``
``fashion_mnist``  28x28x1      60000 / 10000   tensorflow-datasets, prepared ``array_record``
``cifar10``        32x32x3      50000 / 10000   tensorflow-datasets, prepared ``array_record``
=================  ===========  ==============  ==============================================

The tfds datasets are read with ``tfds`` random-access data sources, which need neither
TensorFlow nor network access, but only work on a dataset that is already prepared on disk in
``array_record`` format: ``<data_dir>/<name>/<version>/`` holding ``dataset_info.json``,
``features.json`` and ``<name>-<split>.array_record-*`` shards. ``data_dir`` defaults to
``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets`` (read at call time). Nothing is ever downloaded
here: a missing or TFRecord-only dataset raises :class:`DatasetNotPreparedError` at once.

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

Loaded arrays are cached in-process per ``(name, split, data_dir)`` and returned read-only (the
same objects on every call); copy them (``np.array(x)``) before modifying in place.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")
SPLITS = ("train", "test")

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
}


class DatasetNotPreparedError(FileNotFoundError):
    """A tfds dataset is absent from ``data_dir`` or not stored in ``array_record`` format.

    Raised before any download is attempted; the message says where the loader looked and how to
    prepare the dataset.
    """


def info(name: str) -> DatasetInfo:
    """Shape and class count of dataset ``name``, without reading any data."""
    _check_name(name)
    return _INFO[name]


def load(
    name: str = "digits", split: str = "train", data_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load ``split`` of dataset ``name`` as ``(images f32[N,H,W,C] in [0,1], labels i32[N])``.

    ``data_dir`` is the tfds root directory (ignored for ``digits``); ``None`` means
    ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``. Results are cached per
    ``(name, split, resolved data_dir)`` and are read-only.

    Raises:
      ValueError: unknown ``name`` or ``split``, or data on disk that does not match ``info(name)``.
      DatasetNotPreparedError: a tfds dataset is not prepared (in ``array_record``) under
        ``data_dir``; raised immediately, never after a download attempt.
    """
    _check_name(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    root = None if name == "digits" else _resolve_data_dir(data_dir)
    return _load_cached(name, split, root)


def clear_cache() -> None:
    """Drop all arrays cached by :func:`load`."""
    _load_cached.cache_clear()


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")


def _resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
    """Absolute tfds root: ``data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
    if data_dir is None:
        data_dir = os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets")
    path = os.path.expanduser(os.fspath(data_dir))
    return path if "://" in path else os.path.abspath(path)  # leave gs:// etc. untouched


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _digits(split) if name == "digits" else _tfds(name, split, data_dir)
    spec = _INFO[name]
    if images.shape[1:] != spec.image_shape or labels.shape != images.shape[:1]:
        raise ValueError(
            f"{name}/{split}: got images {images.shape}, labels {labels.shape}; "
            f"expected [N, {', '.join(map(str, spec.image_shape))}] and [N]"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise ValueError(f"{name}/{split}: labels outside [0, {spec.num_classes})")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


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


def _prepared_builder(name: str, data_dir: str):
    """The tfds builder for ``name`` under ``data_dir``, checked to be readable offline."""
    import tensorflow_datasets as tfds

    # Constructing a registered builder only computes paths; it reads local files at most.
    builder = tfds.builder(name, data_dir=data_dir)
    hint = _prepare_hint(name, data_dir, builder.version)
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
            f"dataset {name!r} version {builder.version} is not prepared under {data_dir!r} "
            f"(no dataset_info.json/features.json in {builder.data_dir}).{other} "
            "Nothing is downloaded automatically.\n" + hint
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
