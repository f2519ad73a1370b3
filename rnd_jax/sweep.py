"""Sweeps: grids of protocol cells, sharded over devices, with resumable JSONL results.

A **grid** is a plain dict (a JSON file, or a built-in of :mod:`rnd_jax.grids`)::

    {
      "name": "nes_sigma",
      "datasets": ["digits"],                      # or {"dataset": "digits", "model": "digits_cnn", "train_seed": 0,
                                                   #     "train": {"adv_eps": 0.1}, "label": "pgd_at"}
      "attacks": [                                 # names are looked up in the attack registry at run time
        {"name": "nes", "config": {"samples": 50}, "sweep": {"beta": [1e-3, 1e-2]}, "eot": [1, 10]},
        "square_linf"                              # a bare name = the attack with its defaults
      ],
      "defenses": [
        "none",
        {"name": "output_noise", "levels": [1e-3, 1e-2]},
        {"name": "feature_noise", "drops": [0.01, 0.02], "sweep": {"layers": ["conv2", "fc1"]}}
      ],
      "targeted": [true],                          # a bool or a list of bools
      "budgets": [10000],                          # default: each attack's registry battery budget
      "norm": "linf", "eps": 0.3,                  # threat model of every attack (default: each battery's)
      "n_images": 100, "seeds": [0],
      "check_queries": 9, "acc_draws": 40, "calib_draws": 20,
      "stop_rule": "single",                       # "single" | "verified" | "clean" (rnd_jax.evaluate)
      "count_checks": false,                       # verified: check queries count against the budget
      "pool": "correct", "balanced": false,        # image selection (rnd_jax.evaluate.select_images)
      "tap": false,                                # every query seen on the host: p_mis, l2_query (one image at a time)
      "eot_budget": "equal",                       # "scaled": a cell with EOT M gets M x the budget
      "smoke": {"n_images": 4, "budgets": [500]},  # top-level overrides for --smoke
      "full": {"n_images": 1000},                  # ... and for --full
      "table": {...}                               # how experiments.paper_tables lays the results out
    }

The protocol keys (``stop_rule``, ``count_checks``, ``pool``, ``balanced``, ``check_queries``,
``acc_draws``) are those of :class:`rnd_jax.evaluate.Protocol`; each built-in grid sets its paper's.
``tap``: run the cell's images one at a time through :func:`rnd_jax.evaluate.tap_scorer`, which sees
every query on the host, for ``p_mis`` (SND Table 4) and ``l2_query`` (the last query image, SND Table
3); the other metrics are those of the batched run (an image alone replays what it does in a batch: the
same keys, queries and decisions, floats to about 1e-6 — in long decision-attack runs that rounding can
still flip a last answer at the boundary for an image or two). Every
cell also reports ``p_mis_clean``: the share of clean test images whose defended class differs from the
clean one, averaged over ``acc_draws`` draws.
``eot_budget``: ``"equal"`` keeps every cell at the grid's budget (EOT M then takes M times fewer
steps); ``"scaled"`` gives a cell with EOT M the budget ``M x budget`` (the papers' repeated-query
tables: RFD's "M x 1000", SND's "2K x T", Aithal & Li's N-fold query counts).

It expands (:func:`expand`) to the product dataset/model × seed × targeted × budget × attack entry
(× its ``sweep`` values × ``eot``) × defense entry (× its option ``sweep`` × levels or calibrated
accuracy drops), in that order, so cells that differ only in the noise level are adjacent and share
one compiled program (calibratable levels are passed to the jitted runner as traced values).
Everything is validated before any cell runs (:func:`plan`): unknown keys, empty axes, unknown
attack / defense / dataset / model names, attack configs the attack's config class rejects (e.g. a
norm the attack does not support, a bool for a number), goals the attack does not support, invalid
levels or options (a bool or a string for a level, a number for a boolean option or a bool inside a
numeric one), wrong types anywhere (``attacks`` / ``defenses`` not lists, names and labels not
strings, ``smoke`` / ``full`` / ``table`` blocks that are not dicts of known keys, at every size),
ints outside int32 (budgets, also after EOT scaling and with one step added; seeds, counts), names
that would write outside the results folder (a grid name or label with a path separator, ``.`` or
``..``), budgets smaller than one step of the (EOT-wrapped) attack, and more images than can be
selected: with the trained model at hand, each selection is made as the run will make it (too few
correctly classified images, overall or of a class); before it is trained, ``n_images`` is bounded by
the test split and a note says so (:func:`run_sweep` trains it and checks again before any cell runs).
The message names the entry.

A dataset entry's ``train`` dict trains its model with any :class:`rnd_jax.train.TrainConfig` field (but the
seed, which is ``train_seed``): PGD-AT, RND-GF, RSE, PNI, augmentation, ...; it is validated by the config and
the model it builds, canonical (fields at their defaults dropped), part of the cell (so of its id; cells
without it keep their ids) and of the checkpoint's cache key. Its ``label`` (default: the non-default fields)
is appended to the cell labels as ``[label]`` (and to the ``model`` column of :func:`flat` rows). An entry's own
``defenses`` list (same format as the grid's) replaces the grid's defense axis for that model, e.g. ``rse`` for
the RSE-trained model only. The attacks' surrogate models stay the clean ones.

**Cells and keys.** A cell is the canonical JSON of (dataset, model, train_seed[, train], attack name +
config overrides + eot M, defense name + level or calibrated drop + options, targeted, budget,
n_images, seed, protocol constants). Its id is the first 16 hex digits of the sha256 of that JSON,
so it does not depend on the grid a cell came from or on its position. Keys (DESIGN.md, "Keys and
replay"): ``k_cells, k_data, k_calib, k_acc = split(key(seed), 4)``; :func:`root_key` is ``k_cells``
and the cell's key is ``fold_in(root_key(seed), int(id[:8], 16) & 0x7fffffff)``, split into the
attacker and defender streams that :func:`rnd_jax.evaluate.image_keys` folds per image index. The
images (and targets) come from ``k_data`` alone, so every cell of a seed attacks the same images;
calibrations use ``k_calib`` and the defended clean accuracy ``k_acc``.

**Running a cell** is the protocol of :mod:`rnd_jax.evaluate` (``make_runner``, ``summarize``,
``per_image``): its images run as ONE batch, sharded over every device on a 1-D mesh
(``jax.sharding.Mesh(jax.devices(), ("images",))``, inputs placed with
``NamedSharding(mesh, P("images"))``, results gathered replicated). The image count is padded to
a multiple of the device count with copies of the first image, which are dropped before any
metric. Images are independent under ``vmap``, so the results equal a one-device run (checked on
CPU with ``--xla_force_host_platform_device_count=4``).

**Results** go to ``<out>/results.jsonl``: one JSON line per finished cell (``id``, ``cell``,
resolved attack config and level, metrics, defended accuracy, per-image records), written with
one ``write`` then ``flush`` and ``fsync``. A re-run of the same grid skips the cells whose
complete records are there (:func:`check_record`: every field a run writes, and an ``id`` that is
the hash of the record's own ``cell``), so a killed sweep resumes where it stopped. Any other line
(cut short by a kill, not JSON, incomplete, filed under another cell's id, a second record of a
cell) is reported, moved to ``results.rejected.jsonl`` with its reason, and its cell re-run. Lines
hold nothing that depends on timing or device count, so an interrupted-and-resumed sweep writes the
same lines as an uninterrupted one (in cell order); wall-clock times go to ``timing.jsonl``.
``sweep.json`` records the resolved grid and cell ids.

**Runs sharing a folder.** Two sweeps (or ``experiments.paper_tables`` runs whose grids share cells)
may run into one ``out`` at once, on one host or on hosts sharing a disk with working ``fcntl``
locks: every read-to-decide and write of the folder's files holds ``<out>/.lock``; a run claims a
cell (an exclusive lock on ``<out>/.claims/<id>``, let go when the cell is written or the run dies)
and re-reads the results before running it. A cell another run holds is left for later, then waited
for (and run here if that run died), so each cell runs and is written once and every run returns
every record. Every whole-file write (``sweep.json``, the tables) goes to a temporary file of a
unique name in the same folder and is renamed over the old one (:func:`write_atomic`).

**Several processes** (``jax.distributed``; ``experiments.sweep --distributed``): every process
expands the same grid and runs every cell together (the mesh spans the devices of all processes);
process 0 alone reads and writes the results folder and claims cells, and broadcasts which cells
to run, so all processes enter the same programs in the same order and the lines equal a
one-process run's (tested with two CPU processes joined on localhost). Each process restores the
cached models onto its own device, so every model must be trained beforehand (one process).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import itertools
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.tree_util import Partial
from jax.sharding import PartitionSpec as P

from rnd_jax import artifacts, autoencoder, data, metric_log, models, pytree, train
from rnd_jax.attacks import ATTACKS, Context, get_spec
from rnd_jax.attacks.adaptive import eot as eot_wrap
from rnd_jax.attacks.registry import BATTERY_EPS
from rnd_jax.calibrate import calibrate
from rnd_jax.compact import compacted
from rnd_jax.defenses import DEFENSES, FEATURE_STD, build_defense, check_level, model_scorer, with_feature_std
from rnd_jax.evaluate import (Chunked, Protocol, QueryTap, check_success, compile_runner, defended_accuracy,
                              image_keys,
                              make_chunked_runner, make_runner, make_tapped_runner, per_image, run_tapped,
                              select_images, success_key, successes, summarize, validate_selection)
from rnd_jax.evaluate import predict as evaluate_predict
from rnd_jax.evaluate import within_eps
from rnd_jax.oracle import Oracle, query_keys

__all__ = ["Cell", "GRID_KEYS", "SIZES", "Sweeper", "cell_key", "check_record", "expand", "flat", "load_grid",
           "missing_attacks", "plan", "read_results", "resolve", "root_key", "run_sweep", "without_attacks",
           "write_atomic"]

SIZES = ("smoke", "default", "full")
GRID_KEYS = ("name", "description", "datasets", "attacks", "defenses", "targeted", "budgets", "norm", "eps",
             "n_images", "seeds", "check_queries", "acc_draws", "calib_draws", "stop_rule", "count_checks", "pool",
             "balanced", "tap", "eot_budget", "smoke", "full", "table")
EOT_BUDGETS = ("equal", "scaled")
ATTACK_KEYS = ("name", "config", "sweep", "eot", "label")
DEFENSE_KEYS = ("name", "levels", "drops", "options", "sweep", "label")
DATASET_KEYS = ("dataset", "model", "train_seed", "train", "label", "defenses")
TABLE_KEYS = ("mirrors", "title", "rows", "cols", "col_name", "values", "note")
RESULTS = "results.jsonl"
REJECTED = "results.rejected.jsonl"
TIMING = "timing.jsonl"
LOCK = ".lock"  # fcntl lock of the folder's files (results, timing, sweep.json)
CLAIMS = ".claims"  # one lock file per cell: held by the run that is running it
INT32_MAX = 2**31 - 1
BOOL_OPTIONS = ("postprocess", "clip")  # defense options that are booleans (every other option is not)


# ----------------------------------------------------------------------------- grids

def load_grid(spec) -> dict:
    """A grid from a dict, a JSON file path, or the name of a built-in grid (:data:`rnd_jax.grids.GRIDS`)."""
    from rnd_jax.grids import GRIDS

    if isinstance(spec, dict):
        return copy.deepcopy(spec)
    path = Path(str(spec))
    if path.suffix == ".json" or path.exists():
        if not path.exists():
            raise ValueError(f"grid file {str(path)!r} does not exist")
        try:
            grid = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"grid file {str(path)!r} is not valid JSON: {e}") from None
        if not isinstance(grid, dict):
            raise ValueError(f"grid file {str(path)!r} must hold a JSON object")
        grid.setdefault("name", path.stem)
        return grid
    if spec in GRIDS:
        return copy.deepcopy(GRIDS[spec])
    raise ValueError(f"unknown grid {spec!r}: not a file, and not a built-in grid ({sorted(GRIDS)})")


def resolve(grid: dict, size: str = "default") -> dict:
    """The grid at ``size``: its ``smoke`` / ``full`` block (if any) overrides top-level keys."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {SIZES}")
    if not isinstance(grid, dict):
        raise ValueError(f"a grid must be a dict, got {type(grid).__name__}")
    grid = copy.deepcopy(grid)
    blocks = {s: grid.pop(s, None) for s in ("smoke", "full")}
    for s, block in blocks.items():  # both blocks are checked whatever the size
        if block is None:
            continue
        if not isinstance(block, dict):
            raise ValueError(f"grid {grid.get('name', '?')!r}: '{s}' must be a dict of top-level overrides, got "
                             f"{type(block).__name__}")
        bad = sorted(map(str, set(block) - (set(GRID_KEYS) - {"smoke", "full"})))
        if bad:
            raise ValueError(f"grid {grid.get('name', '?')!r}: unknown key(s) {bad} in its '{s}' block "
                             f"(valid: the top-level keys except 'smoke' and 'full')")
    block = blocks.get(size)
    if block is not None:
        grid.update(copy.deepcopy(block))
    return grid


