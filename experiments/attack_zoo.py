"""The attack zoo: every registered score-based attack against output noise and input noise.

For each score attack of the registry (``rnd_jax.attacks.ATTACKS``, family ``"score"`` — new attack
modules join automatically) and each defense cell — the undefended model, output noise of std
sigma on the probabilities (Aithal & Li 2022, post-processed ``min(|F(x) + sigma*v|, 1)``), and
input noise of std nu on the query image (SND, Byun et al. 2022) — the attack runs on
``--n-images`` correctly classified test images with its registered battery configuration (its
norm, eps and documented query budget). The table has the shape of Aithal & Li's Tables 2/9 and
SND's Table 3: ASR, mean queries and L2 distortion per attack and noise level. The protocol is
:mod:`rnd_jax.evaluate`'s, with the stop rule of those papers (``single``: the attack's own noisy
verdict ends it; ``--stop-rule verified`` for the randomized feature defense paper's): ``asr_lucky``
— that verdict (Aithal & Li's ASR); ``asr`` — the final point fools a majority of 9 extra defended queries
and lies within the attack's eps-ball; ``asr_clean`` (fools the undefended model); ``asr_lucky``
(the attack's own belief); queries of successes (budgeted queries only, success checks included);
the 9 evaluation queries per image are not part of any budget and are reported on their own
(``check_queries``); distortion; defended clean accuracy over ``--acc-draws`` noise draws.

sigma = 0 and nu = 0 are the same undefended cell; it runs once. All cells share the images,
targets and keys (common random numbers), so differences between cells come from the defense.
P-RGF's transfer prior comes from a surrogate trained separately on the training split
(``--surrogate-seed``, default 1, and optionally ``--surrogate-model``), the Subspace attack's two reference
models likewise (seeds ``--surrogate-seed`` and ``--surrogate-seed`` + 1); ZOO-AE and AutoZOOM-AE search the
latent code of an autoencoder trained on the training split (:mod:`rnd_jax.autoencoder`, cached).

Default run (digits, targeted, 50 images, 13 attacks x 6 cells, sigma in {0, 1e-4, 1e-3, 1e-2}, nu in
{0, 1e-3, 1e-2}; about 13 minutes wall and 9 CPU-minutes on 2 shared CPU cores; each cell compiles its
own runner, at XLA backend optimisation level 1 by default, which compiles several times faster than
XLA's default level with about the same run time)::

    python -m experiments.attack_zoo --out runs/attack_zoo

Outputs under ``--out``: ``results.json`` (config, one row per attack x cell, per-image records;
the same seed gives a bit-identical file), ``results.csv``, ``config.json``, ``asr_vs_noise.png``,
``asr_vs_queries-<attack>.png`` (success vs queries per defense cell), ``artifacts/<attack>-<defense>-<level>.npz``
(each row's final points, traces and per-image records: :mod:`rnd_jax.artifacts`) and ``timing.json``
(wall-clock seconds per cell, kept apart so results stay reproducible).
``rows.jsonl`` holds each (attack, cell) row as soon as it is finished: a killed run, started again
with the same options, skips those rows and ends with the same ``results.json``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from experiments.common import (add_model_args, add_protocol_args, add_run_args, apply_smoke, check_out, check_resumable,
                                cli, dataset_info, given_options, open_run, resolve_model, setup, table, write_csv,
                                write_json, write_timing)
from rnd_jax import autoencoder, models, plots, pytree
from rnd_jax import artifacts
from rnd_jax.attacks import ATTACKS, Context, make_attack
from rnd_jax.defenses import check_level, input_noise, output_noise
from rnd_jax.evaluate import (Protocol, cell_inputs, defended_accuracy, image_keys, make_runner, run_cell, select_images,
                              validate_selection)
from rnd_jax.oracle import Oracle

plt = plots.plt  # the headless (Agg) pyplot configured by rnd_jax.plots

DEFAULT_SIGMAS = (0.0, 1e-4, 1e-3, 1e-2)
DEFAULT_NUS = (0.0, 1e-3, 1e-2)
SMOKE_BUDGET = 200  # per attack in --smoke (at least two steps of the attack)

COLUMNS = [
    ("attack", "attack", "s"), ("goal", "goal", "s"), ("defense", "defense", "s"), ("level", "level", ".0e"),
    ("norm", "norm", "s"), ("eps", "eps", "g"), ("budget", "budget", "d"),
    ("asr", "asr", ".2f"), ("asr_clean", "asr_clean", ".2f"), ("asr_lucky", "asr_lucky", ".2f"),
    ("queries_mean", "q_mean", ".0f"), ("queries_median", "q_median", ".0f"), ("l2", "L2", ".3f"),
    ("linf", "Linf", ".3f"), ("acc_defended_mean", "acc_def", ".4f"), ("check_queries", "check_q", "d"),
]
CSV_EXTRA = ["queries_total", "within_eps", "l2_per_pixel", "acc_clean", "acc_defended_worst", "n_images"]


def score_attacks() -> list[str]:
    return sorted(n for n, s in ATTACKS.items() if s.family == "score")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.attack_zoo",
        description="Every registered score-based attack against output-noise (sigma) and input-noise (nu) "
                    "defenses: ASR / queries / distortion (Aithal & Li 2022 Tables 2/9; SND Table 3).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--attacks", nargs="+", default=None,
                   help=f"score attacks to run (default: all registered: {', '.join(score_attacks())})")
    p.add_argument("--n-images", type=int, default=50, help="correctly classified test images to attack")
    p.add_argument("--max-queries", type=int, default=None,
                   help="query budget per image for every attack (default: each attack's documented budget)")
    p.add_argument("--sigmas", type=float, nargs="+", default=list(DEFAULT_SIGMAS),
                   help="output-noise std levels on probabilities (smoke: [0, 1e-2])")
    p.add_argument("--nus", type=float, nargs="+", default=list(DEFAULT_NUS), help="input-noise std levels (smoke: [0])")
    p.add_argument("--eps-linf", type=float, default=None,
                   help="radius of the l_inf attacks (default: the battery's, for 8x8 digits; e.g. 8/255 = 0.0314)")
    p.add_argument("--eps-l2", type=float, default=None, help="radius of the l2 attacks (default: the battery's)")
    p.add_argument("--targeted", action=argparse.BooleanOptionalAction, default=True,
                   help="targeted attacks (random target != label); --no-targeted for untargeted")
    p.add_argument("--surrogate-seed", type=int, default=1,
                   help="seed of the surrogate model's training (transfer priors); must differ from --train-seed")
    p.add_argument("--surrogate-model", default=None, help="surrogate architecture; default: the attacked model's")
    p.add_argument("--acc-draws", type=int, default=40, help="noise draws for the defended clean accuracy")
    add_protocol_args(p, "single")
    add_run_args(p, "runs/attack_zoo")
    p.add_argument("--xla-opt-level", type=int, default=1, choices=(0, 1, 2, 3),
                   help="XLA backend optimisation level of each cell's runner (3 = XLA's default): level 1 "
                        "compiles several times faster than 3 and runs about as fast; results are "
                        "reproducible for a given level (and may differ in the last bits between levels)")
    p.add_argument("--smoke", action="store_true",
                   help=f"tiny run for tests: all chosen attacks, 4 images, budget <= {SMOKE_BUDGET} "
                        "(or two steps), sigma in {0, 1e-2}, nu in {0}, 4 accuracy draws; options given "
                        "explicitly keep their value")
    return p


def reference_seeds(surrogate_seed: int) -> tuple[int, ...]:
    """Training seeds of the Subspace attack's reference models: ``surrogate_seed`` and the next ones
    (:data:`rnd_jax.attacks.registry.SURROGATE_OFFSETS`, counted from P-RGF's surrogate)."""
    from rnd_jax.attacks.registry import SURROGATE_OFFSETS

    return tuple(surrogate_seed + o - SURROGATE_OFFSETS[0] for o in SURROGATE_OFFSETS)


def _positive_int(name, v):
    if v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v}")


