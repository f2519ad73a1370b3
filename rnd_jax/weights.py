"""Import PyTorch weights (local files only) into the Flax models of :mod:`rnd_jax.nets`.

::

    from rnd_jax import nets, weights

    model = nets.wrn28_10()
    params = weights.load_params(model, "checkpoints/Standard.pt", (32, 32, 3))
    logits = model.apply({"params": params}, x)          # x in [0, 1], f32[B, 32, 32, 3]

Reading files
-------------
:func:`load_state_dict` reads ``.pt`` / ``.pth`` / ``.bin`` files with
``torch.load(path, map_location="cpu", weights_only=True)`` (PyTorch is imported only then, so it
is needed only for these formats) and ``.safetensors`` files with
``safetensors.numpy.load_file`` (no PyTorch needed). Nothing is ever downloaded: a missing file
raises :class:`FileNotFoundError` saying where to put it.

:func:`clean_state_dict` (applied by both entry points) turns what was read into
``{name: np.ndarray}``:

* checkpoints that wrap the state dict (``{"state_dict": ...}``, ``{"model": ...}``,
  ``{"net": ...}``, ``{"model_state_dict": ...}``, ``{"state": ...}``, alongside e.g. an epoch
  counter) are unwrapped;
* prefixes shared by every key -- ``module.`` (``DataParallel``), ``model.`` (RobustBench and
  other wrappers), ``_orig_mod.`` (``torch.compile``) -- are stripped, repeatedly;
* BatchNorm's ``num_batches_tracked`` counters are dropped (unused at inference);
* tensors become float32 NumPy arrays.

Name and layout mapping
-----------------------
The flax module names of :mod:`rnd_jax.nets` are the PyTorch module names with each ``.``
next to an index written ``_`` (``layer1_0.downsample_0`` for ``layer1.0.downsample.0``,
``block1_layer_0_bn1`` for ``block1.layer.0.bn1``), so the PyTorch key of a flax leaf is its
path with those underscores turned back into dots and the leaf renamed:

=================  ====================  =========================================
flax leaf          PyTorch name          layout
=================  ====================  =========================================
conv ``kernel``    ``weight``            ``OIHW`` -> ``HWIO`` (``transpose(2, 3, 1, 0)``)
dense ``kernel``   ``weight``            ``[out, in]`` -> ``[in, out]``
``bias``           ``bias``              as is
BN/LN ``scale``    ``weight``            as is
BN ``mean``        ``running_mean``      as is
BN ``var``         ``running_var``       as is
``cls_token``,     same name             as is
``pos_embed``
=================  ====================  =========================================

timm's fused ``attn.qkv`` projection is kept fused (the flax attention splits its output as
timm does, into ``[q; k; v]`` with the heads inside each), so it maps like any linear layer.

:func:`import_params` checks the result completely: every flax parameter must be filled and every
tensor of the state dict used, with matching shapes; otherwise one ``ValueError`` lists the
missing keys, the unexpected keys and the shape mismatches.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rnd_jax import nets

__all__ = [
    "SUPPORTED_MODELS",
    "TORCH_SUFFIXES",
    "clean_state_dict",
    "expected_state_dict_shapes",
    "import_params",
    "load_params",
    "load_state_dict",
    "torch_name",
]

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "state")
PREFIXES = ("module.", "model.", "_orig_mod.")
SUPPORTED_MODELS = (nets.CifarResNet, nets.VGG, nets.WideResNet, nets.ResNet, nets.VisionTransformer)
"""Model classes :func:`import_params` maps (the five architectures of :mod:`rnd_jax.nets`)."""

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
_INDEX_UNDERSCORE = re.compile(r"(?<=\d)_|_(?=\d)")


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _missing_file_message(path: Path) -> str:
    return (
        f"no weights file at {str(path)!r}. Nothing is downloaded: put the PyTorch state_dict there "
        f"({', '.join(TORCH_SUFFIXES)} for torch.save files, {SAFETENSORS_SUFFIX} for safetensors), "
        "or pass the path where it is."
    )


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a local PyTorch state dict file into ``{name: f32 np.ndarray}`` (see the module docstring).

    ``.pt``/``.pth``/``.bin``: ``torch.load(..., map_location="cpu", weights_only=True)``, which
    needs PyTorch; ``.safetensors``: ``safetensors.numpy.load_file``, which does not. The result is
    passed through :func:`clean_state_dict`.

    Raises ``FileNotFoundError`` (saying where to put the file) if ``path`` does not exist,
    ``ValueError`` for another suffix or content that is not a state dict, ``ImportError`` if the
    reader's package is not installed.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
        raise ValueError(
            f"cannot tell the format of {str(path)!r}: expected a {', '.join(TORCH_SUFFIXES)} (torch.save) "
            f"or {SAFETENSORS_SUFFIX} file"
        )
    if not path.is_file():
        raise FileNotFoundError(_missing_file_message(path))
    if suffix == SAFETENSORS_SUFFIX:
        try:
            from safetensors.numpy import load_file
        except ImportError as e:
            raise ImportError(f"reading {SAFETENSORS_SUFFIX} files needs the safetensors package "
                              "(pip install safetensors)") from e
        return clean_state_dict(load_file(str(path)))
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {path.suffix} files needs PyTorch (pip install torch); "
            f"{SAFETENSORS_SUFFIX} files need only the safetensors package"
        ) from e
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    return clean_state_dict(obj)


def _is_array(v) -> bool:
    return isinstance(v, np.ndarray) or (hasattr(v, "shape") and hasattr(v, "dtype") and not isinstance(v, Mapping))


def _to_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch.Tensor (duck-typed: torch is not imported here)
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.float()  # bfloat16 / float16 / float64 -> float32 before NumPy sees it
        v = v.numpy()
    return np.asarray(v)


def clean_state_dict(obj) -> dict[str, np.ndarray]:
    """Unwrap a checkpoint, strip shared wrapper prefixes, drop BN counters, convert to f32 NumPy.

    ``obj`` is what ``torch.load`` / ``safetensors`` returned, or any ``{name: array}`` mapping
    (NumPy arrays or torch tensors). Idempotent. Raises ``ValueError`` if no state dict is found or
    an entry is not an array.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    while obj and not all(_is_array(v) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            bad = sorted(str(k) for k, v in obj.items() if not _is_array(v))
            raise ValueError(
                f"not a state dict: entries {bad[:10]} are not tensors, and none of {list(WRAPPER_KEYS)} "
                "holds a nested state dict"
            )
        obj = inner
    if not obj:
        raise ValueError("the state dict is empty")
    sd = {str(k): v for k, v in obj.items()}
    stripped = True
    while stripped:
        stripped = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                stripped = True
    out = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        a = _to_numpy(v)
        out[k] = a.astype(np.float32) if a.dtype != np.float32 else a
    return out


# ----------------------------------------------------------------------------------------------
# Mapping
# ----------------------------------------------------------------------------------------------


def torch_name(path: Sequence[str]) -> str:
    """PyTorch state-dict key of the flax param at ``path`` (module names..., leaf name)."""
    *modules, leaf = (str(p) for p in path)
    if modules:
        leaf = _LEAF_NAMES.get(leaf, leaf)
    parts = [_INDEX_UNDERSCORE.sub(".", m) for m in modules]
    return ".".join([*parts, leaf])


def _from_torch(a: np.ndarray, leaf: str, flax_ndim: int) -> np.ndarray:
    if leaf == "kernel" and flax_ndim == 4:
        return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a  # OIHW -> HWIO
    if leaf == "kernel" and flax_ndim == 2:
        return a.T if a.ndim == 2 else a  # [out, in] -> [in, out]
    return a


def _check_model(model) -> None:
    if not isinstance(model, SUPPORTED_MODELS):
        raise ValueError(
            f"import_params maps {[c.__name__ for c in SUPPORTED_MODELS]} (rnd_jax.nets), got {type(model).__name__}"
        )


def _check_input_shape(input_shape) -> tuple[int, int, int]:
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"input_shape must be a per-example (H, W, C) tuple of ints, got {input_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be a per-example (H, W, C) with positive sizes, got {input_shape!r}")
    return shape