def _entry_name(a):
    """The name of an axis entry (a name or a dict with a 'name'), or None."""
    n = a if isinstance(a, str) else (a.get("name") if isinstance(a, dict) else None)
    return n if isinstance(n, str) else None


def missing_attacks(grid: dict) -> list[str]:
    """Attack names of ``grid`` (any size) that are not in the attack registry now."""
    names = []
    for g in (grid, grid.get("smoke"), grid.get("full")):
        if isinstance(g, dict) and isinstance(g.get("attacks"), list):
            for a in g["attacks"]:
                n = _entry_name(a)
                if n is not None and n not in ATTACKS and n not in names:
                    names.append(n)
    return names


def without_attacks(grid: dict, names) -> dict:
    """``grid`` (and its size blocks) with the attack entries named in ``names`` removed."""
    grid = copy.deepcopy(grid)
    names = set(names)
    for g in (grid, grid.get("smoke"), grid.get("full")):
        if isinstance(g, dict) and isinstance(g.get("attacks"), list):
            g["attacks"] = [a for a in g["attacks"] if _entry_name(a) is None or _entry_name(a) not in names]
    return grid


def _canon(obj):
    """JSON-canonical copy (tuples -> lists, numpy scalars -> Python)."""
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (tuple, set)):
        return list(o)
    raise TypeError(f"not JSON serializable: {o!r}")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One protocol run. ``spec`` is its canonical JSON text; ``id`` hashes it."""

    spec: str
    label: str = dataclasses.field(default="", compare=False)

    @classmethod
    def make(cls, d: dict, label: str = "") -> "Cell":
        return cls(json.dumps(_canon(d), sort_keys=True, separators=(",", ":")), label)

    @property
    def id(self) -> str:
        return hashlib.sha256(self.spec.encode()).hexdigest()[:16]

    @property
    def d(self) -> dict:
        return json.loads(self.spec)


def _as_list(grid_name, key, value, default=None):
    if value is None:
        value = default
    if value is None:
        return None
    if not isinstance(value, list):
        value = [value]
    if not value:
        raise ValueError(f"grid {grid_name!r}: axis '{key}' is empty")
    return value


def _int(where, value, minimum=1, maximum=INT32_MAX):
    """``value`` if it is an int (not a bool) in ``[minimum, maximum]`` (default: within int32, the range of the
    compiled programs' counters and of the seeds' keys)."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ValueError(f"{where} must be an int in [{minimum}, {maximum}], got {value!r}")
    return value


def _safe_name(where, value):
    """``value`` if it is a non-empty string that names nothing outside a folder (no path separator, not '.' or
    '..', no control character): grid names become folder names, labels may become file names."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where} must be a non-empty string, got {value!r}")
    if "/" in value or "\\" in value or value in (".", "..") or any(ord(ch) < 32 for ch in value):
        raise ValueError(f"{where} {value!r} would name a path outside the results folder: no '/', '\\', "
                         f"control characters, '.' or '..'")
    return value


def _no_bools(where, value):
    """Raise if ``value`` is or holds a bool (a number option given as true/false)."""
    if isinstance(value, bool):
        raise ValueError(f"{where} must not be a bool, got {value!r}")
    if isinstance(value, (list, tuple)):
        for v in value:
            _no_bools(where, v)
    if isinstance(value, dict):
        for v in value.values():
            _no_bools(where, v)


def _check_option(where, key, value):
    """A defense option's type: the boolean options are bools, no other option is or holds one."""
    if key in BOOL_OPTIONS:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: option {key!r} must be a bool (true/false), got {value!r}")
    else:
        _no_bools(f"{where}: option {key!r}", value)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where}: option {key!r} must be finite, got {value!r}")


def _product(sweep: dict, where: str):
    if not isinstance(sweep, dict) or not all(isinstance(k, str) for k in sweep):
        raise ValueError(f"{where}: 'sweep' must be a dict of key -> list of values")
    keys = sorted(sweep)
    for k in keys:
        if not isinstance(sweep[k], list) or not sweep[k]:
            raise ValueError(f"{where}: sweep axis {k!r} is empty (or not a list)")
    return [dict(zip(keys, vals)) for vals in itertools.product(*(sweep[k] for k in keys))]


def _axis_entries(grid: dict, name: str, axis: str, valid_keys):
    """Yield ``(index, entry dict, where)`` for the grid's ``axis`` ("attacks" / "defenses"): a bare name
    becomes ``{"name": ...}``; a missing axis, an entry without a name, or unknown keys raise."""
    if axis in grid and not isinstance(grid[axis], list):
        raise ValueError(f"grid {name!r}: {axis!r} must be a list of entries, got {type(grid[axis]).__name__} "
                         f"{grid[axis]!r}")
    entries = _as_list(name, axis, grid.get(axis))
    if entries is None:
        raise ValueError(f"grid {name!r} has no {axis!r} axis")
    for i, e in enumerate(entries):
        e = {"name": e} if isinstance(e, str) else e
        where = f"grid {name!r}: {axis}[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            raise ValueError(f"{where} must be a{'n attack' if axis == 'attacks' else ' defense'} name or a dict "
                             f"with a 'name', got {e!r}")
        where += f" {e['name']!r}"
        bad = sorted(map(str, set(e) - set(valid_keys)))
        if bad:
            raise ValueError(f"{where}: unknown key(s) {bad}; valid: {list(valid_keys)}")
        if e.get("label") is not None:
            _safe_name(f"{where}: label", e["label"])
        yield i, e, where


def _attack_entries(grid: dict, name: str):
    """[(entry index, attack name, overrides, eot, label)] of the grid's attack axis, validated."""
    out = []
    for i, e, where in _axis_entries(grid, name, "attacks", ATTACK_KEYS):
        if e["name"] not in ATTACKS:
            raise ValueError(f"{where}: unknown attack {e['name']!r} (not registered; registered: {sorted(ATTACKS)})")
        config = e.get("config", {})
        if not isinstance(config, dict):
            raise ValueError(f"{where}: 'config' must be a dict")
        eots = _as_list(name, f"attacks[{i}].eot", e.get("eot"), [1])
        for m in eots:
            _int(f"{where}: eot", m)
        for sw in _product(e.get("sweep", {}), where):
            for m in eots:
                out.append((i, e["name"], {**config, **sw}, m, (e.get("label") or e["name"]) + _suffix(sw)))
    return out