def _placeholder_context(ds) -> Context:
    """A Context with every field filled, to build attacks (no tracing) while validating options."""
    shape = ds.image_shape
    return Context(train_images=np.zeros((ds.num_classes,) + shape, np.float32),
                   train_labels=np.arange(ds.num_classes, dtype=np.int32), num_classes=ds.num_classes,
                   surrogate=lambda x, keys: None, surrogates=(lambda x, keys: None,),
                   autoencoder=autoencoder.placeholder(shape))


def attack_config(name: str, targeted: bool, eps: dict | None = None, dataset: str = "digits") -> dict:
    """The attack's configuration for the goal, without the budget.

    On digits its battery configuration (norm, eps and the battery's overrides); on CIFAR-10 / ImageNet
    the settings of its paper at that size (:mod:`rnd_jax.presets`) with the battery's norm and radius.
    ``eps``: ``{norm: radius}`` replacing the radius of that norm (e.g. 8/255 on CIFAR-10)."""
    from rnd_jax import presets

    battery = {k: v for k, v in ATTACKS[name].battery.items() if k != "budget"}
    if dataset in presets.DATASETS and dataset != "digits":
        cfg = presets.attack_config(name, dataset, norm=battery["norm"], eps=battery["eps"])
    else:
        cfg = battery
    cfg["targeted"] = targeted
    if eps and eps.get(cfg.get("norm")) is not None:
        cfg["eps"] = eps[cfg["norm"]]
    return cfg