def _flax_leaves(model, input_shape):
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    abstract = jax.eval_shape(partial(model.init, jax.random.key(0)), x)["params"]
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    return [([str(getattr(p, "key", p)) for p in path], tuple(leaf.shape)) for path, leaf in leaves], treedef


def expected_state_dict_shapes(model, input_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """``{PyTorch key: PyTorch shape}`` that :func:`import_params` needs for ``model`` (no
    ``num_batches_tracked``): compare it with a checkpoint to see what does not fit. Shapes only."""
    _check_model(model)
    leaves, _ = _flax_leaves(model, _check_input_shape(input_shape))
    return {torch_name(names): _to_torch_shape(shape, names[-1]) for names, shape in leaves}


def import_params(model, state_dict, input_shape: Sequence[int]):
    """Flax ``params`` for ``model`` from a PyTorch ``state_dict`` (see the module docstring).

    ``model`` is one of :data:`SUPPORTED_MODELS` (``resnet20``, ``vgg16``, ``wrn28_10``,
    ``resnet50``, ``vit_b16`` and their resized variants); ``state_dict`` a ``{name: tensor}``
    mapping (cleaned with :func:`clean_state_dict`); ``input_shape`` the per-example ``(H, W, C)``
    the model will see (only shapes are traced, no FLOPs spent). Returns the same pytree
    ``model.init`` would, filled with float32 arrays.

    Raises ``ValueError`` for an unsupported model, and one ``ValueError`` naming every missing key
    (a flax param with no tensor), unexpected key (a tensor no param uses) and shape mismatch.
    """
    _check_model(model)
    shape = _check_input_shape(input_shape)
    sd = clean_state_dict(state_dict)
    leaves, treedef = _flax_leaves(model, shape)
    missing, mismatched, values, used = [], [], [], set()
    for names, flax_shape in leaves:
        key = torch_name(names)
        if key not in sd:
            missing.append(key)
            continue
        used.add(key)
        value = _from_torch(sd[key], names[-1], len(flax_shape))
        if value.shape != flax_shape:
            expected = _to_torch_shape(flax_shape, names[-1])
            mismatched.append(f"{key}: file has {tuple(sd[key].shape)}, model needs {expected}")
            continue
        values.append(value)
    unexpected = sorted(set(sd) - used)
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {mismatched}")
        raise ValueError(f"state dict does not fit {type(model).__name__}: " + "; ".join(parts))
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(v, jnp.float32) for v in values])


def _to_torch_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    if leaf == "kernel" and len(shape) == 4:
        h, w, i, o = shape
        return (o, i, h, w)
    if leaf == "kernel" and len(shape) == 2:
        return shape[::-1]
    return shape


def load_params(model, path: str | os.PathLike, input_shape: Sequence[int]):
    """``import_params(model, load_state_dict(path), input_shape)``: params from a local weights file."""
    _check_model(model)
    shape = _check_input_shape(input_shape)
    return import_params(model, load_state_dict(path), shape)
