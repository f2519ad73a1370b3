"""NES vs output noise: attack success, queries and distortion as the defender's sigma grows.

Mirrors the NES row of Aithal & Li (2022) Table 2 (targeted soft-label ASR vs sigma) and its
Table 12 (per-pixel L2 distortion), on our own model and data. For each output-noise level sigma
the defended model answers ``min(|F(x) + sigma*v|, 1)``; targeted NES (J = 50 antithetic samples,
beta = 1e-3) attacks ``--n-images`` correctly classified test images with ``--max-queries`` queries
each. The protocol (image choice, asr by majority of 9 defended checks, asr_clean, asr_lucky,
distortion, defended clean accuracy over 40 draws) is :mod:`rnd_jax.evaluate`'s, with Aithal & Li's
stop rule ``single`` by default (the attack's own noisy verdict ends it; their ASR is that verdict,
``asr_lucky``); ``--stop-rule verified`` runs the randomized feature defense paper's rule instead.

Default run (digits, 100 images, 10 000 queries, 7 noise levels; a few minutes on 2 CPU cores)::

    python -m experiments.nes_vs_output_noise --out runs/nes_vs_output_noise

Outputs under ``--out``: ``results.json`` (config, one row per sigma, per-image records; the same
seed gives a bit-identical file), ``results.csv``, ``config.json``, ``asr_vs_sigma.png``,
``asr_vs_queries.png`` (success vs queries per sigma), ``artifacts/sigma=<s>.npz`` (each sigma's final
points, traces and per-image records: :mod:`rnd_jax.artifacts`) and ``timing.json`` (wall-clock seconds,
kept apart so results stay reproducible). ``rows.jsonl`` holds
each sigma's row as soon as it is finished: a killed run, started again with the same options, skips
those rows and ends with the same ``results.json``.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax.numpy as jnp
from tqdm.auto import tqdm

from experiments.common import (add_model_args, add_protocol_args, add_run_args, apply_smoke, check_out, check_resumable,
                                cli, dataset_info, given_options, open_run, resolve_model, setup, table, write_csv,
                                write_json, write_timing)
from rnd_jax.attacks import NESConfig, nes
from rnd_jax.defenses import OUTPUT_SPACES, check_level, output_noise
from rnd_jax import artifacts
from rnd_jax.evaluate import Protocol, defended_accuracy, evaluate_cell, image_keys, select_images
from rnd_jax.plots import asr_vs_level, success_vs_queries

DEFAULT_SIGMAS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)

COLUMNS = [
    ("sigma", "sigma", ".0e"), ("asr", "asr", ".2f"), ("asr_clean", "asr_clean", ".2f"),
    ("asr_lucky", "asr_lucky", ".2f"), ("queries_mean", "q_mean", ".0f"), ("queries_median", "q_median", ".0f"),
    ("l2", "L2", ".3f"), ("linf", "Linf", ".3f"), ("l2_per_pixel_e4", "L2/px e-4", ".1f"),
    ("acc_defended_mean", "acc_def", ".4f"), ("acc_defended_worst", "acc_worst", ".4f"),
]


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.nes_vs_output_noise",
        description="Targeted/untargeted NES against output-noise defenses over a grid of sigma "
                    "(Aithal & Li 2022, Table 2 / Table 12).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--n-images", type=int, default=100, help="correctly classified test images to attack")
    p.add_argument("--max-queries", type=int, default=10_000, help="query budget per image")
    p.add_argument("--sigmas", type=float, nargs="+", default=list(DEFAULT_SIGMAS), help="output-noise std levels")
    p.add_argument("--noise-space", default="probs", choices=OUTPUT_SPACES,
                   help="add noise to probabilities (paper's post-processing) or to logits")
    p.add_argument("--norm", default="linf", choices=("linf", "l2"), help="perturbation norm")
    p.add_argument("--eps", type=float, default=0.3, help="perturbation radius")
    p.add_argument("--targeted", action=argparse.BooleanOptionalAction, default=True, help="targeted attack")
    p.add_argument("--samples", type=int, default=50, help="NES samples J per step (even)")
    p.add_argument("--beta", type=float, default=1e-3, help="NES search variance")
    p.add_argument("--lr", type=float, default=None, help="NES step size (default eps/10 linf, eps/5 l2)")
    p.add_argument("--acc-draws", type=int, default=40, help="noise draws for the defended clean accuracy")
    add_protocol_args(p, "single")
    add_run_args(p, "runs/nes_vs_output_noise")
    p.add_argument("--smoke", action="store_true", help="tiny run for tests: 8 images, 1 000 queries, sigma 0 and 1e-2, 4 accuracy draws (options given "
                        "explicitly keep their value)")
    return p


SMOKE = {"n_images": 8, "max_queries": 1_000, "sigmas": [0.0, 1e-2], "acc_draws": 4}  # options left unset only


def configure(args, given: set[str] = frozenset()) -> dict:
    """Validate every option and resolve defaults — before any model is trained or traced.

    ``given``: the options given explicitly (:func:`experiments.common.given_options`); ``--smoke``
    changes only the others."""
    smoke = apply_smoke(args, given, SMOKE)
    check_out(args.out)
    ds = dataset_info(args.dataset, args)  # ValueError on an unknown dataset
    model_name = resolve_model(args, ds)  # ValueError on an unknown model or one not built for the dataset
    sigmas = [check_level("sigma", s) for s in args.sigmas]
    if not sigmas:
        raise ValueError("--sigmas needs at least one level")
    nes_cfg = NESConfig(eps=args.eps, norm=args.norm, targeted=args.targeted, samples=args.samples,
                        beta=args.beta, lr=args.lr)
    protocol = Protocol(n_images=args.n_images, targeted=args.targeted, budget=args.max_queries,
                        acc_draws=args.acc_draws, stop_rule=args.stop_rule, count_checks=args.count_checks)
    cost = nes(nes_cfg).cost  # building the attack traces nothing
    if protocol.budget < cost:
        raise ValueError(f"--max-queries {protocol.budget} is smaller than one step of NES ({cost} queries: "
                         f"{args.samples} samples and the check of the current point)")
    cfg = {
        "experiment": "nes_vs_output_noise", "dataset": args.dataset, "model": model_name,
        "num_classes": ds.num_classes, "sigmas": sigmas, "noise_space": args.noise_space,
        "nes": {k: getattr(nes_cfg, k) for k in ("eps", "norm", "targeted", "samples", "beta", "momentum", "loss_name", "step_size")},
        "protocol": {"n_images": protocol.n_images, "targeted": protocol.targeted, "budget": protocol.budget,
                     "check_queries": protocol.check_queries, "acc_draws": protocol.acc_draws,
                     "stop_rule": protocol.stop_rule, "count_checks": protocol.count_checks},
        "seed": args.seed, "train_seed": args.train_seed, "train": None, **smoke,
        "images": None,  # the images actually attacked, once chosen
        "_nes_cfg": nes_cfg, "_protocol": protocol,
    }
    check_resumable(args.out, cfg)
    return cfg


def main(argv=None) -> dict:
    """Run the experiment; a run interrupted at any point resumes from its finished sigma rows when run
    again with the same options and ``--out`` (``rows.jsonl``; one row per sigma is the unit); another
    configuration in that ``--out`` is refused."""
    parser = get_parser()
    args = parser.parse_args(argv)
    try:
        cfg = configure(args, given_options(parser, argv, args))
    except ValueError as e:
        parser.error(str(e))
    nes_cfg, protocol = cfg.pop("_nes_cfg"), cfg.pop("_protocol")
    run = setup(args, cfg)
    out, show, t_start, clean, x_test, y_test = run.out, run.show, run.t_start, run.clean, run.x_test, run.y_test
    k_def_acc, acc_clean = run.k_def_acc, run.acc_clean
    sel = select_images(run.k_data, clean, x_test, y_test, protocol.n_images, protocol.targeted, cfg["num_classes"])
    ka, kd, kc = image_keys(run.k_attack, run.k_def_images, sel.index)
    attack = nes(nes_cfg)
    cfg["images"] = {"attacked": int(len(sel.labels)), "selected": int(sel.selected)}
    log = open_run(out, cfg)  # the run is valid: config.json, then one line per finished sigma

    def cell(sigma):
        # a level > 0 travels as an array argument: one compiled program serves every sigma
        defended = output_noise(clean, jnp.asarray(sigma, jnp.float32) if sigma > 0 else 0.0, cfg["noise_space"])
        t0 = time.time()
        keep = {}
        metrics, records = evaluate_cell(attack, defended, clean, sel, (ka, kd, kc), protocol, keep=keep)
        artifacts.write(out / artifacts.ARTIFACTS / f"sigma={sigma:g}.npz", keep)  # before the row is logged
        row = {"sigma": sigma, **metrics}
        accs = defended_accuracy(defended, x_test, y_test, k_def_acc, protocol.acc_draws)
        row.update(acc_clean=acc_clean, acc_defended_mean=float(accs.mean()), acc_defended_worst=float(accs.min()),
                   l2_per_pixel_e4=row["l2_per_pixel"] * 1e4)
        timing[f"{sigma:g}"] = time.time() - t0
        return {"row": row, "images": records}

    rows, images, timing = [], {}, {}
    for sigma in tqdm(cfg["sigmas"], desc="sigma", disable=not show):
        done = log.unit(f"sigma={sigma!r}", lambda: cell(sigma))
        rows.append(done["row"])
        images[f"{sigma:g}"] = done["images"]

    print(table(rows, COLUMNS))
    print(f"clean accuracy {acc_clean:.4f}; {protocol.n_images} images, budget {protocol.budget}; "
          f"results in {out}/", file=sys.stderr)
    results = {"config": cfg, "rows": rows, "images": images}
    write_json(out / "results.json", results)
    write_csv(out / "results.csv", rows, [k for k, _, _ in COLUMNS] + ["queries_total", "acc_clean", "l2_per_pixel", "n_images"])
    title = (f"{'targeted' if protocol.targeted else 'untargeted'} NES ({nes_cfg.norm}, eps={nes_cfg.eps:g}, "
             f"{protocol.budget} queries) vs output noise on {cfg['dataset']}/{cfg['model']}")
    asr_vs_level(rows, out / "asr_vs_sigma.png", "sigma", title)
    kept = {f"σ={r['sigma']:g}": out / artifacts.ARTIFACTS / f"sigma={r['sigma']:g}.npz" for r in rows}
    kept = {k: artifacts.read(v) for k, v in kept.items() if v.exists()}
    success_vs_queries({k: (a["queries"], a["success"]) for k, a in kept.items()}, protocol.budget,
                       out / "asr_vs_queries.png", title)
    write_timing(out, {**timing, "resumed_rows": log.resumed}, t_start)
    return results


if __name__ == "__main__":
    cli(main)