def cells(sigmas, nus) -> list[tuple[str, float]]:
    """(defense, level) cells: the undefended cell once, then output noise, then input noise."""
    out = [("none", 0.0)] if (0.0 in sigmas or 0.0 in nus) else []
    out += [("output_noise", s) for s in sigmas if s > 0]
    out += [("input_noise", v) for v in nus if v > 0]
    return out


def levels(defense: str, level: float) -> tuple[float, float]:
    """The cell's (sigma, nu): output-noise and input-noise levels, 0 for the defense it does not use."""
    return (level, 0.0) if defense == "output_noise" else (0.0, level) if defense == "input_noise" else (0.0, 0.0)


def defend_levels(clean, sigma_nu):
    """Input noise ``nu``, then output noise ``sigma`` (probabilities); a level of 0 leaves the answer as is.

    The levels may be traced, so every cell of an attack runs one compiled program."""
    return output_noise(input_noise(clean, sigma_nu[1]), sigma_nu[0], "probs")


def defend(clean, defense: str, level: float):
    return defend_levels(clean, levels(defense, level))


def _level_run(bundle, sigma_nu, *inputs):
    attack, clean, protocol = bundle
    return make_runner(attack, Oracle(defend_levels(clean, sigma_nu), attack.output), clean, protocol)(*inputs)


def level_runner(attack, clean, protocol, sel, keys, options):
    """One compiled protocol runner for every cell of an attack: ``runner(sigma_nu)(*inputs)``."""
    compiled = pytree.jit(_level_run).lower((attack, clean, protocol), jnp.zeros(2, jnp.float32),
                                            *cell_inputs(sel, keys)).compile(compiler_options=options)
    return lambda sigma_nu: functools.partial(compiled, jnp.asarray(sigma_nu, jnp.float32))


SMOKE = {"n_images": 4, "acc_draws": 4, "sigmas": [0.0, 1e-2], "nus": [0.0]}  # options left unset only


