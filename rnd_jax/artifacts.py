"""What a run learned, kept next to its results: per-cell arrays, and carry snapshots of long cells.

**Cell artifacts** (:func:`cell_arrays`, :func:`write`, :func:`read`): one compressed ``.npz`` per cell,
``<results folder>/artifacts/<cell id>.npz``, written atomically before the cell's line in
``results.jsonl`` (so a recorded cell always has its artifact); the experiments write one per row of
their table, ``<out>/artifacts/<row>.npz`` (e.g. ``sigma=0.001.npz``), before the row's line in
``rows.jsonl``. Per image, in selection order:

====================  ==========================================================================
``x_adv``             f32[n, H, W, C]: the attack's final point
``index``             i32[n]: the image's index in the test split
``label``, ``target`` i32[n] (target -1 when untargeted)
``queries``           i32[n]: budgeted queries; ``loss_queries``, ``check_queries``, ``steps``, ``claims``
``lucky``             bool[n]: the attack's own verdict at its last step; ``stopped_success``: the stop rule's
``success*``          bool[n]: every success notion of the protocol (``success`` = majority of the
                      defended checks within eps, ``success_stop``, ``success_clean``, ``success_lucky``)
``invalid``           bool[n]: stopped on a non-finite answer
``check_votes``       f32[n]: share of the 9 defended check queries of ``x_adv`` that are adversarial
``clean_pred``        i32[n]: the clean model's class of ``x_adv``
``scores_defended``   f32[n, K]: the defended answer at ``x_adv`` for check query 0 (the first vote; sweeps)
``scores_clean``      f32[n, K]: the clean model's probabilities at ``x_adv``
``trace_queries``     i32[n, T]: queries spent before each recorded step (-1: slot unused)
``trace_loss``        f32[n, T]: the attack's loss at that step (NaN: unused)
``trace_claimed``     bool[n, T]: the attack's own verdict after that step (its success belief)
``trace_l2``          f32[n, T]: ``||x - x0||_2`` after that step; ``trace_linf``: ``||x - x0||_inf``
``cell_id``           str: the cell's id (a check that the file belongs to the cell; empty for experiments)
====================  ==========================================================================

The trace has ``T = min(256, budget / cost)`` slots, one every ``ceil(steps / T)`` steps
(:func:`rnd_jax.attacks.driver.trace_stride`). A cell of ``n`` images of ``d = H*W*C`` floats takes
about ``n * (4 d + 17 * 256 + 8 K)`` bytes before compression: 0.5 MB for 100 digits images, 1.6 MB
for CIFAR-10, 60 MB for 100 ImageNet images at 224 (``--no-artifacts`` turns them off).

**Snapshots** (:func:`save_carry`, :func:`load_carry`): the driver's batched carry of a cell run in
chunks (:class:`rnd_jax.evaluate.Chunked`), one ``.npz`` per cell under ``snapshots/``, written
atomically after each chunk and removed when the cell is recorded. A killed run resumes the cell from
its last snapshot and ends with the uninterrupted run's result (the driver's N-then-M-steps property).
The carry is saved as its flat list of leaves (PRNG keys as their key data) and restored onto the
structure of a freshly started carry, whose leaf shapes and dtypes it must match.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import zipfile
from pathlib import Path

import jax
import numpy as np

ARTIFACTS = "artifacts"
SNAPSHOTS = "snapshots"
_KEY_PREFIX = "key:"  # a leaf saved as the key data of a typed PRNG key array of this impl


def artifact_path(out, cell_id: str) -> Path:
    return Path(out) / ARTIFACTS / f"{cell_id}.npz"


def row_path(out, *parts) -> Path:
    """``<out>/artifacts/<parts joined by '-'>.npz`` for an experiment's row: floats as ``:g``, other parts as
    ``str``, characters outside ``[A-Za-z0-9._+-]`` replaced by ``_``."""
    name = "-".join(f"{p:g}" if isinstance(p, float) else str(p) for p in parts)
    return Path(out) / ARTIFACTS / (re.sub(r"[^A-Za-z0-9._+-]", "_", name) + ".npz")


def snapshot_path(out, cell_id: str) -> Path:
    return Path(out) / SNAPSHOTS / f"{cell_id}.npz"


def write(path, arrays: dict) -> None:
    """Write ``arrays`` (name -> array) to ``path`` as a compressed ``.npz``, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **{k: np.asarray(v) for k, v in arrays.items()})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read(path) -> dict[str, np.ndarray]:
    """The arrays of an artifact or snapshot file; ``ValueError`` naming the file if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no artifact file {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def cell_arrays(cell_id: str, sel, res, votes, clean_pred, scores_defended, scores_clean,
                successes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The artifact of one cell (module docstring) from its selection, driver Result and judgement."""
    n = len(sel.labels)

    def arr(a, dtype, default=None):
        return np.asarray(default if a is None else a, dtype)

    out = {
        "cell_id": np.asarray(cell_id),
        "x_adv": arr(res.x_adv, np.float32),
        "index": arr(sel.index, np.int32), "label": arr(sel.labels, np.int32), "target": arr(sel.targets, np.int32),
        "queries": arr(res.queries, np.int32), "loss_queries": arr(res.loss_queries, np.int32),
        "check_queries": arr(res.check_queries, np.int32), "steps": arr(res.steps, np.int32),
        "claims": arr(res.claims, np.int32), "lucky": arr(res.lucky, bool),
        "stopped_success": arr(res.success, bool), "invalid": arr(res.invalid, bool, np.zeros(n, bool)),
        "check_votes": arr(votes, np.float32), "clean_pred": arr(clean_pred, np.int32),
        "trace_queries": arr(res.trace_queries, np.int32), "trace_loss": arr(res.trace_loss, np.float32),
    }
    for name, value in (("scores_defended", scores_defended), ("scores_clean", scores_clean)):
        if value is not None:
            out[name] = arr(value, np.float32)
    for name in ("trace_claimed", "trace_l2", "trace_linf"):
        value = getattr(res, name, None)
        if value is not None:
            out[name] = arr(value, bool if name == "trace_claimed" else np.float32)
    for name, flags in successes.items():
        out[name] = np.asarray(flags, bool)
    return out