def _defense_entries(grid: dict, name: str):
    """[(entry index, family, kind ('level'|'drop'|None), value, options, label)], validated."""
    out = []
    for i, e, where in _axis_entries(grid, name, "defenses", DEFENSE_KEYS):
        fam = e["name"]
        if fam not in DEFENSES:
            raise ValueError(f"{where}: unknown defense {fam!r}; choose one of {sorted(DEFENSES)}")
        options = e.get("options", {})
        if not isinstance(options, dict):
            raise ValueError(f"{where}: 'options' must be a dict")
        for k, v in options.items():
            _check_option(where, k, v)
        has_levels, has_drops = "levels" in e, "drops" in e
        if fam == "none":
            if has_levels or has_drops or options or e.get("sweep"):
                raise ValueError(f"{where}: the undefended model takes no levels, drops or options")
            out.append((i, fam, None, None, {}, e.get("label")))
            continue
        if has_levels == has_drops:
            raise ValueError(f"{where}: give exactly one of 'levels' (noise levels) or 'drops' (calibrated "
                             f"clean-accuracy drops)")
        kind = "level" if has_levels else "drop"
        values = e["levels"] if has_levels else e["drops"]
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}: '{kind}s' is empty (or not a list)")
        spec = DEFENSES[fam]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{where}: {kind}s must be finite numbers (not bools or strings), got {v!r}")
            if kind == "drop":
                if not spec.calibratable:
                    ok = sorted(k for k, s in DEFENSES.items() if s.calibratable)
                    raise ValueError(f"{where}: cannot calibrate {fam!r} to an accuracy drop; calibratable: {ok}")
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                    raise ValueError(f"{where}: accuracy drops must be in (0, 1), got {v!r}")
            elif spec.calibratable:
                try:
                    check_level(spec.param, v)
                except ValueError as err:
                    raise ValueError(f"{where}: {err}") from None
        for sw in _product(e.get("sweep", {}), where):
            for k, v in sw.items():
                _check_option(where, k, v)
            opts = {**options, **sw}
            for v in values:
                v = float(v) if (kind == "drop" or spec.calibratable) else v
                out.append((i, fam, kind, v, opts, (e.get("label") or fam) + _suffix(sw)))
    return out


def _datasets(grid: dict, name: str):
    out = []
    for i, d in enumerate(_as_list(name, "datasets", grid.get("datasets"), ["digits"])):
        d = {"dataset": d} if isinstance(d, str) else d
        where = f"grid {name!r}: datasets[{i}]"
        if not isinstance(d, dict) or not isinstance(d.get("dataset"), str):
            raise ValueError(f"{where} must be a dataset name or a dict with a 'dataset', got {d!r}")
        bad = sorted(set(d) - set(DATASET_KEYS))
        if bad:
            raise ValueError(f"{where}: unknown key(s) {bad}; valid: {list(DATASET_KEYS)}")
        if d.get("model") is not None and not isinstance(d["model"], str):
            raise ValueError(f"{where}: 'model' must be a model name, got {d['model']!r}")
        try:
            ds = data.info(d["dataset"])
            model = d.get("model") or models.DEFAULT_MODEL[d["dataset"]]
            models.get_model(model, ds.num_classes)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        seed = _int(f"{where}: train_seed", d.get("train_seed", 0), 0)
        entry = {"dataset": d["dataset"], "model": model, "train_seed": seed}
        entry.update(_train_entry(d, where, model, ds.num_classes, seed))
        if "defenses" in d:  # this model's own defense axis, validated as the grid's
            entry["defenses"] = _defense_entries({"defenses": d["defenses"]}, f"{name}: datasets[{i}]")
        out.append(entry)
    return out


def _train_entry(d: dict, where: str, model: str, num_classes: int, seed: int) -> dict:
    """``{"train": {...}, "model_label": ...}`` of a dataset entry with a training option (empty without one).

    ``train``: any :class:`rnd_jax.train.TrainConfig` field but ``seed`` (that is ``train_seed``), validated by the
    config and by the model it builds (noise layers); canonical: the fields at their defaults are dropped and
    numbers take the config's types, so equal configs give equal cells. ``label``: a name for the trained model in
    cell labels (default: the non-default fields).
    """
    opts = d.get("train", {})
    if not isinstance(opts, dict) or not all(isinstance(k, str) for k in opts):
        raise ValueError(f"{where}: 'train' must be a dict of rnd_jax.train.TrainConfig fields, got {opts!r}")
    fields = [f.name for f in dataclasses.fields(train.TrainConfig)]
    bad = sorted(set(opts) - set(fields))
    if "seed" in opts:
        raise ValueError(f"{where}: set the training seed with 'train_seed', not train.seed")
    if bad:
        raise ValueError(f"{where}: unknown training option(s) {bad}; valid: {[f for f in fields if f != 'seed']}")
    try:
        cfg = train.TrainConfig(seed=seed, **opts)
        train.build_model(model, num_classes, cfg, data.info(d["dataset"]).image_shape)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: train: {err}") from None
    default = train.TrainConfig(seed=seed)
    canon = {k: _canon(getattr(cfg, k)) for k in sorted(opts) if getattr(cfg, k) != getattr(default, k)}
    out = {"train": canon} if canon else {}
    label = d.get("label")
    if label is not None:
        out["model_label"] = _safe_name(f"{where}: label", label)
    elif canon:
        out["model_label"] = ",".join(f"{k}={v}" for k, v in canon.items())
    return out


def _train_config(c: dict) -> "train.TrainConfig":
    """The training config of a cell's model (``train_seed`` and its ``train`` options)."""
    return train.TrainConfig(seed=c["train_seed"], **c.get("train", {}))


def _model_key(c: dict) -> tuple:
    """What identifies a cell's trained model in the sweeper's caches: (dataset, model, train_seed[, train])."""
    k = (c["dataset"], c["model"], c["train_seed"])
    return k + (json.dumps(c["train"], sort_keys=True),) if c.get("train") else k


def _wants_feature_std(c: dict) -> bool:
    d = c["defense"]
    return d["name"] == "feature_noise" and d.get("options", {}).get("scale") == "std"


def expand(grid: dict) -> list[Cell]:
    """The cells of a resolved grid (see the module docstring), structurally validated.

    Raises ``ValueError`` naming the offending entry for unknown keys or names, empty axes, and
    invalid values. :func:`plan` adds the checks that need the attack configs and models.
    """
    if not isinstance(grid, dict):
        raise ValueError(f"a grid must be a dict, got {type(grid).__name__}")
    name = grid.get("name", "<grid>")
    bad = sorted(map(str, set(grid) - set(GRID_KEYS)))
    if bad:
        raise ValueError(f"grid {name!r}: unknown key(s) {bad}; valid: {list(GRID_KEYS)}")
    if "name" in grid:
        _safe_name("the grid's name", name)
    if not isinstance(grid.get("description", ""), str):
        raise ValueError(f"grid {name!r}: 'description' must be a string, got {grid['description']!r}")
    if "smoke" in grid or "full" in grid:
        grid = resolve(grid, "default")
    _check_table(grid.get("table"), name)
    dsets = _datasets(grid, name)
    seeds = [_int(f"grid {name!r}: seeds", s, 0) for s in _as_list(name, "seeds", grid.get("seeds"), [0])]
    targeted = _as_list(name, "targeted", grid.get("targeted"), [False])
    if not all(isinstance(t, bool) for t in targeted):
        raise ValueError(f"grid {name!r}: 'targeted' must be booleans, got {targeted!r}")
    budgets = _as_list(name, "budgets", grid.get("budgets"), [None])
    for b in budgets:
        if b is not None:
            _int(f"grid {name!r}: budgets", b)
    n_images = _int(f"grid {name!r}: n_images", grid.get("n_images", 100))
    protocol = {k: _int(f"grid {name!r}: {k}", grid.get(k, d)) for k, d in
                (("check_queries", 9), ("acc_draws", 40))}
    protocol.update(_protocol_choices(grid, name))
    eot_budget = grid.get("eot_budget", "equal")
    if eot_budget not in EOT_BUDGETS:
        raise ValueError(f"grid {name!r}: eot_budget must be one of {EOT_BUDGETS}, got {eot_budget!r}")
    calib_draws = _int(f"grid {name!r}: calib_draws", grid.get("calib_draws", 20))
    norm, eps = grid.get("norm"), grid.get("eps")
    if norm is not None and (not isinstance(norm, str) or norm not in BATTERY_EPS):
        raise ValueError(f"grid {name!r}: unknown norm {norm!r}; choose one of {sorted(BATTERY_EPS)}")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps)
                            or eps <= 0):
        raise ValueError(f"grid {name!r}: eps must be a finite number > 0, got {eps!r}")
    attacks = _attack_entries(grid, name)
    grid_defenses = _defense_entries(grid, name)
    cells, seen = [], set()
    for ds, seed, tg, budget in itertools.product(dsets, seeds, targeted, budgets):
        for ai, aname, overrides, m, alabel in attacks:
            spec = ATTACKS[aname]
            where = f"grid {name!r}: attacks[{ai}] {aname!r}"
            if tg and not spec.supports_targeted:
                raise ValueError(f"{where} does not support targeted attacks (grid targeted={targeted})")
            if not tg and not spec.supports_untargeted:
                raise ValueError(f"{where} supports only targeted attacks (grid targeted={targeted})")
            if "targeted" in overrides:
                raise ValueError(f"{where}: set 'targeted' on the grid, not in the attack config")
            threat = {k: spec.battery[k] for k in ("norm", "eps") if k in spec.battery}
            if norm is not None:
                threat = {"norm": norm, "eps": BATTERY_EPS[norm]}
            if eps is not None:
                threat["eps"] = float(eps)
            config = {**threat, **overrides}
            b = budget if budget is not None else spec.battery.get("budget")
            if b is None:
                raise ValueError(f"{where}: no 'budgets' in the grid and no battery budget for the attack")
            if eot_budget == "scaled":
                b = b * m
                if b > INT32_MAX:
                    raise ValueError(f"{where}: budget {b // m} x eot {m} = {b} is beyond the int32 range of the "
                                     f"query counters ({INT32_MAX})")
            for di, fam, kind, value, opts, dlabel in ds.get("defenses", grid_defenses):
                defense = {"name": fam, "options": opts}
                if kind == "level":
                    defense["level"] = value
                elif kind == "drop":
                    defense["drop"] = value
                    defense["calib_draws"] = calib_draws
                d = {"dataset": ds["dataset"], "model": ds["model"], "train_seed": ds["train_seed"],
                     "attack": {"name": aname, "config": config, "eot": m},
                     "defense": defense, "targeted": tg, "budget": b, "n_images": n_images, "seed": seed,
                     "protocol": protocol}
                if "train" in ds:
                    d["train"] = ds["train"]
                label = _label(d, alabel, dlabel) + (f" [{ds['model_label']}]" if "model_label" in ds else "")
                cell = Cell.make(d, label=_safe_name(f"{where}: the cell label", label))
                if cell.id not in seen:
                    seen.add(cell.id)
                    cells.append(cell)
    return cells