def configure(args, given: set[str] = frozenset()) -> dict:
    """Validate every option and resolve defaults — before any model is trained or traced.

    ``given``: the options given explicitly (:func:`experiments.common.given_options`); ``--smoke``
    changes only the others (and the per-attack budgets only without ``--max-queries``)."""
    smoke = apply_smoke(args, given, SMOKE)
    smoke_budget = args.smoke and "max_queries" not in given
    if smoke_budget:
        smoke["smoke_set"]["max_queries"] = f"per attack: min(its budget, max({SMOKE_BUDGET}, two steps))"
    check_out(args.out)
    ds = dataset_info(args.dataset, args)  # ValueError on an unknown dataset
    model_name = resolve_model(args, ds)  # unknown, or not built for the dataset's images: ValueError
    surrogate_model = args.surrogate_model or model_name
    models.check_fits(surrogate_model, ds.image_shape, ds.num_classes, ds.name)
    if surrogate_model == model_name and args.surrogate_seed == args.train_seed:
        raise ValueError("the surrogate must be trained separately: give --surrogate-seed != --train-seed "
                         "or another --surrogate-model")
    known = score_attacks()
    unknown = [n for n in (args.attacks or []) if n not in known]
    if unknown:
        raise ValueError(f"unknown score attack(s) {unknown}; choose from {known}")
    names = [n for n in known if n in args.attacks] if args.attacks else known  # registry order
    sigmas = sorted({check_level("sigma", s) for s in args.sigmas})
    nus = sorted({check_level("nu", v) for v in args.nus})
    grid = cells(sigmas, nus)
    if not grid:
        raise ValueError("--sigmas/--nus give no defense cell")
    _positive_int("--n-images", args.n_images)
    _positive_int("--acc-draws", args.acc_draws)
    if args.max_queries is not None:
        _positive_int("--max-queries", args.max_queries)
    for flag, v in (("--eps-linf", args.eps_linf), ("--eps-l2", args.eps_l2)):
        if v is not None and not (v > 0 and v < float("inf")):
            raise ValueError(f"{flag} must be a finite number > 0, got {v}")
    ctx = _placeholder_context(ds)
    runs, skipped = [], []
    for name in names:
        spec = ATTACKS[name]
        if not (spec.supports_targeted if args.targeted else spec.supports_untargeted):
            skipped.append(name)
            continue
        cfg = attack_config(name, args.targeted, {"linf": args.eps_linf, "l2": args.eps_l2}, args.dataset)
        attack = make_attack(name, ctx, **cfg)  # validates the config; nothing is traced
        budget = args.max_queries or spec.battery["budget"]
        if smoke_budget:
            budget = min(budget, max(SMOKE_BUDGET, 2 * attack.cost))
        if budget < attack.cost:
            raise ValueError(f"--max-queries {budget} is smaller than one step of {name} ({attack.cost} queries)")
        runs.append({"attack": name, "config": cfg, "budget": budget, "cost": attack.cost, "output": attack.output,
                     "needs": list(spec.needs)})
    refs = reference_seeds(args.surrogate_seed)
    if any("surrogates" in r["needs"] for r in runs) and surrogate_model == model_name and args.train_seed in refs:
        raise ValueError(f"the reference models (seeds {list(refs)}) must be trained separately: give a "
                         "--surrogate-seed that keeps --train-seed out of them, or another --surrogate-model")
    if not runs:
        raise ValueError(f"none of {names} supports {'targeted' if args.targeted else 'untargeted'} attacks")
    cfg = {
        "experiment": "attack_zoo", "dataset": args.dataset, "model": model_name, "num_classes": ds.num_classes,
        "surrogate_model": surrogate_model, "goal": "targeted" if args.targeted else "untargeted",
        "sigmas": sigmas, "nus": nus, "cells": [list(c) for c in grid], "attacks": runs,
        "skipped_attacks": skipped, "n_images": args.n_images, "check_queries": Protocol.check_queries,
        "stop_rule": args.stop_rule, "count_checks": args.count_checks,
        "acc_draws": args.acc_draws, "seed": args.seed, "train_seed": args.train_seed,
        "surrogate_seed": args.surrogate_seed, "train": None, "surrogate_train": None, **smoke,
        "xla_backend_optimization_level": args.xla_opt_level, "images": None,
    }
    check_resumable(args.out, cfg)
    return cfg


def _level_label(v: float) -> str:
    return "0" if v == 0 else f"{v:.0e}".replace("e-0", "e-")


