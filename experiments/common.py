"""Shared plumbing of the experiments: setup (results folder, keys, model, data), JSON/CSV writing, tables."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace


def add_model_args(p) -> None:
    """``--dataset``, ``--model`` and ``--weights``, the options naming the attacked model."""
    from rnd_jax import data, models

    p.add_argument("--dataset", default="digits",
                   help=f"one of {data.DATASETS}, or imagenet (a val subset; needs --weights and --data-dir)")
    p.add_argument("--model", default=None, help=f"one of {sorted(models.MODELS)}; default: the dataset's model")
    p.add_argument("--weights", default=None,
                   help="local PyTorch (.pt/.pth/.bin) or .safetensors weights of --model (torchvision / timm / "
                        "RobustBench naming, rnd_jax.weights) instead of training it")
    p.add_argument("--imagenet-images", type=int, default=1000,
                   help="imagenet: size of the class-balanced val subset (its index file is saved beside the data)")


def dataset_info(name: str, args=None):
    """``data.info(name)`` for a dataset this experiment can read (ValueError otherwise, before any work).

    ``imagenet`` needs ``--weights`` (nothing here trains an ImageNet model) and ``--data-dir``; a
    ``--weights`` file must exist.
    """
    from rnd_jax import data

    weights = getattr(args, "weights", None)
    if weights is not None and not os.path.isfile(weights):
        raise ValueError(f"--weights {weights!r}: no such file (weights are read from local files only)")
    if name == data.IMAGENET:
        if weights is None or getattr(args, "data_dir", None) is None:
            raise ValueError("--dataset imagenet needs --weights (a local weights file) and --data-dir (the ImageNet "
                             "val folder)")
        if getattr(args, "imagenet_images", 1) < 1:
            raise ValueError("--imagenet-images must be >= 1")
    elif name not in data.DATASETS:
        raise ValueError(f"unknown dataset {name!r} for this experiment; choose one of {data.DATASETS + (data.IMAGENET,)}")
    return data.info(name)


def resolve_model(args, ds) -> str:
    """``--model`` (default: the dataset's model), refused unless it is built for the dataset's images
    (:func:`rnd_jax.models.check_fits`, listing the models that fit) — before anything is trained."""
    from rnd_jax import models

    name = args.model or models.DEFAULT_MODEL[ds.name]
    models.check_fits(name, ds.image_shape, ds.num_classes, ds.name)
    return name


def add_run_args(p, out: str) -> None:
    """Seeds, folders and progress: the options every attack experiment shares (see :func:`setup`)."""
    p.add_argument("--seed", type=int, default=0, help="root seed of image choice, targets, attack and defense")
    p.add_argument("--train-seed", type=int, default=0, help="seed of model training (part of the checkpoint key)")
    p.add_argument("--out", default=out,
                   help="output folder (created once the run is valid; the same options run again there resume "
                        "it, another configuration is refused)")
    p.add_argument("--cache-dir", default=None, help="checkpoint cache (default $RND_JAX_CACHE or ~/.cache/rnd_jax)")
    p.add_argument("--data-dir", default=None, help="tensorflow-datasets data_dir for mnist/fashion_mnist/cifar10")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_protocol_args(p, stop_rule: str = "single") -> None:
    """``--stop-rule`` and ``--count-checks`` (:class:`rnd_jax.evaluate.Protocol`); ``stop_rule`` is the default of
    the paper the experiment reproduces."""
    from rnd_jax.attacks.driver import STOP_RULES

    p.add_argument("--stop-rule", default=stop_rule, choices=STOP_RULES,
                   help="when an attack ends: its own noisy answer (single), a majority of 9 fresh defended checks "
                        "at each claim (verified; randomized feature defense App. D.4), or the undefended model's "
                        "verdict at each claim (clean; a measurement mode)")
    p.add_argument("--count-checks", action="store_true", help="verified: the check queries count against the budget")


def cli(main, argv=None):
    """Run an experiment's ``main``; a ``ValueError`` or an unprepared dataset prints its message (no traceback)
    and exits 2. ``RND_JAX_TRACEBACK=1`` re-raises instead."""
    from rnd_jax.data import DatasetNotPreparedError

    try:
        return main(argv)
    except (ValueError, DatasetNotPreparedError) as e:
        if os.environ.get("RND_JAX_TRACEBACK"):
            raise
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "experiment"
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


# ----------------------------------------------------------------------------- explicit options and --smoke


def given_options(parser, argv, args) -> set[str]:
    """The destinations of the options given on the command line (``argv``, default ``sys.argv[1:]``).

    ``args`` is ``parser.parse_args(argv)``; the same ``argv`` is parsed again into a namespace whose
    every attribute is a sentinel: argparse fills defaults only for attributes the namespace lacks, so
    an attribute still holding the sentinel was not given (public argparse behaviour, no private fields).
    """
    import argparse

    unset = object()
    again = parser.parse_args(argv, namespace=argparse.Namespace(**{k: unset for k in vars(args)}))
    return {k for k, v in vars(again).items() if v is not unset}


def apply_smoke(args, given: set[str], smoke: dict) -> dict:
    """``--smoke``: set each option of ``smoke`` (``dest -> value``) that the user did not give.

    Smoke changes defaults only; an option given explicitly keeps the user's value. Returns the record
    for the config: ``{"smoke": bool, "smoke_set": {dest: value}, "smoke_kept": {dest: user value}}``.
    """
    if not args.smoke:
        return {"smoke": False}
    applied, kept = {}, {}
    for dest, value in smoke.items():
        if dest in given:
            kept[dest] = getattr(args, dest)
        else:
            setattr(args, dest, value)
            applied[dest] = value
    return {"smoke": True, "smoke_set": applied, "smoke_kept": kept}


# ----------------------------------------------------------------------------- the results folder


def check_out(path, flag: str = "--out") -> Path:
    """``ValueError`` unless ``path`` can be a results folder: an existing writable folder, or a path
    whose nearest existing parent is a writable folder. Nothing is created: a write is probed with a
    temporary file (removed at once) in the folder or that parent, so a read-only file system, a
    missing permission and root's bypass of permission bits are all judged by the file system itself."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a file, not a folder")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: {str(probe)!r} is a file, so the folder cannot be created")
    e = write_error(probe)
    if e is not None:
        where = "" if probe == out else f" (its parent {str(probe)!r} is not writable)"
        raise ValueError(f"{flag} {str(path)!r} is not writable{where}: {e.strerror or e}")
    return out


def write_error(folder) -> OSError | None:
    """Why a file cannot be written in ``folder`` (None if it can): probed with a temporary file, removed
    at once, so the file system itself judges (read-only mounts, permissions, root's bypass of them)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as e:
        return e


CONFIG = "config.json"
ROWS = "rows.jsonl"


def _same_json(obj):
    """``obj`` as it reads back from a JSON file (tuples as lists, NaN as None)."""
    return json.loads(json.dumps(clean_json(obj), sort_keys=True))


def _differences(old: dict, new: dict, only_given: bool) -> list[str]:
    keys = [k for k in new if new[k] is not None] if only_given else sorted(set(old) | set(new))
    return sorted(k for k in keys if not k.startswith("_") and old.get(k, "<absent>") != new.get(k, "<absent>"))


def check_resumable(out: Path, cfg: dict) -> None:
    """Before any work: ``ValueError`` when ``out`` already holds a run (its ``config.json``) of another
    configuration. Keys still ``None`` in ``cfg`` (filled in by the setup, e.g. the training config) are
    compared when the run starts (:func:`open_run`)."""
    path = Path(out) / CONFIG
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--out {str(out)!r}: cannot read its {CONFIG} ({e}); give another --out") from None
    diff = _differences(old, _same_json({k: v for k, v in cfg.items() if not k.startswith("_")}), only_given=True)
    if diff:
        raise ValueError(f"--out {str(out)!r} holds a run with another configuration (differs in {diff}); "
                         "give another --out, or remove that folder to start it again")


class RunLog:
    """The finished units of a run, one JSON line each in ``<out>/rows.jsonl``, written as they complete.

    Each line ``{"unit": id, "value": ...}`` is appended with a single ``write`` and ``fsync``-ed, so a
    run killed at any instant (``kill -9``) keeps every unit it finished; a line cut short by the kill
    is dropped (and cut off) when the log is read again. A unit already in the log is not recomputed:
    :meth:`unit` returns its value as read back from JSON (and a freshly computed value goes through the
    same round trip), so a resumed run continues from exactly the values an uninterrupted one has.
    """

    def __init__(self, out: Path):
        self.path = Path(out) / ROWS
        self.done: dict[str, object] = {}
        self.resumed = 0
        if self.path.exists():
            raw = self.path.read_bytes()
            good = 0
            for line in raw.splitlines(keepends=True):
                if not line.endswith(b"\n"):
                    break
                try:
                    rec = json.loads(line)
                except ValueError:
                    break
                self.done[rec["unit"]] = rec["value"]
                good += len(line)
            if good != len(raw):  # a line torn by a kill: cut it off before appending
                with open(self.path, "r+b") as f:
                    f.truncate(good)

    def __contains__(self, unit: str) -> bool:
        return unit in self.done

    def unit(self, unit: str, compute):
        """The value of ``unit``: from the log, or ``compute()`` then appended to it."""
        if unit in self.done:
            self.resumed += 1
            return self.done[unit]
        line = json.dumps({"unit": unit, "value": compute()}, sort_keys=True) + "\n"  # NaN/inf kept exactly
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            data = memoryview(line.encode())
            while data:  # one write for a regular file; the loop only guards against a short write
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        self.done[unit] = value = json.loads(line)["value"]
        return value


def open_run(out: Path, cfg: dict) -> RunLog:
    """Start (or resume) the run in ``out`` once it is known to be valid: creates the folder, writes
    ``config.json`` (or checks that the one there is this configuration, else ``ValueError``) and
    returns the :class:`RunLog` of its finished units (a resumed run says so on stderr).

    ``config.json`` is written here, after every check that can fail (options, model, data, image
    choice, budgets) and before the first result, so a run that fails leaves no config.json, and a
    folder's config.json always describes the rows beside it: a run of another configuration is
    refused instead of overwriting it.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    new = _same_json({k: v for k, v in cfg.items() if not k.startswith("_")})
    path = out / CONFIG
    if path.is_file():
        old = json.loads(path.read_text())
        diff = _differences(old, new, only_given=False)
        if diff:
            raise ValueError(f"--out {str(out)!r} holds a run with another configuration (differs in {diff}); "
                             "give another --out, or remove that folder to start it again")
    else:
        write_json(path, cfg)
    log = RunLog(out)
    if log.done:
        print(f"resuming the run in {out}/: {len(log.done)} finished unit(s) in {ROWS} are not recomputed",
              file=sys.stderr)
    return log


def setup(args, cfg: dict, *, train_split: bool = False, surrogate_seed: int | None = None,
          surrogate_model: str | None = None, autoencoder: bool = False,
          surrogate_seeds: tuple[int, ...] | None = None) -> SimpleNamespace:
    """The start every attack experiment shares, after its options are validated.

    Checks ``args.out`` (nothing is created: :func:`open_run` does it once the run is valid); derives
    the run's keys from ``args.seed`` (``k_data`` picks the images, ``k_attack`` and ``k_def_images``
    are split per image by :func:`rnd_jax.evaluate.image_keys`, ``k_def_acc`` draws the
    defended-accuracy noise: the same derivation in every experiment, so the same seed picks the same
    images everywhere); loads or trains ``cfg["model"]`` on ``cfg["dataset"]`` with seed
    ``args.train_seed`` (recorded in ``cfg["train"]``); loads the test split (and the training split
    with ``train_split``), a surrogate trained with ``surrogate_seed`` when given, and with ``autoencoder`` the
    decoder of the dataset's autoencoder (:mod:`rnd_jax.autoencoder`, default config, recorded in
    ``cfg["autoencoder_train"]``); with ``surrogate_seeds``, one model of ``surrogate_model`` trained with each
    seed (``surrogates``: the Subspace attack's reference models, recorded in ``cfg["surrogates_train"]``).
    """
    import jax
    import numpy as np

    from rnd_jax import data, models, train, weights
    from rnd_jax.defenses import model_scorer
    from rnd_jax.evaluate import predict

    out = check_out(args.out)
    from rnd_jax import compile_cache
    compile_cache.enable()  # a second run loads its programs (RND_JAX_COMPILE_CACHE=off: none)
    show = not args.no_progress
    t_start = time.time()
    _, k_data, k_attack, k_defense = jax.random.split(jax.random.key(args.seed), 4)
    k_def_images, k_def_acc = jax.random.split(k_defense)
    ds = data.info(cfg["dataset"])
    if getattr(args, "weights", None):
        model = models.get_model(cfg["model"], ds.num_classes)
        params = weights.load_params(model, args.weights, ds.image_shape)
        cfg["train"] = {"weights": str(args.weights)}
    else:
        train_cfg = train.TrainConfig(seed=args.train_seed)
        model, params = train.load_or_train(cfg["model"], cfg["dataset"], train_cfg, cache_dir=args.cache_dir,
                                            data_dir=args.data_dir, progress=show)
        cfg["train"] = dataclasses.asdict(train_cfg)
    clean = model_scorer(model, params, compact=True)  # finished images cost no model time
    x_train = y_train = surrogate = None
    if cfg["dataset"] == data.IMAGENET:  # a fixed class-balanced val subset; it is also the starting-point pool
        x_test, y_test = data.load_imagenet(args.data_dir, "val", n=args.imagenet_images, balanced=True)
        if train_split:
            x_train, y_train = x_test, y_test
    else:
        x_test, y_test = data.load(cfg["dataset"], "test", data_dir=args.data_dir)
        if train_split:
            x_train, y_train = data.load(cfg["dataset"], "train", data_dir=args.data_dir)
    acc_clean = float(np.mean(predict(clean, x_test, batch_size=256) == y_test))
    if surrogate_seed is not None:
        sur_cfg = train.TrainConfig(seed=surrogate_seed)
        s_model, s_params = train.load_or_train(surrogate_model or cfg["model"], cfg["dataset"], sur_cfg,
                                                cache_dir=args.cache_dir, data_dir=args.data_dir, progress=show)
        cfg["surrogate_train"] = dataclasses.asdict(sur_cfg)
        surrogate = model_scorer(s_model, s_params)
    surrogates = None
    if surrogate_seeds is not None:
        refs, cfg["surrogates_train"] = [], []
        for seed in surrogate_seeds:
            ref_cfg = train.TrainConfig(seed=seed)
            r_model, r_params = train.load_or_train(surrogate_model or cfg["model"], cfg["dataset"], ref_cfg,
                                                    cache_dir=args.cache_dir, data_dir=args.data_dir, progress=show)
            cfg["surrogates_train"].append(dataclasses.asdict(ref_cfg))
            refs.append(model_scorer(r_model, r_params))
        surrogates = tuple(refs)
    decoder = None
    if autoencoder:
        from rnd_jax import autoencoder as ae
        decoder = ae.load_decoder(cfg["dataset"], cache_dir=args.cache_dir, data_dir=args.data_dir, progress=show)
        cfg["autoencoder_train"] = dataclasses.asdict(ae.AutoencoderConfig())
    return SimpleNamespace(out=out, show=show, t_start=t_start, k_data=k_data, k_attack=k_attack,
                           k_def_images=k_def_images, k_def_acc=k_def_acc, model=model, params=params,
                           clean=clean, x_test=x_test, y_test=y_test, x_train=x_train, y_train=y_train,
                           acc_clean=acc_clean, surrogate=surrogate, surrogates=surrogates, autoencoder=decoder)


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
    """Strict JSON (NaN/inf as null), written to a temporary file and renamed into place (atomic)."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(clean_json(obj), indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_timing(out: Path, timing: dict, t_start: float) -> None:
    """``timing.json``: wall-clock seconds per part plus ``total`` since ``t_start``; kept apart from the
    results so those stay bit-identical between runs."""
    write_json(out / "timing.json", {**timing, "total": time.time() - t_start})


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