def _check_table(table, name: str) -> None:
    """The structure of a grid's ``table`` block (its value keys are checked by ``experiments.paper_tables``)."""
    if table is None:
        return
    where = f"grid {name!r}: table"
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a dict, got {type(table).__name__}")
    bad = sorted(map(str, set(table) - set(TABLE_KEYS)))
    if bad:
        raise ValueError(f"{where}: unknown key(s) {bad}; valid: {list(TABLE_KEYS)}")
    for k in ("rows", "cols", "values"):
        v = table.get(k, [])
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            raise ValueError(f"{where}: {k!r} must be a list of key names (strings), got {v!r}")
    for k in ("mirrors", "title", "col_name", "note"):
        if not isinstance(table.get(k, ""), str):
            raise ValueError(f"{where}: {k!r} must be a string, got {table[k]!r}")


def _protocol_choices(grid: dict, name: str) -> dict:
    """The grid's stop rule and image-selection choices, validated; only those that differ from the default
    (so the cells of grids that keep the defaults keep their ids)."""
    from rnd_jax.attacks.driver import STOP_RULES
    from rnd_jax.evaluate import POOLS

    out = {}
    rule = grid.get("stop_rule", "single")
    if rule not in STOP_RULES:
        raise ValueError(f"grid {name!r}: unknown stop_rule {rule!r}; choose one of {STOP_RULES}")
    pool = grid.get("pool", "correct")
    if pool not in POOLS:
        raise ValueError(f"grid {name!r}: unknown pool {pool!r}; choose one of {POOLS}")
    for k in ("count_checks", "balanced", "tap"):
        if not isinstance(grid.get(k, False), bool):
            raise ValueError(f"grid {name!r}: {k} must be a bool, got {grid.get(k)!r}")
    for k, v, default in (("stop_rule", rule, "single"), ("pool", pool, "correct"),
                          ("count_checks", grid.get("count_checks", False), False),
                          ("balanced", grid.get("balanced", False), False), ("tap", grid.get("tap", False), False)):
        if v != default:
            out[k] = v
    return out


def _suffix(sw: dict) -> str:
    return "(" + ",".join(f"{k}={v}" for k, v in sorted(sw.items())) + ")" if sw else ""


def _label(d, alabel=None, dlabel=None) -> str:
    a = d["attack"]
    atk = (alabel or a["name"]) + ("" if a["eot"] == 1 else f"+eot{a['eot']}")
    df = d["defense"]
    if df["name"] == "none":
        dfn = "none"
    else:
        dfn = dlabel or df["name"]
        dfn += f"@{df['level']:g}" if "level" in df and isinstance(df["level"], float) else \
            (f"@{df['level']}" if "level" in df else f"@drop{df['drop']:g}")
    return f"{atk} vs {dfn}"


def _attack_config(cell: dict) -> dict:
    return {**cell["attack"]["config"], "targeted": cell["targeted"]}


def _probe_context(ds: dict, data_dir) -> Context:
    """A Context with the real training pool, a stand-in surrogate and an untrained autoencoder of the dataset's
    shapes (attacks are built, never run)."""
    info = data.info(ds)
    x, y = data.load(ds, "train", data_dir=data_dir)
    return Context(jnp.asarray(x), jnp.asarray(y), info.num_classes, surrogate=lambda xx, kk: None,
                   surrogates=(lambda xx, kk: None,),
                   autoencoder=autoencoder.placeholder(info.image_shape))


def plan(cells: list[Cell], data_dir=None, sweeper: "Sweeper | None" = None, train_models: bool = False,
         log: Callable[[str], Any] | None = None) -> dict[str, dict]:
    """Check every cell before any runs; returns ``{id: resolved info}`` (full attack config, cost).

    Builds each distinct attack (configs validated by the attack's config class, Context needs,
    EOT wrapping) against the dataset's training pool, checks its budget covers one step (and, with
    that step, stays within the int32 range of the query counters), and builds each distinct
    fixed-level defense against the model's shapes (levels and options validated).

    Image counts: with a ``sweeper`` whose model of a cell is trained (in its cache, or
    ``train_models``: trained now), each distinct image selection is made exactly as the run will
    make it (so too few correctly classified images, overall or of a class when ``balanced``, fail
    here); otherwise ``n_images`` is bounded by the test split (per class when ``balanced``) and
    ``log`` says that the exact count waits for the trained model. With ``train_models`` the
    surrogate models and autoencoders of the attacks that need one are loaded (or trained) too.
    """
    out, contexts, attacks, defenses = {}, {}, {}, {}
    for cell in cells:
        c = cell.d
        a = c["attack"]
        where = f"cell {cell.label!r} (attack {a['name']!r}, config {a['config']})"
        akey = (c["dataset"], json.dumps(a, sort_keys=True), c["targeted"])
        if akey not in attacks:
            spec = get_spec(a["name"])
            conf = _attack_config(c)
            fields = {f.name for f in dataclasses.fields(spec.config)}
            unknown = sorted(set(conf) - fields)
            if unknown:
                raise ValueError(f"{where}: unknown option(s) {unknown} for attack {a['name']!r}; "
                                 f"valid: {sorted(fields)}")
            try:
                cfg = spec.config(**conf)
            except (ValueError, TypeError) as err:
                raise ValueError(f"{where}: {err}") from None
            if c["dataset"] not in contexts:
                contexts[c["dataset"]] = _probe_context(c["dataset"], data_dir)
            try:
                attack = eot_wrap(spec.build(cfg, contexts[c["dataset"]]), a["eot"])
            except (ValueError, TypeError) as err:
                raise ValueError(f"{where}: {err}") from None
            attacks[akey] = (attack, cfg)
        attack, cfg = attacks[akey]
        if c["budget"] < attack.cost:
            raise ValueError(f"{where}: budget {c['budget']} is smaller than one step of the attack "
                             f"({attack.cost} queries with eot {a['eot']})")
        if c["budget"] + attack.cost > INT32_MAX:
            raise ValueError(f"{where}: budget {c['budget']} plus one step ({attack.cost} queries) is beyond the "
                             f"int32 range of the query counters ({INT32_MAX})")
        d = c["defense"]
        if "level" in d:
            dkey = (c["dataset"], c["model"], json.dumps(c.get("train", {}), sort_keys=True), json.dumps(d, sort_keys=True))
            if dkey not in defenses:
                info = data.info(c["dataset"])
                module = train.build_model(c["model"], info.num_classes, _train_config(c), info.image_shape)
                try:
                    build_defense(d["name"], module, None, d["level"], info.image_shape, **d["options"])
                except (ValueError, TypeError) as err:
                    raise ValueError(f"cell {cell.label!r}: defense {d['name']!r}: {err}") from None
                defenses[dkey] = True
        elif "drop" in d:
            info = data.info(c["dataset"])
            module = train.build_model(c["model"], info.num_classes, _train_config(c), info.image_shape)
            try:
                build_defense(d["name"], module, None, 1e-3, info.image_shape, **d["options"])
            except (ValueError, TypeError) as err:
                raise ValueError(f"cell {cell.label!r}: defense {d['name']!r}: {err}") from None
        out[cell.id] = {"attack_config": _canon(dataclasses.asdict(cfg)), "cost": int(attack.cost)}
    _check_images(cells, data_dir, sweeper, train_models, log)
    return out


def _check_images(cells: list[Cell], data_dir, sweeper, train_models: bool, log) -> None:
    """Every cell's image selection can be made (see :func:`plan`)."""
    splits, noted = {}, set()
    for cell in cells:
        c = cell.d
        p = c["protocol"]
        pool, balanced = p.get("pool", "correct"), p.get("balanced", False)
        where = f"cell {cell.label!r} (n_images {c['n_images']}, pool {pool!r}{', balanced' if balanced else ''})"
        mkey = _model_key(c)
        if sweeper is not None and (train_models or sweeper.has_model(c)):
            try:
                sweeper.selection(c)
                needs = get_spec(c["attack"]["name"]).needs
                if train_models and {"surrogate", "surrogates", "autoencoder"} & set(needs):  # before any cell runs
                    sweeper.context(c, needs)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            continue
        if c["dataset"] not in splits:
            splits[c["dataset"]] = np.asarray(data.load(c["dataset"], "test", data_dir=data_dir)[1])
        y = splits[c["dataset"]]
        k = data.info(c["dataset"]).num_classes
        n = c["n_images"]
        if balanced:
            for cls in range(k):
                quota = n // k + (cls < n % k)
                have = int(np.sum(y == cls))
                if have < quota:
                    raise ValueError(f"{where}: the test split has {have} images of class {cls}; a balanced "
                                     f"selection of {n} needs {quota}")
        elif n > len(y):
            raise ValueError(f"{where}: the test split has only {len(y)} images")
        if mkey not in noted and log is not None:
            noted.add(mkey)
            log(f"note: model {c['model']!r} ({c['dataset']}, train_seed {c['train_seed']}"
                f"{', train ' + json.dumps(c['train']) if c.get('train') else ''}) is not trained yet: "
                f"n_images checked against the {len(y)} test images only; the count of correctly classified ones "
                f"is checked once it is trained, before any cell runs")


# ----------------------------------------------------------------------------- keys

def root_key(seed: int):
    """The root of a seed's cell keys (first of ``split(key(seed), 4)``; see the module docstring)."""
    return jax.random.split(jax.random.key(seed), 4)[0]


def _streams(seed: int):
    """``(k_cells, k_data, k_calib, k_acc)`` of a seed."""
    return tuple(jax.random.split(jax.random.key(seed), 4))


def cell_key(cell: Cell):
    """``fold_in(root_key(seed), int(id[:8], 16) & 0x7fffffff)``."""
    return jax.random.fold_in(root_key(cell.d["seed"]), int(cell.id[:8], 16) & 0x7FFFFFFF)


# ----------------------------------------------------------------------------- results file

RECORD_FIELDS = {"id": str, "label": str, "cell": dict, "attack_config": dict, "cost": int, "metrics": dict,
                 "defended": dict, "images": dict}
METRIC_FIELDS = ("n_images", "n_selected", "asr", "asr_stop", "asr_lucky", "asr_clean", "queries_mean")
DEFENDED_FIELDS = ("acc_clean", "acc_defended_mean", "acc_defended_worst", "p_mis_clean")