def plot_zoo(rows, path, title: str):
    """ASR (majority of 9 defended checks) vs noise level, one line per attack; output noise on the
    left, input noise on the right (the undefended cell is level 0 of both)."""
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    markers = "os^vD<>pP*Xh"
    for ax, defense, label in ((axes[0], "output_noise", "output noise σ (probabilities)"),
                               (axes[1], "input_noise", "input noise ν (image)")):
        levels = sorted({r["level"] for r in rows if r["defense"] in (defense, "none")})
        pos = {v: i for i, v in enumerate(levels)}
        for i, name in enumerate(attacks):
            pts = sorted((r["level"], r["asr"]) for r in rows
                         if r["attack"] == name and r["defense"] in (defense, "none"))
            if pts:
                ax.plot([pos[v] for v, _ in pts], [100 * a for _, a in pts], marker=markers[i % len(markers)],
                        linestyle="-" if i < 10 else "--", label=name)
        ax.set_xticks(range(len(levels)), [_level_label(v) for v in levels])
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("ASR (%), majority of 9 defended checks")
    axes[0].set_ylim(-3, 103)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pivot(rows, key: str, fmt: str, grid) -> str:
    """One line per attack, one column per defense cell (the shape of Aithal & Li's Table 2)."""
    heads = [("none" if d == "none" else ("σ=" if d == "output_noise" else "ν=") + _level_label(v)) for d, v in grid]
    table_rows = []
    for name in dict.fromkeys(r["attack"] for r in rows):
        line = {"attack": name}
        for (d, v), h in zip(grid, heads):
            r = next((r for r in rows if r["attack"] == name and r["defense"] == d and r["level"] == v), None)
            val = None if r is None else r.get(key)
            line[h] = val
        table_rows.append(line)
    return table(table_rows, [("attack", key, "s")] + [(h, h, fmt) for h in heads])


