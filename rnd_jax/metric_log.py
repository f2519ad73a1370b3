"""Metric writers: watch a long sweep while it runs.

A writer receives **records** ``write(kind, step, values)``: ``kind`` names the series (``"cell"``: one
finished cell's metrics, ``step`` its ordinal in the sweep; ``"chunk"``: the progress of a cell run in
chunks, ``step`` the chunk number), ``values`` a flat dict of numbers and strings.

- :class:`JsonlWriter` (the default): one JSON object per line, ``{"time", "kind", "step", **values}``,
  flushed at once, so ``tail -f`` follows a run;
- :class:`TensorBoardWriter`: TensorBoard event files through tensorboardX (``pip install
  "rnd_jax[tensorboard]"``); each numeric value is a scalar tagged ``<kind>/<name>`` — per cell under
  the cell's label for chunk progress (``chunk/<label>/<name>``, other characters than letters, digits
  and ``_.-`` as ``_``);
- :func:`make_writer` builds one by name (``"jsonl"``, ``"tensorboard"``, ``"none"``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import time
from pathlib import Path

WRITERS = ("jsonl", "tensorboard", "none")


class JsonlWriter:
    """Append records to a JSONL file (created with its folder)."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, kind: str, step: int, values: dict) -> None:
        rec = {"time": round(time.time(), 3), "kind": kind, "step": int(step), **_plain(values)}
        self._f.write(json.dumps(rec, allow_nan=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class TensorBoardWriter:
    """Scalars in TensorBoard event files under ``logdir`` (needs tensorboardX)."""

    def __init__(self, logdir):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ValueError('the TensorBoard writer needs tensorboardX: pip install "rnd_jax[tensorboard]" '
                             "(or tensorboardX); the default JSONL log needs nothing") from None
        self._w = SummaryWriter(logdir=str(logdir))

    def write(self, kind: str, step: int, values: dict) -> None:
        prefix = kind if kind != "chunk" else f"chunk/{_tag(str(values.get('label') or values.get('id')))}"
        for name, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self._w.add_scalar(f"{prefix}/{name}", float(v), int(step))
        self._w.flush()

    def close(self) -> None:
        self._w.close()


class NullWriter:
    def write(self, kind: str, step: int, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


def check_writer(name: str) -> None:
    """``ValueError`` unless :func:`make_writer` can build writer ``name`` (known; tensorboardX importable)."""
    if name not in WRITERS:
        raise ValueError(f"unknown metric writer {name!r}; choose one of {WRITERS}")
    if name == "tensorboard":
        try:
            if importlib.util.find_spec("tensorboardX") is None:
                raise ImportError
        except ImportError:
            raise ValueError('the TensorBoard writer needs tensorboardX: pip install "rnd_jax[tensorboard]" '
                             "(or tensorboardX); the default JSONL log needs nothing") from None


def make_writer(name: str, out) -> JsonlWriter | TensorBoardWriter | NullWriter:
    """The writer ``name`` of :data:`WRITERS` for a run into folder ``out`` (``log.jsonl`` / ``tensorboard/``)."""
    check_writer(name)
    if name == "jsonl":
        return JsonlWriter(Path(out) / "log.jsonl")
    if name == "tensorboard":
        return TensorBoardWriter(Path(out) / "tensorboard")
    return NullWriter()


def _tag(name: str) -> str:
    """A TensorBoard tag part: characters other than letters, digits, ``_ . -`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


def _plain(values: dict) -> dict:
    """JSON-safe values: non-finite floats become None."""
    out = {}
    for k, v in values.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out
