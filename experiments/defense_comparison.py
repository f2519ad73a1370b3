"""Defenses compared at equal clean-accuracy cost, per layer, and against non-random baselines.

Mirrors, on our model and data:

- randomized feature defense (RFD) Tables 1-2: output, input and feature noise calibrated to a
  ~1% and ~2% drop of expected clean accuracy (:mod:`rnd_jax.calibrate`), then attacked
  (untargeted, l_inf eps 0.15, the attack settings of RFD App. D.3) by score-based attacks, under
  RFD's protocol: stop rule ``verified`` (``--stop-rule``), ``--n-images`` drawn from the whole test
  set with every class (``--pool all --balanced``), robust accuracy over all of them (misclassified
  images count as not robust) at 1 000 and 10 000 queries, from the stop rule's verdict;
- RFD Tables 6/14: feature noise at each marked layer alone, calibrated to the same drop, with the
  mean ratio ``||grad_h L|| / ||grad_x L||`` of the clean model on the attacked images and NES's
  robust accuracy (same protocol);
- Aithal & Li Table 5 / Lemma 2: targeted NES under output quantization (8/4/2 bits) and
  output-correlated noise ``v = alpha F(x) + eps``, beside white output noise of the same output
  SNR as each quantization (``sigma = Delta/sqrt(12)``, ``Delta = 1/(2^bits - 1)``), with the
  cross-entropy and the C&W loss, under Aithal & Li's protocol (stop rule single; ASR = the attack's
  own verdict ``asr_lucky``, the majority check ``asr`` beside it).

Default run (digits, 50 images; about 10 minutes on 2 CPU cores)::

    python -m experiments.defense_comparison --out runs/defense_comparison

Outputs under ``--out``: ``results.json`` (every table and the calibrations), ``results.csv``
(main table), ``layers.csv``, ``baselines.csv``, ``calibration.csv``, ``config.json``,
``robust_accuracy.png``, ``artifacts/<table>-<row>-<attack>.npz`` (each attack cell's final points, traces
and per-image records: :mod:`rnd_jax.artifacts`; e.g. ``main-output_noise-0.01-nes.npz``,
``layer-conv1-nes.npz``, ``baseline-quantize_4_bit-nes-xent.npz``) and ``timing.json``. ``rows.jsonl`` holds each calibration and each row of
the tables as soon as it is finished (a row of the main table is one defense cell, all attacks): a
killed run, started again with the same options, skips those and ends with the same ``results.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from experiments.common import (add_protocol_args, apply_smoke, check_out, check_resumable, cli,  # noqa: E402
                                dataset_info, given_options, open_run, resolve_model, setup, table, write_csv,
                                write_json, write_timing)
from rnd_jax import artifacts, data, grids, models  # noqa: E402
from rnd_jax.attacks import ATTACKS, Context, make_attack  # noqa: E402
from rnd_jax.calibrate import calibrate  # noqa: E402
from rnd_jax.defenses import DEFENSES, build_defense  # noqa: E402
from rnd_jax.evaluate import POOLS, Protocol, evaluate_cell, image_keys, select_images  # noqa: E402

FAMILIES = ("output_noise", "input_noise", "feature_noise")
DEFAULT_ATTACKS = ("nes", "square_linf", "signhunter")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.defense_comparison",
                                description="Defenses at equal clean-accuracy drop vs score-based attacks "
                                            "(RFD Tables 1/2/6/14, Aithal & Li Table 5).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="digits", help=f"one of {data.DATASETS}")
    p.add_argument("--model", default=None, help="default: the dataset's model")
    p.add_argument("--attacks", nargs="+", default=None,
                   help=f"score attacks for the main table, or 'all'; default: those of {DEFAULT_ATTACKS} registered")
    p.add_argument("--n-images", type=int, default=50)
    p.add_argument("--budgets", type=int, nargs="+", default=[1_000, 10_000], help="query budgets (the largest is run)")
    p.add_argument("--drops", type=float, nargs="+", default=[0.01, 0.02], help="clean-accuracy drops to calibrate to")
    p.add_argument("--layer-drop", type=float, default=0.02, help="accuracy drop for the per-layer table")
    p.add_argument("--layers", nargs="+", default=None, help="marked layers for the per-layer table (default: all)")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2], help="quantization bits for the baseline table")
    p.add_argument("--alphas", type=float, nargs="+", default=[1e-3, 1e-1], help="correlated-noise alphas")
    p.add_argument("--corr-eps", type=float, default=1e-6, help="std of the white part of correlated noise")
    p.add_argument("--draws", type=int, default=20, help="noise draws for calibration / defended accuracy")
    add_protocol_args(p, "verified")
    p.add_argument("--pool", default="all", choices=POOLS, help="RFD tables: images from the whole test set (all) or "
                                                               "only correctly classified ones (correct)")
    p.add_argument("--balanced", action=argparse.BooleanOptionalAction, default=True,
                   help="RFD tables: the same number of images of every class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--out", default="runs/defense_comparison",
                   help="output folder (created once the run is valid; the same options run again there resume "
                        "it, another configuration is refused)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--smoke", action="store_true",
                   help="tiny run for tests: 4 images, budget 510, 4 draws, drop 0.02, NES, the last marked layer, "
                        "2 bits, no correlated noise, baselines with the cross-entropy loss only; options given "
                        "explicitly keep their value")
    p.add_argument("--no-progress", action="store_true")
    return p


SMOKE = {"n_images": 4, "budgets": [510], "draws": 4, "bits": [2], "alphas": [], "drops": [0.02],
         "attacks": ["nes"]}  # options left unset only (and --layers: the last marked layer)


def attack_config(name: str, targeted: bool = False, **overrides) -> dict:
    """An attack's configuration here: untargeted under RFD's settings and radius, targeted (the baselines)
    with its battery configuration."""
    conf = {k: v for k, v in ATTACKS[name].battery.items() if k != "budget"}
    if not targeted:
        conf |= grids.untargeted_threat({"name": name, "config": grids.RFD_CONFIG.get(name, {})})["config"]
    return conf | overrides | {"targeted": targeted}


def configure(args, given: set[str] = frozenset()) -> dict:
    """Validate every option and resolve defaults — before any model is trained or traced.

    ``given``: the options given explicitly (:func:`experiments.common.given_options`); ``--smoke``
    changes only the others."""
    smoke = apply_smoke(args, given, SMOKE)
    check_out(args.out)
    ds = dataset_info(args.dataset, args)
    model_name = resolve_model(args, ds)
    score = sorted(n for n, s in ATTACKS.items() if s.family == "score" and s.supports_untargeted)
    if args.attacks in (None, ["all"]):
        attacks = score if args.attacks else [a for a in DEFAULT_ATTACKS if a in score]
    else:
        attacks = list(args.attacks)
        bad = [a for a in attacks if a not in score]
        if bad:
            raise ValueError(f"unknown or non-score/untargeted attack(s) {bad}; choose from {score}")
    for d in list(args.drops) + [args.layer_drop]:
        if not 0 < d < 1:
            raise ValueError(f"accuracy drops must be in (0, 1), got {d}")
    if not args.budgets or min(args.budgets) <= 0:
        raise ValueError("budgets must be positive")
    for b in args.bits:
        if not 1 <= b <= 16:
            raise ValueError(f"bits must be in 1..16, got {b}")
    for a in list(args.alphas) + [args.corr_eps]:
        if not (math.isfinite(a) and a >= 0):
            raise ValueError(f"alphas and --corr-eps must be finite and >= 0, got {a}")
    if args.n_images <= 0 or args.draws <= 0:
        raise ValueError("--n-images and --draws must be positive")
    marked = models.perturb_names(models.get_model(model_name, ds.num_classes), ds.image_shape)
    if args.smoke and args.layers is None:
        args.layers = smoke["smoke_set"]["layers"] = [marked[-1]]
    layers = list(args.layers or marked)
    bad = [layer for layer in layers if layer not in marked]
    if bad:
        raise ValueError(f"unknown layer(s) {bad}; {model_name} marks {list(marked)}")
    budget = max(args.budgets)
    ctx = Context(np.zeros((ds.num_classes,) + ds.image_shape, np.float32), np.arange(ds.num_classes, dtype=np.int32),
                  ds.num_classes, surrogate=lambda x, keys: None)
    steps = [(a, attack_config(a)) for a in attacks] + [("nes", attack_config("nes", True, loss=loss))
                                                        for loss in ("xent", "cw")]
    for a, conf in steps:  # building an attack traces nothing; its cost is its worst-case step
        cost = make_attack(a, ctx, **conf).cost
        if budget < cost:
            raise ValueError(f"--budgets: the largest, {budget}, is smaller than one step of {a} ({cost} queries)")
    cfg = {"experiment": "defense_comparison", "dataset": args.dataset, "model": model_name,
            "num_classes": ds.num_classes, "image_shape": list(ds.image_shape), "attacks": attacks,
            "budgets": sorted(args.budgets), "drops": list(args.drops), "layer_drop": args.layer_drop,
            "layers": layers, "bits": list(args.bits), "alphas": list(args.alphas), "corr_eps": args.corr_eps,
            "n_images": args.n_images, "draws": args.draws, "seed": args.seed, "train_seed": args.train_seed,
            "stop_rule": args.stop_rule, "count_checks": args.count_checks, "pool": args.pool,
            "balanced": args.balanced, "eps": grids.UNTARGETED_EPS, "budget_run": budget, "train": None, **smoke,
            "images": None}
    check_resumable(args.out, cfg)
    return cfg


def main(argv=None) -> dict:
    parser = get_parser()
    args = parser.parse_args(argv)
    try:
        cfg = configure(args, given_options(parser, argv, args))
    except ValueError as e:
        parser.error(str(e))
    needs_surrogate = any("surrogate" in ATTACKS[a].needs for a in cfg["attacks"])
    run_ = setup(args, cfg, train_split=True, surrogate_seed=args.train_seed + 1 if needs_surrogate else None)
    out, show, t_start, model, params, clean = run_.out, run_.show, run_.t_start, run_.model, run_.params, run_.clean
    k_data, k_attack, k_def_images, k_calib = run_.k_data, run_.k_attack, run_.k_def_images, run_.k_def_acc
    x_test, y_test, x_train, y_train, surrogate = run_.x_test, run_.y_test, run_.x_train, run_.y_train, run_.surrogate
    timing = {}
    shape = tuple(cfg["image_shape"])
    ctx = Context(jnp.asarray(x_train), jnp.asarray(y_train), cfg["num_classes"], surrogate)
    budget = cfg["budget_run"]

    sel_u = select_images(k_data, clean, x_test, y_test, cfg["n_images"], False, cfg["num_classes"], pool=cfg["pool"],
                          balanced=cfg["balanced"])
    sel_t = select_images(k_data, clean, x_test, y_test, cfg["n_images"], True, cfg["num_classes"])
    keys_u = image_keys(k_attack, k_def_images, sel_u.index)
    keys_t = image_keys(k_attack, k_def_images, sel_t.index)
    cfg["images"] = {"untargeted": {"selected": int(sel_u.selected), "attacked": int(len(sel_u.labels))},
                     "targeted": {"selected": int(sel_t.selected), "attacked": int(len(sel_t.labels))}}
    log = open_run(out, cfg)  # the run is valid: config.json, then one line per finished row

    def attack_cell(name, defended, tag, targeted=False, sel=sel_u, keys=keys_u, **overrides):
        """One cell: untargeted under RFD's protocol and attack settings, targeted under Aithal & Li's; its
        artifact is :func:`artifact_file` of the parts ``tag``."""
        conf = attack_config(name, targeted, **overrides)
        attack = make_attack(name, ctx, **conf)
        rfd = dict(stop_rule=cfg["stop_rule"], count_checks=cfg["count_checks"], pool=cfg["pool"],
                   balanced=cfg["balanced"])
        protocol = Protocol(n_images=cfg["n_images"], targeted=targeted, budget=budget, eps=conf.get("eps"),
                            norm=conf.get("norm", "linf"), acc_draws=cfg["draws"], **({} if targeted else rfd))
        keep = {}
        row, _ = evaluate_cell(attack, defended, clean, sel, keys, protocol, cfg["budgets"], keep=keep)
        artifacts.write(artifact_file(out, *tag), keep)  # before the row is logged
        return row

    def as_level(fam, level):
        """A calibratable family's level as a 0-d array: a program argument, so one compiled runner serves
        every level of the family (:mod:`rnd_jax.pytree`)."""
        return jnp.float32(level) if DEFENSES[fam].calibratable and level != 0 else level

    def robust_all(r, b):
        """Robust accuracy over all selected images within ``b`` queries, from the stop rule's verdict."""
        return (1.0 - r[f"asr_stop_at_{b}"]) * r["n_images"] / r["n_selected"]

    # 1. calibration
    t0 = time.time()
    calibs = []
    def calibration(fam, d):
        c = calibrate(model, params, fam, d, x_test, y_test, k_calib, draws=cfg["draws"])
        return {"family": fam, "target_drop": d, "level": c.level, "accuracy": c.accuracy,
                "clean_accuracy": c.clean_accuracy, "drop": c.drop, "evaluations": c.evaluations}

    for fam in tqdm(FAMILIES, desc="calibrate", disable=not show):
        for d in cfg["drops"]:
            calibs.append(log.unit(f"calibration/{fam}/{d!r}", lambda: calibration(fam, d)))
    timing["calibration"] = time.time() - t0

    # 2. main table
    t0 = time.time()
    cells = [("none", 0.0, None, calibs[0]["clean_accuracy"])]
    cells += [(c["family"], c["level"], c["target_drop"], c["accuracy"]) for c in calibs]
    main_rows = []
    total = len(cells) * len(cfg["attacks"])
    with tqdm(total=total, desc="attack x defense", disable=not show) as bar:
        def main_row(fam, level, drop, acc):
            defended = build_defense(fam, model, params, as_level(fam, level), shape)
            row = {"defense": fam, "target_drop": drop, "level": level, "accuracy": acc}
            for a in cfg["attacks"]:
                r = attack_cell(a, defended, ("main", fam, drop, a))
                for b in cfg["budgets"]:
                    row[f"{a}_asr_{b}"] = r[f"asr_stop_at_{b}"]
                    row[f"{a}_robust_{b}"] = robust_all(r, b)
                row[f"{a}_queries_mean"] = r["queries_mean"]
                row[f"{a}_check_queries_mean"] = r["check_queries_mean"]
                bar.update()
            return row

        for fam, level, drop, acc in cells:
            if f"main/{fam}/{drop!r}" in log:
                bar.update(len(cfg["attacks"]))
            main_rows.append(log.unit(f"main/{fam}/{drop!r}", lambda: main_row(fam, level, drop, acc)))
    timing["main_table"] = time.time() - t0

    # 3. per-layer feature noise
    t0 = time.time()
    layer_rows = []
    gx, gh = models.input_and_feature_grad_norms(model, params, jnp.asarray(sel_u.images), jnp.asarray(sel_u.labels))
    def layer_row(layer):
        c = calibrate(model, params, "feature_noise", cfg["layer_drop"], x_test, y_test, k_calib, draws=cfg["draws"],
                      layers=layer)
        r = attack_cell("nes", build_defense("feature_noise", model, params, as_level("feature_noise", c.level), shape,
                                             layers=layer), ("layer", layer, "nes"))
        return {"layer": layer, "nu": c.level, "accuracy": c.accuracy,
                "grad_ratio": float(np.mean(np.asarray(gh[layer] / gx))),
                **{f"nes_robust_{b}": robust_all(r, b) for b in cfg["budgets"]}}

    for layer in tqdm(cfg["layers"], desc="layers", disable=not show):
        layer_rows.append(log.unit(f"layer/{layer}", lambda: layer_row(layer)))
    timing["layers"] = time.time() - t0

    # 4. quantization / correlated noise vs white noise of matched output SNR (targeted NES)
    t0 = time.time()
    base = [] if args.smoke else [("none", "none", 0.0, {})]
    base += [(f"quantize {b} bit", "quantize", b, {}) for b in cfg["bits"]]
    base += [(f"white sigma={1 / (2 ** b - 1) / math.sqrt(12):.2g} (SNR of {b} bit)", "output_noise",
              1 / (2 ** b - 1) / math.sqrt(12), {}) for b in cfg["bits"]]
    base += [(f"correlated alpha={a:g}", "correlated_noise", a, {"sigma": cfg["corr_eps"]}) for a in cfg["alphas"]]
    base_rows = []
    def base_row(label, fam, level, opts):
        defended = build_defense(fam, model, params, as_level(fam, level), shape, **opts)
        row = {"defense": label}
        for loss in ("xent",) if args.smoke else ("xent", "cw"):  # smoke: one loss (a compiled program less)
            r = attack_cell("nes", defended, ("baseline", label, "nes", loss), targeted=True, sel=sel_t, keys=keys_t,
                            loss=loss)
            row[f"nes_{loss}_asr_lucky"] = r["asr_lucky"]
            row[f"nes_{loss}_asr"] = r["asr"]
            row[f"nes_{loss}_queries_mean"] = r["queries_mean"]
        return row

    for label, fam, level, opts in tqdm(base, desc="baselines", disable=not show):
        base_rows.append(log.unit(f"baseline/{label}", lambda: base_row(label, fam, level, opts)))
    timing["baselines"] = time.time() - t0

    b_lo, b_hi = cfg["budgets"][0], cfg["budgets"][-1]
    cols = [("defense", "defense", "s"), ("target_drop", "drop", ".2f"), ("level", "level", ".4g"),
            ("accuracy", "acc", ".4f")]
    for a in cfg["attacks"]:
        cols += [(f"{a}_robust_{b}", f"{a}@{b}", ".2f") for b in cfg["budgets"]]
    print(f"Robust accuracy over all {sel_u.selected} selected images (stop rule {cfg['stop_rule']}) at each budget:")
    print(table(main_rows, cols))
    print("\nFeature noise at each layer alone:")
    print(table(layer_rows, [("layer", "layer", "s"), ("nu", "nu", ".4g"), ("accuracy", "acc", ".4f"),
                             ("grad_ratio", "|g_h|/|g_x|", ".3f")] +
                [(f"nes_robust_{b}", f"nes@{b}", ".2f") for b in cfg["budgets"]]))
    print("\nTargeted NES vs non-random baselines (ASR = the attack's own verdict / majority of 9 checks):")
    print(table(base_rows, [("defense", "defense", "s"), ("nes_xent_asr_lucky", "xent", ".2f"),
                            ("nes_xent_asr", "xent maj", ".2f")] +
                ([] if args.smoke else [("nes_cw_asr_lucky", "cw", ".2f"), ("nes_cw_asr", "cw maj", ".2f")])))
    print(f"results in {out}/", file=sys.stderr)

    results = {"config": cfg, "calibration": calibs, "main": main_rows, "layers": layer_rows, "baselines": base_rows}
    write_json(out / "results.json", results)
    write_csv(out / "results.csv", main_rows, list(main_rows[0]))
    write_csv(out / "layers.csv", layer_rows, list(layer_rows[0]))
    write_csv(out / "baselines.csv", base_rows, list(base_rows[0]))
    write_csv(out / "calibration.csv", calibs, list(calibs[0]))
    _plot(main_rows, cfg["attacks"], b_lo, b_hi, out / "robust_accuracy.png")
    write_timing(out, {**timing, "resumed_rows": log.resumed}, t_start)
    return results


def _plot(rows, attacks, b_lo, b_hi, path):
    labels = [r["defense"] if r["target_drop"] is None else f"{r['defense']}\n~{100 * r['target_drop']:g}%"
              for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    width = 0.8 / max(1, len(attacks))
    for i, a in enumerate(attacks):
        xs = np.arange(len(rows)) + i * width
        ax.bar(xs, [100 * r[f"{a}_robust_{b_hi}"] for r in rows], width, label=f"{a} @ {b_hi}")
        ax.scatter(xs, [100 * r[f"{a}_robust_{b_lo}"] for r in rows], color="k", s=10, zorder=3,
                   label=f"@ {b_lo}" if i == 0 else None)
    ax.set_xticks(np.arange(len(rows)) + 0.4 - width / 2, labels, fontsize=7)
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def artifact_file(out, *parts):
    """``artifacts/<parts joined by '-'>.npz`` (:func:`rnd_jax.artifacts.row_path`), e.g. ``main-none-None-nes``."""
    return artifacts.row_path(out, *parts)


if __name__ == "__main__":
    cli(main)