def main(argv=None) -> dict:
    """Run the zoo; each (attack, cell) row is kept in ``rows.jsonl`` as it finishes, so a run started
    again with the same options and ``--out`` skips the finished rows (and compiles no runner for an
    attack whose cells are all done); another configuration in that ``--out`` is refused."""
    parser = get_parser()
    args = parser.parse_args(argv)
    try:
        cfg = configure(args, given_options(parser, argv, args))
    except ValueError as e:
        parser.error(str(e))
    targeted = cfg["goal"] == "targeted"
    grid = [tuple(c) for c in cfg["cells"]]
    needs_surrogate = any("surrogate" in r["needs"] for r in cfg["attacks"])
    needs_refs = any("surrogates" in r["needs"] for r in cfg["attacks"])
    run_ = setup(args, cfg, train_split=True, surrogate_seed=args.surrogate_seed if needs_surrogate else None,
                 surrogate_model=cfg["surrogate_model"],
                 surrogate_seeds=reference_seeds(args.surrogate_seed) if needs_refs else None,
                 autoencoder=any("autoencoder" in r["needs"] for r in cfg["attacks"]))
    out, show, t_start, clean = run_.out, run_.show, run_.t_start, run_.clean
    x_test, y_test, acc_clean, k_def_acc = run_.x_test, run_.y_test, run_.acc_clean, run_.k_def_acc
    ctx = Context(train_images=run_.x_train, train_labels=run_.y_train, num_classes=cfg["num_classes"],
                  surrogate=run_.surrogate, surrogates=run_.surrogates, autoencoder=run_.autoencoder)
    sel = select_images(run_.k_data, clean, x_test, y_test, cfg["n_images"], targeted, cfg["num_classes"])
    keys = image_keys(run_.k_attack, run_.k_def_images, sel.index)
    protocols, attacks = {}, {}
    for run in cfg["attacks"]:  # every attack checked against the chosen images before anything is written
        name = run["attack"]
        attacks[name] = attack = make_attack(name, ctx, **run["config"])
        protocols[name] = protocol = Protocol(n_images=cfg["n_images"], targeted=targeted, budget=run["budget"],
                                              acc_draws=cfg["acc_draws"], eps=run["config"]["eps"],
                                              norm=run["config"]["norm"], stop_rule=cfg["stop_rule"],
                                              count_checks=cfg["count_checks"])
        validate_selection(attack, Oracle(clean, attack.output), protocol, sel)
    cfg["images"] = {"attacked": int(len(sel.labels)), "selected": int(sel.selected)}
    log = open_run(out, cfg)  # the run is valid: config.json, then one line per finished row

    accuracy = {}  # per defense cell: the defended model's clean accuracy over noise draws
    for d, v in grid:
        accs = defended_accuracy(defend(clean, d, v), x_test, y_test, k_def_acc, cfg["acc_draws"])
        accuracy[(d, v)] = (float(accs.mean()), float(accs.min()))

    # One runner is compiled per attack (the noise levels are traced); a low XLA backend optimisation level
    # cuts its compile time several-fold.
    options = {"xla_backend_optimization_level": args.xla_opt_level}
    rows, images, timing = [], {}, {}
    bar = tqdm(total=len(cfg["attacks"]) * len(grid), desc="attack x cell", disable=not show)
    for run in cfg["attacks"]:
        name = run["attack"]
        attack, protocol = attacks[name], protocols[name]
        runner = None

        def cell(d, v):
            nonlocal runner
            if runner is None:  # compiled on the attack's first unfinished cell only
                t0 = time.time()
                runner = level_runner(attack, clean, protocol, sel, keys, options)
                timing[f"{name}/compile"] = time.time() - t0
            t0 = time.time()
            keep = {}
            metrics, records = run_cell(runner(levels(d, v)), sel, keys, protocol, keep=keep, clean=clean)
            artifacts.write(artifact_file(out, name, d, v), keep)  # before the row is logged
            row = {"attack": name, "goal": cfg["goal"], "defense": d, "level": v, "norm": protocol.norm,
                   "eps": protocol.eps, "budget": protocol.budget, **metrics}
            row.update(acc_clean=acc_clean, acc_defended_mean=accuracy[(d, v)][0],
                       acc_defended_worst=accuracy[(d, v)][1], check_queries=protocol.check_queries * cfg["n_images"])
            timing[f"{name}/{d}/{v:g}"] = time.time() - t0
            return {"row": row, "images": records}

        for d, v in grid:
            bar.set_postfix_str(f"{name} {d} {v:g}")
            cell_id = f"{name}/{d}/{v:g}"
            done = log.unit(f"{name}/{d}/{v!r}", lambda: cell(d, v))
            rows.append(done["row"])
            images[cell_id] = done["images"]
            bar.update()
    bar.close()

    print(table(rows, COLUMNS))
    for key_, fmt, what in (("asr", ".2f", "ASR (majority of 9 defended checks, within eps)"),
                            ("queries_mean", ".0f", "mean budgeted queries of successes"),
                            ("l2", ".3f", "mean L2 distortion of successes")):
        print(f"\n{what}:\n" + pivot(rows, key_, fmt, grid))
    print(f"\nclean accuracy {acc_clean:.4f}; {cfg['goal']}, {cfg['n_images']} images; check queries "
          f"({cfg['check_queries']} per image per cell) are outside every budget; results in {out}/",
          file=sys.stderr)
    if cfg["skipped_attacks"]:
        print(f"skipped (goal not supported): {cfg['skipped_attacks']}", file=sys.stderr)
    results = {"config": cfg, "rows": rows, "images": images}
    write_json(out / "results.json", results)
    write_csv(out / "results.csv", rows, [k for k, _, _ in COLUMNS] + CSV_EXTRA)
    plot_zoo(rows, out / "asr_vs_noise.png",
             f"{cfg['goal']} score attacks vs randomized defenses on {cfg['dataset']}/{cfg['model']} "
             f"({cfg['n_images']} images)")
    by_attack = {}
    for r in rows:
        f = artifact_file(out, r["attack"], r["defense"], r["level"])
        if f.exists():
            a = artifacts.read(f)
            by_attack.setdefault(r["attack"], {})[f"{r['defense']}@{r['level']:g}"] = (a["queries"], a["success"])
    for name, series in by_attack.items():
        plots.success_vs_queries(series, protocols[name].budget, out / f"asr_vs_queries-{name}.png",
                           f"{name} ({cfg['goal']}) on {cfg['dataset']}/{cfg['model']}")
    write_timing(out, {**timing, "resumed_rows": log.resumed}, t_start)
    return results


def artifact_file(out: Path, attack: str, defense: str, level: float) -> Path:
    """The artifact of one (attack, defense, level) row: ``artifacts/<attack>-<defense>-<level>.npz``."""
    return artifacts.row_path(out, attack, defense, float(level))


if __name__ == "__main__":
    cli(main)