def check_cell(arrays: dict, cell_id: str, path) -> dict:
    """``arrays`` if they are the artifact of ``cell_id`` (else ``ValueError``)."""
    found = str(arrays.get("cell_id", ""))
    if found != cell_id:
        raise ValueError(f"{path} is the artifact of cell {found!r}, not of {cell_id!r}")
    return arrays


# ----------------------------------------------------------------------------- snapshots of a cell's carry

def save_carry(path, carry, meta: dict) -> None:
    """Write the (batched) driver carry and ``meta`` (JSON-able) to ``path``, atomically."""
    leaves = jax.tree.leaves(carry)
    arrays, kinds = {}, []
    for i, leaf in enumerate(leaves):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            kinds.append(_KEY_PREFIX + str(jax.random.key_impl(leaf)))
            leaf = jax.random.key_data(leaf)
        else:
            kinds.append("array")
        arrays[f"leaf{i}"] = np.asarray(leaf)
    arrays["meta"] = np.asarray(json.dumps({**meta, "kinds": kinds}))
    write(path, arrays)


def load_carry(path, like):
    """``(carry, meta)`` from a :func:`save_carry` file, restored onto the structure of ``like`` (a freshly
    started carry of the same run); ``None`` if there is no file. ``ValueError`` if it does not match."""
    path = Path(path)
    if not path.exists():
        return None
    z = read(path)
    meta = json.loads(str(z["meta"]))
    leaves, treedef = jax.tree.flatten(like)
    kinds = meta.get("kinds", [])
    if len(kinds) != len(leaves):
        raise ValueError(f"snapshot {path} has {len(kinds)} arrays, this cell's run has {len(leaves)}: it belongs "
                         f"to another version of the run; delete it to start the cell afresh")
    restored = []
    for i, (kind, ref) in enumerate(zip(kinds, leaves)):
        a = z[f"leaf{i}"]
        is_key = jax.dtypes.issubdtype(ref.dtype, jax.dtypes.prng_key)
        want = jax.random.key_data(ref) if is_key else ref
        if is_key != kind.startswith(_KEY_PREFIX) or a.shape != want.shape or a.dtype != want.dtype:
            raise ValueError(f"snapshot {path} does not match this cell's run (array {i}: {a.dtype}{list(a.shape)} "
                             f"vs {want.dtype}{list(want.shape)}); delete it to start the cell afresh")
        restored.append(jax.random.wrap_key_data(a, impl=kind[len(_KEY_PREFIX):]) if is_key else a)
    return jax.tree.unflatten(treedef, restored), meta