def check_record(rec) -> str | None:
    """Why ``rec`` is not a complete result record (None if it is).

    Complete: a dict with every field a run writes, of its type; its ``id`` is the hash of its own
    ``cell`` (so a record edited or cut short, or one for another cell, never passes); the metrics
    and defended accuracy hold their protocol fields, and the per-image lists hold one entry per
    attacked image.
    """
    if not isinstance(rec, dict):
        return f"not a JSON object ({type(rec).__name__})"
    for k, t in RECORD_FIELDS.items():
        if k not in rec:
            return f"no {k!r} field"
        if not isinstance(rec[k], t) or (t is int and isinstance(rec[k], bool)):
            return f"field {k!r} is not a {t.__name__}"
    for k in ("level", "calibration"):
        if k not in rec:
            return f"no {k!r} field"
    try:
        want = Cell.make(rec["cell"]).id
    except (TypeError, ValueError):
        return "its cell is not canonical JSON"
    if rec["id"] != want:
        return f"id {rec['id']!r} is not the hash of its cell ({want})"
    m, d, img = rec["metrics"], rec["defended"], rec["images"]
    missing = [k for k in METRIC_FIELDS if k not in m] + [k for k in DEFENDED_FIELDS if k not in d]
    if missing:
        return f"metrics or defended accuracy lack {missing}"
    n = m["n_images"]
    from rnd_jax.evaluate import SUCCESS_KINDS

    for k in ("queries",) + tuple(success_key(kind) for kind in SUCCESS_KINDS):
        if not isinstance(img.get(k), list) or len(img[k]) != n:
            return f"images[{k!r}] is not a list of its {n} images"
    return None


def _parse_line(line: bytes):
    """``(record, None)`` of a complete record's line, or ``(None, reason)``."""
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"not JSON ({e})"
    why = check_record(rec)
    return (rec, None) if why is None else (None, why)


def _scan(raw: bytes):
    """``(good, rejected)`` of a results file's bytes: ``good`` = [(id, record, line bytes)] (first of
    duplicates), ``rejected`` = [(line number, text, reason)]; a last line without its newline is rejected
    as cut short."""
    good, rejected, first = [], [], {}
    lines = raw.split(b"\n")
    for no, line in enumerate(lines, 1):
        if no == len(lines):
            if line:
                rejected.append((no, line, "partial last line (its writer was stopped mid-write)"))
            break
        if not line.strip():
            continue
        rec, why = _parse_line(line)
        if why is None and rec["id"] in first:
            why = f"a second record of cell {rec['id']} (line {first[rec['id']]} is kept)"
        if why is not None:
            rejected.append((no, line, why))
            continue
        first[rec["id"]] = no
        good.append((rec["id"], rec, line))
    return good, rejected


def read_results(path, repair: bool = False) -> dict[str, dict]:
    """``{id: record}`` of the complete records (:func:`check_record`) of a results file; any other line
    (cut short, not JSON, incomplete, an id that is not its cell's hash, a second record of a cell) is left out.

    With ``repair`` those lines are moved aside: appended, with their reason, to ``results.rejected.jsonl``
    beside the file, which is rewritten (atomically) with the complete records alone; the caller must hold the
    folder's lock (:func:`run_sweep` does).
    """
    path = Path(path)
    if not path.exists():
        return {}
    good, rejected = _scan(path.read_bytes())
    if repair and rejected:
        _move_aside(path, good, rejected)
    return {rid: rec for rid, rec, _ in good}


def _move_aside(path: Path, good, rejected) -> None:
    lines = [(json.dumps({"file": path.name, "line": no, "reason": why,
                          "text": text.decode("utf-8", errors="replace")}, sort_keys=True) + "\n").encode()
             for no, text, why in rejected]
    with open(path.with_name(REJECTED), "ab") as f:
        f.write(b"".join(lines))
        f.flush()
        os.fsync(f.fileno())
    write_atomic(path, b"".join(line + b"\n" for _, _, line in good))


def _append_line(path: Path, obj) -> None:
    line = (json.dumps(_strict(obj), sort_keys=True, allow_nan=False) + "\n").encode()
    with open(path, "ab") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _cut_partial_tail(path: Path) -> None:
    """Cut a last line without its newline (a writer stopped mid-write) off a JSONL file."""
    if not path.exists():
        return
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())


