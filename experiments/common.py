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


def add_run_args(p, out: str) -> None:
    """Seeds, folders and progress: the options every attack experiment shares (see :func:`setup`)."""
    p.add_argument("--seed", type=int, default=0, help="root seed of image choice, targets, attack and defense")
    p.add_argument("--train-seed", type=int, default=0, help="seed of model training (part of the checkpoint key)")
    p.add_argument("--out", default=out, help="output folder")
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


def setup(args, cfg: dict, *, train_split: bool = False, surrogate_seed: int | None = None,
          surrogate_model: str | None = None) -> SimpleNamespace:
    """The start every attack experiment shares, after its options are validated.

    Creates ``args.out``; derives the run's keys from ``args.seed`` (``k_data`` picks the images,
    ``k_attack`` and ``k_def_images`` are split per image by :func:`rnd_jax.evaluate.image_keys`,
    ``k_def_acc`` draws the defended-accuracy noise: the same derivation in every experiment, so the
    same seed picks the same images everywhere); loads or trains ``cfg["model"]`` on ``cfg["dataset"]``
    with seed ``args.train_seed`` (recorded in ``cfg["train"]``); loads the test split (and the
    training split with ``train_split``), and a surrogate trained with ``surrogate_seed`` when given.
    """
    import jax
    import numpy as np

    from rnd_jax import data, models, train, weights
    from rnd_jax.defenses import model_scorer
    from rnd_jax.evaluate import predict

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
    clean = model_scorer(model, params)
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
    return SimpleNamespace(out=out, show=show, t_start=t_start, k_data=k_data, k_attack=k_attack,
                           k_def_images=k_def_images, k_def_acc=k_def_acc, model=model, params=params,
                           clean=clean, x_test=x_test, y_test=y_test, x_train=x_train, y_train=y_train,
                           acc_clean=acc_clean, surrogate=surrogate)


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
