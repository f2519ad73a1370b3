"""Shared plumbing of the experiments: results folders, JSON/CSV writing, tables."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path


def clean_json(obj):
    """Replace NaN/inf floats by None (strict JSON), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    return obj


def write_json(path: Path, obj) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(clean_json(obj), indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(r.get(k), float) and not math.isfinite(r[k]) else r.get(k)) for k in columns})


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table; columns are (key, header, format spec)."""
    def cell(r, key, spec):
        v = r.get(key)
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "-"
        return format(v, spec)

    body = [[cell(r, k, s) for k, _, s in columns] for r in rows]
    heads = [h for _, h, _ in columns]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(heads)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return "\n".join([line(heads), line(["-" * w for w in widths])] + [line(b) for b in body])