def write_atomic(path, data) -> None:
    """Write ``data`` (bytes or str) to ``path`` atomically: a temporary file of a unique name in the same folder,
    fsynced, then ``os.replace``d over ``path``, so concurrent writers never tear or mix a file (the last one
    wins) and a reader sees the old or the new file, whole."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class _Folder:
    """A results folder that several runs may share: an ``fcntl`` lock serializes every read-to-decide and write
    of its files, and a run claims a cell (an exclusive lock on ``.claims/<id>``, released when the run ends or
    dies) and re-reads the results under the lock before running it, so each cell is run and written once."""

    def __init__(self, out: Path, log):
        self.out, self.log = Path(out), log
        self.path = self.out / RESULTS
        self.done: dict[str, dict] = {}
        self._seen = None  # (inode, bytes read) of the results file
        self._claims: dict[str, int] = {}

    @contextlib.contextmanager
    def locked(self):
        with open(self.out / LOCK, "ab") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def reload(self) -> None:
        """(Under the lock.) Read the whole results file; move the lines that are not complete records aside."""
        if not self.path.exists():
            self.done, self._seen = {}, None
            return
        good, rejected = _scan(self.path.read_bytes())
        if rejected:
            _move_aside(self.path, good, rejected)
            shown = "; ".join(f"line {no}: {why}" for no, _, why in rejected[:5])
            self.log(f"{self.path}: {len(rejected)} line(s) are not complete records and were moved to "
                     f"{self.out / REJECTED} (their cells run again): {shown}{' ...' if len(rejected) > 5 else ''}")
        self.done = {rid: rec for rid, rec, _ in good}
        st = os.stat(self.path)
        self._seen = (st.st_ino, st.st_size)

    def refresh(self) -> None:
        """(Under the lock.) Read the lines appended since the last read (the whole file if it was replaced)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self.done, self._seen = {}, None
            return
        if self._seen is None or self._seen[0] != st.st_ino or st.st_size < self._seen[1]:
            return self.reload()
        with open(self.path, "rb") as f:
            f.seek(self._seen[1])
            raw = f.read()
        if not raw:
            return
        good, rejected = _scan(raw)
        if rejected or any(rid in self.done for rid, _, _ in good):
            return self.reload()
        self.done.update((rid, rec) for rid, rec, _ in good)
        self._seen = (st.st_ino, self._seen[1] + len(raw))

    def claim(self, cell: Cell, wait: bool) -> str:
        """``"run"`` (claimed: not done, no other run on it), ``"done"`` (recorded), or ``"busy"`` (another run
        holds it; only without ``wait``, which blocks until that run lets go)."""
        (self.out / CLAIMS).mkdir(exist_ok=True)
        fd = os.open(self.out / CLAIMS / cell.id, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return "busy"
        with self.locked():
            self.refresh()
        if cell.id in self.done:
            os.close(fd)
            return "done"
        self._claims[cell.id] = fd
        return "run"

    def record(self, rec: dict, timing: dict) -> None:
        with self.locked():
            _append_line(self.path, rec)
            _append_line(self.out / TIMING, timing)
            self.refresh()

    def release(self, cell: Cell) -> None:
        fd = self._claims.pop(cell.id, None)
        if fd is not None:
            os.close(fd)


def _strict(obj):
    """NaN/inf -> None, recursively (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if isinstance(obj, np.generic):
        return _strict(obj.item())
    return obj


def _write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(_strict(obj), indent=1, sort_keys=True) + "\n")


def flat(record: dict) -> dict:
    """One flat row of a result record, for tables: cell fields, ``cfg.<k>``, ``opt.<k>``, metrics."""
    c = record["cell"]
    a, d = c["attack"], c["defense"]
    label = record.get("label", "")
    model = c["model"] + (" [" + label.rpartition(" [")[2] if label.endswith("]") and " [" in label else "")
    row = {"id": record["id"], "label": label, "dataset": c["dataset"], "model": model,
           "train_seed": c["train_seed"], "attack": a["name"], "eot": a["eot"], "defense": d["name"],
           "level": record.get("level"), "drop": d.get("drop"), "targeted": c["targeted"], "budget": c["budget"],
           "n_images": c["n_images"], "seed": c["seed"], "cost": record.get("cost")}
    row.update({f"cfg.{k}": v for k, v in a["config"].items()})
    row.update({f"opt.{k}": v for k, v in d["options"].items()})
    row.update(record.get("metrics", {}))
    row.update(record.get("defended", {}))
    return row


# ----------------------------------------------------------------------------- running

class Sweeper:
    """Runs cells; caches models, image selections, calibrations and compiled runners across cells."""

    def __init__(self, cache_dir=None, data_dir=None, progress: bool = False, mesh: Mesh | None = None):
        self.cache_dir, self.data_dir, self.progress = cache_dir, data_dir, progress
        self.mesh = mesh if mesh is not None else Mesh(np.asarray(jax.devices()), ("images",))
        self._models, self._sel, self._calib, self._acc, self._runners, self._ctx = {}, {}, {}, {}, {}, {}

    @property
    def n_devices(self) -> int:
        return int(self.mesh.devices.size)

    # --- shared pieces
    def has_model(self, c: dict) -> bool:
        """Whether the cell's model is loaded or in the checkpoint cache (so :meth:`model` trains nothing)."""
        if _model_key(c) in self._models:
            return True
        path = train.cache_path(c["model"], c["dataset"], _train_config(c), self.cache_dir)
        return (path / "meta.json").exists()

    def _load(self, name: str, dataset: str, seed: int, options: dict | None = None):
        """(model, params) from the checkpoint cache, trained first if missing (one process only: under
        ``jax.distributed`` every model must be in the cache already; each process restores it onto its
        own first device, :func:`rnd_jax.train.load_or_train`). ``options``: the cell's ``train`` fields."""
        tcfg = train.TrainConfig(seed=seed, **(options or {}))
        if jax.process_count() > 1 and not (train.cache_path(name, dataset, tcfg, self.cache_dir)
                                            / "meta.json").exists():
            raise ValueError(f"model {name!r} ({dataset}, train seed {seed}) is not in the checkpoint cache "
                             f"{train.cache_path(name, dataset, tcfg, self.cache_dir).parent}: with several "
                             f"processes every model must be trained beforehand (run the grid once without "
                             f"--distributed, e.g. its --smoke size, with the same --cache-dir)")
        return train.load_or_train(name, dataset, tcfg, cache_dir=self.cache_dir, data_dir=self.data_dir,
                                   progress=self.progress)

    def model(self, c: dict):
        """(model, params, clean scorer, test images, test labels) of the cell's trained model (its ``train``
        options included). A cell whose defense is ``feature_noise`` with ``scale="std"`` gets the model's
        per-feature training stds (:func:`rnd_jax.train.feature_std`, computed once and cached beside the
        checkpoint) attached to the params (:func:`rnd_jax.defenses.with_feature_std`)."""
        k = _model_key(c)
        if k not in self._models:
            model, params = self._load(c["model"], c["dataset"], c["train_seed"], c.get("train"))
            x, y = data.load(c["dataset"], "test", data_dir=self.data_dir)
            self._models[k] = (model, params, model_scorer(model, params, compact=True), x, y)
        if _wants_feature_std(c) and FEATURE_STD not in self._models[k][1]:
            model, params, _, x, y = self._models[k]
            stats = train.feature_std(c["model"], c["dataset"], _train_config(c), self.cache_dir, self.data_dir)
            params = with_feature_std(params, stats)
            self._models[k] = (model, params, model_scorer(model, params, compact=True), x, y)
        return self._models[k]

    def context(self, c: dict, needs) -> Context:
        from rnd_jax.attacks.registry import SURROGATE_OFFSETS

        k = (c["dataset"], c["model"], c["train_seed"], "surrogate" in needs, "autoencoder" in needs,
             "surrogates" in needs)
        if k not in self._ctx:
            x, y = data.load(c["dataset"], "train", data_dir=self.data_dir)
            surrogate = decoder = None
            if "surrogate" in needs:
                sm, sp = self._load(c["model"], c["dataset"], c["train_seed"] + 1)
                surrogate = model_scorer(sm, sp)
            surrogates = None
            if "surrogates" in needs:  # the reference models (Subspace): separately trained, other seeds
                surrogates = tuple(model_scorer(*self._load(c["model"], c["dataset"], c["train_seed"] + o))
                                   for o in SURROGATE_OFFSETS)
            if "autoencoder" in needs:  # the attacker's autoencoder of the training split (default config)
                if jax.process_count() > 1 and autoencoder.read_meta(c["dataset"], cache_dir=self.cache_dir) is None:
                    raise ValueError(f"the {c['dataset']} autoencoder is not in the checkpoint cache: with several "
                                     f"processes it must be trained beforehand (run the grid once without "
                                     f"--distributed, e.g. its --smoke size, with the same --cache-dir)")
                decoder = autoencoder.load_decoder(c["dataset"], cache_dir=self.cache_dir, data_dir=self.data_dir,
                                                   progress=self.progress)
            self._ctx[k] = Context(jnp.asarray(x), jnp.asarray(y), data.info(c["dataset"]).num_classes, surrogate,
                                   surrogates=surrogates,
                                   autoencoder=decoder)
        return self._ctx[k]

    def selection(self, c: dict):
        p = c["protocol"]
        pool, balanced = p.get("pool", "correct"), p.get("balanced", False)
        k = (*_model_key(c), c["seed"], c["targeted"], c["n_images"], pool, balanced)
        if k not in self._sel:
            _, _, clean, x, y = self.model(c)
            k_data = _streams(c["seed"])[1]
            self._sel[k] = select_images(k_data, clean, x, y, c["n_images"], c["targeted"],
                                         data.info(c["dataset"]).num_classes, pool=pool, balanced=balanced)
        return self._sel[k]

    def level(self, c: dict):
        """(noise level, calibration record or None) of the cell's defense."""
        d = c["defense"]
        if d["name"] == "none":
            return None, None
        if "level" in d:
            return d["level"], None
        k = (*_model_key(c), c["seed"], d["name"], d["drop"], d["calib_draws"],
             json.dumps(d["options"], sort_keys=True))
        if k not in self._calib:
            model, params, _, x, y = self.model(c)
            cal = calibrate(model, params, d["name"], d["drop"], x, y, _streams(c["seed"])[2],
                            draws=d["calib_draws"], **d["options"])
            self._calib[k] = {"level": cal.level, "accuracy": cal.accuracy, "clean_accuracy": cal.clean_accuracy,
                              "drop": cal.drop, "evaluations": cal.evaluations}
        return self._calib[k]["level"], self._calib[k]

    def defended_accuracy(self, c: dict, level) -> dict:
        d = c["defense"]
        k = (*_model_key(c), c["seed"], d["name"], level,
             json.dumps(d["options"], sort_keys=True), c["protocol"]["acc_draws"])
        if k not in self._acc:
            model, params, clean, x, y = self.model(c)
            clean_pred = evaluate_predict(clean, x)
            clean_acc = float(np.mean(clean_pred == y))
            spec = self._defense_spec(c, level)
            lvl = np.float32(level if spec.traced else 0.0)
            accs, flips = defended_accuracy(Partial(_defended_scores, spec, lvl), x, y, _streams(c["seed"])[3],
                                            c["protocol"]["acc_draws"], clean_pred=clean_pred)
            self._acc[k] = {"acc_clean": clean_acc, "acc_defended_mean": float(accs.mean()),
                            "acc_defended_worst": float(accs.min()), "p_mis_clean": float(flips.mean())}
        return self._acc[k]

    def _defense(self, c: dict, level):
        model, params, _, x, _ = self.model(c)
        d = c["defense"]
        lvl = 0.0 if d["name"] == "none" else level
        return build_defense(d["name"], model, params, lvl, tuple(np.shape(x)[1:]), **d["options"])

    def _defense_spec(self, c: dict, level) -> "DefenseAt":
        """The cell's defense as a pytree (params as leaves) built at a level given at run time."""
        model, params, _, x, _ = self.model(c)
        d = c["defense"]
        traced = d["name"] != "none" and DEFENSES[d["name"]].calibratable
        fixed = 0.0 if d["name"] == "none" else level
        return DefenseAt(d["name"], model, params, fixed, tuple(np.shape(x)[1:]), dict(d["options"]), traced)

    def attack(self, c: dict):
        spec = get_spec(c["attack"]["name"])
        cfg = spec.config(**_attack_config(c))
        return eot_wrap(spec.build(cfg, self.context(c, spec.needs)), c["attack"]["eot"]), cfg

    def protocol(self, c: dict, cfg) -> Protocol:
        p = c["protocol"]
        return Protocol(n_images=c["n_images"], targeted=c["targeted"], budget=c["budget"],
                        check_queries=p["check_queries"], acc_draws=p["acc_draws"],
                        eps=getattr(cfg, "eps", None), norm=getattr(cfg, "norm", "linf"),
                        stop_rule=p.get("stop_rule", "single"), count_checks=p.get("count_checks", False),
                        pool=p.get("pool", "correct"), balanced=p.get("balanced", False))

    def runner(self, c: dict, attack, protocol: Protocol, level, n_pad: int):
        """The compiled, sharded ``(level, x0, labels, targets, ka, kd, kc) -> (Result, votes, clean_pred)``.

        The attack's pools, the model's params and the defense travel as arguments of the program
        (:mod:`rnd_jax.pytree`); the level too, for calibratable defenses, so one program serves every level.
        """
        spec = self._defense_spec(c, level)
        k = (*_model_key(c), json.dumps(c["attack"], sort_keys=True), c["targeted"],
             spec.name, json.dumps(spec.options, sort_keys=True), None if spec.traced else json.dumps(level),
             protocol, n_pad)
        if k not in self._runners:
            _, _, clean, _, _ = self.model(c)
            compiled = pytree.jit(_sweep_runner, out_shardings=NamedSharding(self.mesh, P()))
            bundle = _replicate((attack, spec, clean, protocol), NamedSharding(self.mesh, P()))
            self._runners[k] = lambda *args: compiled(bundle, *args)
        return self._runners[k]

    def tapped_runner(self, c: dict, attack, protocol: Protocol, level):
        """The compiled one-image runner of a tapped cell (``protocol.tap``) and its :class:`QueryTap`."""
        spec = self._defense_spec(c, level)
        k = ("tap", *_model_key(c), json.dumps(c["attack"], sort_keys=True),
             c["targeted"], spec.name, json.dumps(spec.options, sort_keys=True),
             None if spec.traced else json.dumps(level), protocol)
        if k not in self._runners:
            _, _, clean, _, _ = self.model(c)
            tap = QueryTap()
            runner = make_tapped_runner(attack, Partial(_defended_at, spec), clean, protocol, tap)
            self._runners[k] = (compile_runner(runner), tap)
        return self._runners[k]

    def _place(self, arrays, n_pad: int):
        """Pad each per-image array to ``n_pad`` rows (copies of row 0) and shard it over the mesh."""
        sharding = NamedSharding(self.mesh, P("images"))
        out = []
        for a in arrays:
            a = np.asarray(a)
            if n_pad > len(a):
                a = np.concatenate([a, np.repeat(a[:1], n_pad - len(a), axis=0)])
            out.append(jax.make_array_from_callback(a.shape, sharding, lambda idx, a=a: a[idx]))
        return out

    def run(self, cell: Cell, info: dict | None = None) -> dict:
        """Run one cell of the protocol; returns its result record (deterministic, JSON-ready)."""
        return self.run_cell(cell)[0]

    def run_cell(self, cell: Cell, positions=None, chunk: int | None = None, snapshot=None,
                 on_chunk: Callable[[dict], Any] | None = None) -> tuple[dict, dict]:
        """Run one cell: ``(record, arrays)``, the result record and the cell's artifact arrays
        (:func:`rnd_jax.artifacts.cell_arrays`).

        ``positions``: run only these images of the cell's selection (positions in it), each with the keys it
        has in the whole cell (replay of single images: an image alone does what it did in the batch).
        ``chunk``: run at most ``chunk`` attack steps per image per program call (:class:`Chunked`); after each
        call the carry is saved to ``snapshot`` (a path; :func:`rnd_jax.artifacts.save_carry`) when given, a
        snapshot found there is resumed from, and ``on_chunk`` receives the chunk's progress (a dict).
        """
        c = cell.d
        attack, cfg = self.attack(c)
        protocol = self.protocol(c, cfg)
        level, calib = self.level(c)
        sel = self.selection(c)
        defended = self._defense(c, level)
        validate_selection(attack, Oracle(defended, attack.output), protocol, sel)
        k_attack, k_defense = jax.random.split(cell_key(cell))
        keys = image_keys(k_attack, k_defense, sel.index)
        if positions is not None:
            positions = np.asarray(positions, np.int64).reshape(-1)
            if not len(positions) or positions.min() < 0 or positions.max() >= len(sel.labels):
                raise ValueError(f"image positions must be in 0..{len(sel.labels) - 1} (the cell attacks "
                                 f"{len(sel.labels)} images), got {positions.tolist()}")
            sel, keys = _pick(sel, keys, positions)
        lvl = np.asarray(level if isinstance(level, float) else 0.0, np.float32)
        taps = {}
        if c["protocol"].get("tap"):
            fn, tap = self.tapped_runner(c, attack, protocol, level)
            res, votes, clean_pred, taps = run_tapped(fn, tap, sel, keys, protocol, level=lvl)
            kc = np.asarray(jax.random.key_data(keys[2]))
            scores = self._final_scores(c, level)(lvl, res.x_adv, kc)
        else:
            ka, kd, kc = (np.asarray(jax.random.key_data(k)) for k in keys)
            n = len(sel.labels)
            n_pad = -(-n // self.n_devices) * self.n_devices
            args = self._place([sel.images, sel.labels, sel.targets, ka, kd, kc], n_pad)
            lvl = jax.make_array_from_callback((), NamedSharding(self.mesh, P()), lambda idx: lvl[idx])
            if chunk is None:
                fn = self.runner(c, attack, protocol, level, n_pad)
                out = fn(lvl, *args)
            else:
                out = self._run_chunked(cell, attack, protocol, level, n_pad, lvl, args, n, chunk, snapshot,
                                        on_chunk)
            res, votes, clean_pred, *scores = jax.tree.map(lambda a: np.asarray(a)[:n], jax.block_until_ready(out))
        metrics = summarize(sel, res, votes, clean_pred, protocol.targeted, protocol.check_queries, protocol.eps,
                            protocol.norm)
        metrics.update(taps)
        images = per_image(sel, res, votes, clean_pred)
        ok = successes(sel, res, votes, clean_pred, protocol.targeted, protocol.check_queries, protocol.eps,
                       protocol.norm)
        for kind, flags in ok.items():
            images[success_key(kind)] = flags.tolist()
        arrays = artifacts.cell_arrays(cell.id, sel, res, votes, clean_pred, *scores,
                                       {success_key(k): v for k, v in ok.items()})
        record = {"id": cell.id, "label": cell.label, "cell": c, "level": level, "calibration": calib,
                  "attack_config": _canon(dataclasses.asdict(cfg)), "cost": int(attack.cost), "metrics": metrics,
                  "defended": self.defended_accuracy(c, level), "images": images}
        return record, arrays

    def watch_image(self, cell: Cell, position: int, tap: QueryTap):
        """Run image ``position`` of the cell's selection alone through a tapped runner that reports every query
        of the attack to ``tap`` (:class:`rnd_jax.evaluate.QueryTap` or a subclass): ``(Result, vote, clean_pred)``
        of that image. ``RuntimeError`` if the tap saw another number of points than the driver counted."""
        c = cell.d
        attack, cfg = self.attack(c)
        protocol = self.protocol(c, cfg)
        level, _ = self.level(c)
        sel = self.selection(c)
        if not 0 <= position < len(sel.labels):
            raise ValueError(f"image position must be in 0..{len(sel.labels) - 1}, got {position}")
        spec = self._defense_spec(c, level)
        _, _, clean, _, _ = self.model(c)
        fn = compile_runner(make_tapped_runner(attack, Partial(_defended_at, spec), clean, protocol, tap))
        k_attack, k_defense = jax.random.split(cell_key(cell))
        one, keys = _pick(sel, image_keys(k_attack, k_defense, sel.index), np.asarray([position]))
        res, votes, clean_pred, _ = run_tapped(fn, tap, one, keys, protocol,
                                               level=np.asarray(level if isinstance(level, float) else 0.0, np.float32))
        return jax.tree.map(lambda a: a[0], res), votes[0], clean_pred[0]

    def reevaluate(self, cell: Cell, arrays: dict, defense: str, level, options: dict | None = None) -> dict:
        """Judge a cell's stored final points (its artifact ``arrays``) against another defense, without
        re-attacking: the protocol's ``check_queries`` fresh answers of ``defense`` at ``level`` per image, from
        the image's own check stream (so the cell's own defense and level give back its stored votes).

        Returns ``asr`` (majority of the checks, within the cell's eps), ``asr_clean``, the mean vote, and the
        per-image ``check_votes`` / ``success``."""
        c = cell.d
        attack, cfg = self.attack(c)
        protocol = self.protocol(c, cfg)
        model, params, clean, x, _ = self.model(c)
        options = dict(options or {})
        defended = build_defense(defense, model, params, level, tuple(np.shape(x)[1:]), **options)  # validated
        x_adv = np.asarray(arrays["x_adv"], np.float32)
        index, labels, targets = (np.asarray(arrays[k], np.int32) for k in ("index", "label", "target"))
        k_attack, k_defense = jax.random.split(cell_key(cell))
        kc = image_keys(k_attack, k_defense, index)[2]
        votes = np.asarray(pytree.call(Partial(_votes, defended, attack.targeted, protocol.check_queries),
                                       x_adv, labels, targets, kc))
        clean_pred = evaluate_predict(clean, x_adv)
        sel = self.selection(c)
        pos = {int(i): k for k, i in enumerate(sel.index)}
        if any(int(i) not in pos for i in index):
            raise ValueError(f"the artifact's images are not those cell {cell.id} selects")
        within = within_eps(x_adv, sel.images[[pos[int(i)] for i in index]], protocol.eps, protocol.norm)
        ok = (votes * protocol.check_queries > protocol.check_queries / 2) & within
        fooled = (clean_pred == targets) if protocol.targeted else (clean_pred != labels)
        return {"id": cell.id, "label": cell.label, "defense": defense, "level": level, "options": options,
                "n_images": int(len(index)), "asr": float(ok.mean()), "asr_clean": float((fooled & within).mean()),
                "vote_mean": float(votes.mean()), "check_votes": votes.tolist(), "success": ok.tolist()}

    def _final_scores(self, c: dict, level):
        """The compiled ``(level, x_adv, kc) -> (defended scores at check query 0, clean scores)`` of a cell."""
        spec = self._defense_spec(c, level)
        k = ("scores", *_model_key(c), spec.name, json.dumps(spec.options, sort_keys=True),
             None if spec.traced else json.dumps(level))
        if k not in self._runners:
            _, _, clean, _, _ = self.model(c)
            compiled = pytree.jit(_scores_at)
            self._runners[k] = lambda *args: compiled((spec, clean), *args)
        return self._runners[k]

    def _run_chunked(self, cell: Cell, attack, protocol: Protocol, level, n_pad: int, lvl, args, n: int,
                     chunk: int, snapshot, on_chunk):
        """The cell's run as :class:`Chunked` pieces, snapshotting (and resuming) the carry between them."""
        c = cell.d
        spec = self._defense_spec(c, level)
        k = ("chunked", *_model_key(c), json.dumps(c["attack"], sort_keys=True),
             c["targeted"], spec.name, json.dumps(spec.options, sort_keys=True),
             None if spec.traced else json.dumps(level), protocol, n_pad, int(chunk))
        if k not in self._runners:
            _, _, clean, _, _ = self.model(c)
            bundle = _replicate((attack, spec, clean, protocol, int(chunk)), NamedSharding(self.mesh, P()))
            fns = [pytree.jit(f) for f in (_chunk_start, _chunk_advance, _chunk_going, _chunk_end)]
            self._runners[k] = [Partial(_bound, f, bundle) for f in fns]
        start_fn, advance_fn, going_fn, end_fn = self._runners[k]
        x0, labels, targets, ka, kd, kc = args
        carry = start_fn(lvl, x0, labels, targets, ka)
        done_chunks = 0
        found = None if snapshot is None else artifacts.load_carry(snapshot, carry)
        if found is not None:
            restored, meta = found
            if meta.get("cell") != cell.id:
                raise ValueError(f"snapshot {snapshot} belongs to cell {meta.get('cell')!r}, not {cell.id!r}")
            carry = jax.tree.map(lambda a, ref: jax.device_put(a, ref.sharding), restored, carry)
            done_chunks = int(meta["chunks"])
        while bool(np.any(np.asarray(going_fn(lvl, carry)))):
            carry = advance_fn(lvl, carry, kd, kc)
            done_chunks += 1
            if snapshot is not None:
                artifacts.save_carry(snapshot, carry, {"cell": cell.id, "chunks": done_chunks, "chunk": int(chunk)})
            if on_chunk is not None:
                on_chunk(_chunk_progress(cell, carry, n, done_chunks, resumed=found is not None))
        return end_fn(lvl, carry, labels, targets, kc)


def _pick(sel, keys, positions):
    """The images at ``positions`` of a selection, with their per-image keys (each keeps the keys it has in
    the whole cell)."""
    sel = sel._replace(index=sel.index[positions], images=sel.images[positions], labels=sel.labels[positions],
                       targets=sel.targets[positions])
    return sel, tuple(k[positions] for k in keys)


def _votes(defended, targeted, m, x_adv, labels, targets, kc):
    return check_success(defended, x_adv, labels, targets, kc, targeted, m)


def _bound(fn, bundle, *args):
    return fn(bundle, *args)


def _chunk_progress(cell: Cell, carry, n: int, chunks: int, resumed: bool) -> dict:
    """Per-chunk progress of a chunked cell (host numbers, for the metric log)."""
    q = np.asarray(carry.queries)[:n]
    claimed = np.asarray(carry.claimed)[:n]
    return {"id": cell.id, "label": cell.label, "chunk": chunks, "resumed": resumed,
            "steps_max": int(np.max(np.asarray(carry.state.step)[:n])), "queries_mean": float(q.mean()),
            "queries_max": int(q.max()), "claimed": float(claimed.mean())}


def _replicate(tree, sharding):
    """``tree`` with its arrays replicated on ``sharding``. Under ``jax.distributed`` each process builds every
    array from its own host copy (equal on every process): a device array of one process cannot be sent to the
    devices of another on CPU."""
    if jax.process_count() == 1:
        return pytree.place(tree, sharding)
    arrays, static = pytree.partition(tree)
    placed = []
    for a in arrays:
        if a is None or jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            placed.append(a if a is None else pytree.place(a, sharding))
            continue
        host = np.asarray(a)
        placed.append(jax.make_array_from_callback(host.shape, sharding, lambda idx, h=host: h[idx]))
    return pytree.combine(placed, static)


class DefenseAt(NamedTuple):
    """A cell's defense, to build inside the compiled program (``params`` are pytree leaves)."""

    name: str
    model: Any
    params: Any
    fixed: Any  # the level when it is not traced
    shape: tuple
    options: dict
    traced: bool  # the level is a run-time argument (calibratable families)


def _defended_at(spec: DefenseAt, lvl):
    return build_defense(spec.name, spec.model, spec.params, lvl if spec.traced else spec.fixed, spec.shape,
                         **spec.options)


def _defended_scores(spec: DefenseAt, lvl, x, keys):
    return _defended_at(spec, lvl)(x, keys)


def _sweep_runner(bundle, lvl, x0, labels, targets, ka, kd, kc):
    attack, spec, clean, protocol = bundle
    defended = compacted(_defended_at(spec, lvl))  # finished images cost no model (or noise) time
    keys = [jax.random.wrap_key_data(kk) for kk in (ka, kd, kc)]
    out = make_runner(attack, Oracle(defended, attack.output), clean, protocol)(x0, labels, targets, *keys)
    return (*out, *_scores_at((spec, clean), lvl, out[0].x_adv, kc))


def _scores_at(bundle, lvl, x_adv, kc):
    """(defended answer at ``x_adv`` for check query 0 of each image, clean probabilities at ``x_adv``)."""
    spec, clean = bundle
    keys = jax.vmap(lambda k: query_keys(jax.random.wrap_key_data(k), 0, 1)[0])(kc)
    return _defended_at(spec, lvl)(x_adv, keys), clean(x_adv, None)


def _chunked(bundle, lvl) -> Chunked:
    attack, spec, clean, protocol, steps = bundle
    defended = compacted(_defended_at(spec, lvl))
    return make_chunked_runner(attack, Oracle(defended, attack.output), clean, protocol, steps)


def _chunk_start(bundle, lvl, x0, labels, targets, ka):
    return _chunked(bundle, lvl).start(x0, labels, targets, jax.random.wrap_key_data(ka))


def _chunk_advance(bundle, lvl, carry, kd, kc):
    return _chunked(bundle, lvl).advance(carry, jax.random.wrap_key_data(kd), jax.random.wrap_key_data(kc))


def _chunk_going(bundle, lvl, carry):
    return _chunked(bundle, lvl).going(carry)


def _chunk_end(bundle, lvl, carry, labels, targets, kc):
    out = _chunked(bundle, lvl).end(carry, labels, targets, jax.random.wrap_key_data(kc))
    return (*out, *_scores_at(bundle[1:3], lvl, out[0].x_adv, kc))


def _is_writer() -> bool:
    return jax.process_index() == 0


def _broadcast(values) -> np.ndarray:
    """Process 0's int32 ``values``, on every process (one collective when there are several; else as is)."""
    values = np.asarray(values, np.int32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        values = np.asarray(multihost_utils.broadcast_one_to_all(values))
    return values


def _done_mask(cells: list[Cell], done: dict) -> np.ndarray:
    return _broadcast([c.id in done for c in cells]).astype(bool)


ACTIONS = ("run", "done", "busy")  # a cell's fate in one pass, decided by process 0 (see run_sweep)


def _agree(action: str | None) -> str:
    """Process 0's action for a cell, on every process (the others pass None)."""
    return ACTIONS[int(_broadcast([ACTIONS.index(action) if action is not None else 0])[0])]


class OptionError(ValueError):
    """A bad option of :func:`run_sweep` itself (raised before anything runs or is written)."""


def run_sweep(grid, out, size: str = "default", cache_dir=None, data_dir=None, progress: bool = True,
              log: Callable[[str], Any] | None = None, sweeper: Sweeper | None = None, keep_artifacts: bool = True,
              chunk: int | None = None, metrics: str = "jsonl", writer=None) -> list[dict]:
    """Expand, validate, and run (resumably) every unfinished cell of ``grid``; records in cell order.

    ``grid``: a dict, a JSON file or a built-in name. Nothing runs (and ``out`` is not created)
    unless the whole grid validates, image counts included (the models are trained first if needed).

    Resume trusts only complete records (:func:`check_record`): any other line of ``results.jsonl`` is
    reported, moved to ``results.rejected.jsonl`` with its reason, and its cell is run again. Several runs
    may share ``out`` (two sweeps, two tables sharing cells): each claims a cell before running it and
    re-reads the results under the folder's lock, so every cell runs and is written once; a cell another run
    holds is left for later, then waited for (and run here if that run dies). With several JAX processes
    (``jax.distributed``) every process runs every cell together; process 0 alone reads and writes ``out`` and
    claims cells, and tells the others which to run.

    ``keep_artifacts``: write each cell's arrays to ``artifacts/<id>.npz`` (:mod:`rnd_jax.artifacts`) before
    its record. ``chunk``: run each cell ``chunk`` attack steps per image at a time, snapshotting its carry to
    ``snapshots/<id>.npz`` after each piece, so a killed run resumes inside the cell (one process only).
    ``metrics``: the metric log (:func:`rnd_jax.metric_log.make_writer`: ``"jsonl"`` writes ``log.jsonl``,
    ``"tensorboard"``, ``"none"``), or pass a ``writer`` object: each finished cell's metrics (kind
    ``"cell"``) and, with ``chunk``, each piece's progress (kind ``"chunk"``).
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if chunk is not None:
        if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or not 1 <= chunk <= INT32_MAX:
            raise OptionError(f"chunk must be an int in 1..{INT32_MAX} (attack steps per piece), got {chunk!r}")
        if jax.process_count() > 1:
            raise OptionError("chunked cells (snapshots inside a cell) run in one process only, not under "
                             "jax.distributed")
    if writer is None:
        try:
            metric_log.check_writer(metrics)
        except ValueError as e:
            raise OptionError(str(e)) from None
    grid = resolve(load_grid(grid), size)
    cells = expand(grid)
    sweeper = sweeper or Sweeper(cache_dir, data_dir, progress=progress)
    plan(cells, data_dir, sweeper=sweeper, train_models=True, log=log)
    out = Path(out)
    is_writer = _is_writer()
    path = out / RESULTS
    folder = _Folder(out, log) if is_writer else None
    if is_writer:
        out.mkdir(parents=True, exist_ok=True)
        with folder.locked():
            folder.reload()
            _cut_partial_tail(out / TIMING)
            _write_json(out / "sweep.json", {"grid": grid, "size": size, "cells": [
                {"id": c.id, "label": c.label, "cell": c.d} for c in cells]})
    own_writer = writer is None
    if own_writer:
        writer = metric_log.make_writer(metrics if is_writer else "none", out)
    mask = _done_mask(cells, folder.done if is_writer else {})
    pending = [c for c, m in zip(cells, mask) if not m]
    log(f"sweep {grid.get('name', '')!r} ({size}): {len(cells)} cells, {len(cells) - len(pending)} already done, "
        f"{len(pending)} to run on {sweeper.n_devices} device(s); results in {path}")
    from tqdm.auto import tqdm

    bar = tqdm(total=len(cells), initial=len(cells) - len(pending), desc="cells", unit="cell",
               disable=not (progress and is_writer), file=sys.stderr, dynamic_ncols=True)
    new = {}

    def attempt(cell: Cell, wait: bool) -> str:
        action = _agree(folder.claim(cell, wait) if is_writer else None)
        if action == "run":
            bar.set_postfix_str(cell.label[:60])
            t0 = time.time()
            snapshot = artifacts.snapshot_path(out, cell.id) if chunk is not None else None
            try:
                on_chunk = (lambda p: writer.write("chunk", p["chunk"], p)) if chunk is not None else None
                rec, arrays = sweeper.run_cell(cell, chunk=chunk, snapshot=snapshot, on_chunk=on_chunk)
                if is_writer:
                    if keep_artifacts:
                        artifacts.write(artifacts.artifact_path(out, cell.id), arrays)
                    folder.record(rec, {"id": cell.id, "label": cell.label, "seconds": time.time() - t0,
                                        "devices": sweeper.n_devices})
                    if snapshot is not None:
                        snapshot.unlink(missing_ok=True)
                    writer.write("cell", len(new), {"id": cell.id, "label": cell.label,
                                                    "seconds": round(time.time() - t0, 3), **_scalars(rec)})
            finally:
                if is_writer:
                    folder.release(cell)
            new[cell.id] = _canon(_strict(rec))
        if action != "busy":
            bar.update()
        return action

    try:
        busy = [cell for cell in pending if attempt(cell, wait=False) == "busy"]
        if busy:
            log(f"{len(busy)} cell(s) are being run by another run into {out}: waiting for them")
        for cell in busy:
            attempt(cell, wait=True)
    finally:
        bar.close()
        if own_writer:
            writer.close()
    if is_writer:
        with folder.locked():
            folder.refresh()
        return [folder.done.get(c.id) or new.get(c.id) for c in cells]
    return [new.get(c.id) for c in cells]


def _scalars(rec: dict) -> dict:
    """A record's metrics and defended accuracies as one flat dict of numbers (for the metric log)."""
    out = {}
    for group in ("metrics", "defended"):
        for k, v in (rec.get(group) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = v
    return out
