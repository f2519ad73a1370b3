"""Decision-based attacks vs small input noise (SND) and output noise: ASR, distortion and P_mis.

Mirrors Byun et al. (2022), "On the Effectiveness of Small Input Noise for Defending Against
Query-based Black-Box Attacks": Table 2 (ASR of decision attacks at 2K / 5K / 10K queries),
Table 3 (the same, with the average l_2 norm of the query images at the budget) and Table 4
(``P_mis = P(h(x) != h(x + eta))`` over all queries of the attacks vs on clean images), on our
digits model, plus the output-noise defense of Aithal & Li (2022) (their Tables 3 and 10).

For every registered decision attack (untargeted, the papers' setting) and every defense —
SND input noise ``nu`` in ``--nus`` (``nu = 0`` is the undefended baseline) and output noise
``sigma`` in ``--sigmas`` — one run of ``--max-queries`` queries per image gives:

- ``asr@b`` for each ``b`` in ``--checkpoints``: the fraction of images whose final point passes the
  protocol's majority-of-9 defended check, lies within ``eps`` of ``x0``, and was reached within
  ``b`` queries. The attack stops at its own (single-answer) belief of success within ``eps``, so the
  query count at which it stopped is the count a run with budget ``b >= count`` would have used.
  ``asr_clean@b`` judges the same points by the undefended model, ``asr_lucky@b`` by the attack's
  own belief. ``eps`` is the l_2 or l_inf radius of the attack's norm (``--eps-l2``, ``--eps-linf``).
- ``l2_query``: the mean l_2 distance ``||x0 - x^q||`` of the *last query image* of each image at
  the budget, or when the attack stopped (SND Table 3's figure in parentheses).
- ``p_mis``: the fraction of all query points of the attack whose defended answer differs from the
  undefended model's answer at the same point, ``h(x^q + eta_q) != h(x^q)``, pooled over images
  (SND Table 4); ``p_mis_clean``: the same over ``--clean-draws`` noise draws of every test image.

P_mis and ``l2_query`` need every query point, which an attack never returns. Each image is therefore
attacked alone (``driver.run_one``, jitted, not vmapped: every model call of such a run is a counted
query, whereas under ``vmap`` finished images keep evaluating discarded queries) through a scorer
that reports, for each query batch, the defended and the undefended labels and the points to the
host (``jax.debug.callback``); the number of points it saw is checked against the driver's count.
An image attacked alone replays what it does inside a batch (same keys and queries; floats to ~1e-6), so
this is the protocol of :mod:`rnd_jax.evaluate` image by image: the majority-of-9 check uses 9
fresh defended answers from the image's check key, and keys follow :func:`rnd_jax.evaluate.image_keys`.

One compilation per attack serves every defense: the noise levels are traced arguments of a
defended scorer that applies input noise then output noise with the formulas of
:mod:`rnd_jax.defenses` (``x + nu eta``, not clipped; the label ``argmax(F + sigma v)``, Aithal & Li's
hard label, or with ``--output-postprocess`` the argmax of ``min(|F + sigma v|, 1)``; each point's key
split per defense); a level of 0 gives exactly the clean answer. The stop rule is SND's ``single``
(``--stop-rule``); ``asr_lucky`` (the attack's own verdict within eps) is SND's success, ``asr`` the
majority-of-9 check beside it.

Defaults (16 images, 10 000 queries, 9 attacks x 4 defenses; about 15 minutes on 2 CPU cores)::

    python -m experiments.decision_attacks --out runs/decision_attacks

Outputs under ``--out``: ``results.json`` (config and one row per attack x defense; the same seed gives
a bit-identical file), ``results.csv``, ``config.json``, ``asr_vs_queries.png``,
``artifacts/<attack>-<defense>-<level>.npz`` (each row's final points, traces and per-image records:
:mod:`rnd_jax.artifacts`; written before the row is logged) and ``timing.json``
(wall-clock seconds, kept apart so results stay reproducible). ``rows.jsonl`` holds each row as soon
as it is finished: a killed run, started again with the same options, skips those rows and ends with
the same ``results.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial
from tqdm.auto import tqdm

from experiments.common import (add_model_args, add_protocol_args, add_run_args, apply_smoke, check_out, check_resumable,
                                cli, dataset_info, given_options, open_run, resolve_model, setup, table, write_csv,
                                write_json, write_timing)
from rnd_jax import artifacts, pytree
from rnd_jax.attacks import ATTACKS, Context, make_attack
from rnd_jax.defenses import check_level
from rnd_jax.evaluate import (Protocol, QueryTap, cell_artifact, compile_runner, image_keys, make_tapped_runner,
                              run_tapped,
                              select_images, successes, validate_selection)
from rnd_jax.oracle import Oracle, query_keys

DEFAULT_NUS = (0.0, 1e-3, 1e-2)
DEFAULT_SIGMAS = (1e-2,)
DEFAULT_CHECKPOINTS = (2_000, 5_000, 10_000)
SMOKE_ATTACKS = ("hsja", "rays")  # one l2 and one l_inf attack


def decision_attacks() -> list[str]:
    return sorted(n for n, s in ATTACKS.items() if s.family == "decision" and s.supports_untargeted)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.decision_attacks",
        description="Every decision-based attack vs SND input noise and output noise: ASR at several budgets, "
                    "l2 of the query images, P_mis (Byun et al. 2022, Tables 2-4).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--attacks", nargs="+", default=None, help="decision attacks to run (default: all registered)")
    p.add_argument("--n-images", type=int, default=16, help="correctly classified test images to attack")
    p.add_argument("--max-queries", type=int, default=10_000, help="query budget per image (the largest checkpoint)")
    p.add_argument("--checkpoints", type=int, nargs="+", default=list(DEFAULT_CHECKPOINTS),
                   help="budgets at which ASR is reported (each <= --max-queries)")
    p.add_argument("--nus", type=float, nargs="+", default=list(DEFAULT_NUS), help="SND input-noise std levels")
    p.add_argument("--sigmas", type=float, nargs="*", default=list(DEFAULT_SIGMAS),
                   help="output-noise std levels (on probabilities, Aithal & Li post-processing)")
    p.add_argument("--output-postprocess", action="store_true",
                   help="output noise: take the label after min(|F + sigma v|, 1) instead of argmax(F + sigma v)")
    p.add_argument("--eps-l2", type=float, default=1.0, help="success radius of the l2 attacks")
    p.add_argument("--eps-linf", type=float, default=0.15, help="success radius of the l_inf attacks")
    p.add_argument("--clean-draws", type=int, default=20, help="noise draws per test image for P_mis on clean images")
    add_protocol_args(p, "single")
    add_run_args(p, "runs/decision_attacks")
    p.add_argument("--smoke", action="store_true",
                   help="tiny run for tests: 3 images, 600 queries (checkpoints 200/600), nu 0 and 1e-2, "
                        f"sigma 1e-2, 2 clean draws, attacks {', '.join(SMOKE_ATTACKS)}; options given explicitly "
                        "keep their value")
    return p


SMOKE = {"n_images": 3, "max_queries": 600, "checkpoints": [200, 600], "nus": [0.0, 1e-2], "sigmas": [1e-2],
         "clean_draws": 2, "attacks": list(SMOKE_ATTACKS)}  # options left unset only


def configure(args, given: set[str] = frozenset()) -> dict:
    """Validate every option and resolve defaults — before any model is trained or traced.

    ``given``: the options given explicitly (:func:`experiments.common.given_options`); ``--smoke``
    changes only the others."""
    smoke = apply_smoke(args, given, SMOKE)
    check_out(args.out)
    ds = dataset_info(args.dataset, args)
    model_name = resolve_model(args, ds)
    names = args.attacks or decision_attacks()
    for n in names:
        if n not in ATTACKS or ATTACKS[n].family != "decision" or not ATTACKS[n].supports_untargeted:
            raise ValueError(f"--attacks: {n!r} is not an untargeted decision attack; choose from {decision_attacks()}")
    nus = [check_level("nu", v) for v in args.nus]
    sigmas = [check_level("sigma", v) for v in args.sigmas]
    if not nus and not sigmas:
        raise ValueError("need at least one defense level (--nus / --sigmas)")
    for name in ("n_images", "max_queries", "clean_draws"):
        v = getattr(args, name)
        if v <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {v}")
    checkpoints = sorted(set(args.checkpoints))
    if not checkpoints or checkpoints[0] <= 0 or checkpoints[-1] > args.max_queries:
        raise ValueError(f"--checkpoints must be positive and <= --max-queries ({args.max_queries}), "
                         f"got {args.checkpoints}")
    eps = {"l2": args.eps_l2, "linf": args.eps_linf}
    for k, v in eps.items():
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"--eps-{k} must be a finite number > 0, got {v}")
    defenses = [("input_noise", v) for v in nus] + [("output_noise", v) for v in sigmas]
    # validate every attack config now (norm from the registry's battery)
    placeholder = Context(np.zeros((ds.num_classes,) + ds.image_shape, np.float32),
                          np.arange(ds.num_classes, dtype=np.int32), ds.num_classes)
    for n in names:
        norm = ATTACKS[n].battery["norm"]
        ATTACKS[n].config(eps=eps[norm], norm=norm, targeted=False)
        cost = make_attack(n, placeholder, **preset_config(n, args.dataset, eps=eps[norm], norm=norm,
                                                           targeted=False)).cost  # builds, traces nothing
        if args.max_queries < cost:
            raise ValueError(f"--max-queries {args.max_queries} is smaller than one step of {n} ({cost} queries)")
    cfg = {
        "experiment": "decision_attacks", "dataset": args.dataset, "model": model_name, "num_classes": ds.num_classes,
        "attacks": names, "defenses": [{"defense": d, "level": v} for d, v in defenses],
        "checkpoints": checkpoints, "eps": eps, "n_images": args.n_images, "budget": args.max_queries,
        "clean_draws": args.clean_draws, "check_queries": 9, "stop_rule": args.stop_rule,
        "count_checks": args.count_checks, "output_postprocess": args.output_postprocess,
        "seed": args.seed, "train_seed": args.train_seed, "train": None, **smoke, "images": None,
        "_defenses": defenses,
    }
    check_resumable(args.out, cfg)
    return cfg


def preset_config(name: str, dataset: str, **config) -> dict:
    """``config`` on top of the attack's settings at the dataset's size (:mod:`rnd_jax.presets`; digits: none)."""
    from rnd_jax import presets

    return presets.attack_config(name, dataset, **config) if dataset in presets.DATASETS else dict(config)


def leveled_defense(clean, nu, sigma, postprocess: bool = False):
    """``output_noise(input_noise(clean, nu), sigma)`` with ``nu``, ``sigma`` traced (see module docstring).

    The hard label is Aithal & Li's ``argmax(F(x) + sigma v)``; ``postprocess`` takes it after their
    soft-label post-processing ``min(|F + sigma v|, 1)`` instead.
    """

    return Partial(_leveled_scores, clean, nu, sigma, postprocess)


def _leveled_scores(clean, nu, sigma, postprocess, x, keys):
    pairs = jax.vmap(jax.random.split)(keys)
    k_out, k_in = pairs[:, 0], pairs[:, 1]
    pairs = jax.vmap(jax.random.split)(k_in)
    k_eta = pairs[:, 0]
    eta = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], x.dtype))(k_eta)
    p = clean(x + nu * eta, None)
    v = jax.vmap(lambda k: jax.random.normal(k, p.shape[1:], p.dtype))(k_out)
    return jnp.minimum(jnp.abs(p + sigma * v), 1.0) if postprocess else p + sigma * v


def _leveled_at(clean, postprocess, levels):
    return leveled_defense(clean, *levels, postprocess)


def _p_mis(bundle, nu, sigma, x, key):
    clean, postprocess = bundle
    p = leveled_defense(clean, nu, sigma, postprocess)(x, query_keys(key, 0, x.shape[0]))
    return jnp.mean(jnp.argmax(p, -1) != jnp.argmax(clean(x, None), -1))


def p_mis_clean_fn(clean, postprocess: bool = False):
    """Compiled ``(nu, sigma, images, key) -> P(h(x + noise) != h(x))`` for one noise draw per image."""
    compiled = pytree.jit(_p_mis)
    return lambda nu, sigma, x, key: compiled((clean, postprocess), nu, sigma, x, key)


def cell_metrics(sel, res, votes, clean_pred, eps: float, norm: str, checkpoints, check_queries: int) -> dict:
    """Per (attack, defense): ASR at each checkpoint (every success notion of the protocol), queries, distances."""
    q = np.asarray(res.queries)
    delta = (np.asarray(res.x_adv) - sel.images).reshape(len(q), -1)
    d = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    ok = successes(sel, res, votes, clean_pred, False, check_queries, eps, norm)
    row = {"n_images": int(len(q)), "queries_total": int(q.sum())}
    for b in checkpoints:
        k = f"{b // 1000}K" if b % 1000 == 0 else str(b)
        for kind, flags in ok.items():
            row[f"{kind}@{k}"] = float(np.mean(flags & (q <= b)))
    verified = ok["asr"]
    row["queries_mean"] = float(np.mean(q[verified])) if verified.any() else math.nan
    row["dist_best_median"] = float(np.median(d))  # distance of the returned (best) point, all images
    return row


def asr_plot(rows, checkpoints, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    defenses = sorted({r["defense_label"] for r in rows}, key=lambda s: [r["defense_label"] for r in rows].index(s))
    attacks = sorted({r["attack"] for r in rows})
    fig, axes = plt.subplots(1, len(defenses), figsize=(3.6 * len(defenses), 3.4), sharey=True, squeeze=False)
    keys = [f"asr@{b // 1000}K" if b % 1000 == 0 else f"asr@{b}" for b in checkpoints]
    for ax, dl in zip(axes[0], defenses):
        for a in attacks:
            r = next((r for r in rows if r["attack"] == a and r["defense_label"] == dl), None)
            if r is not None:
                ax.plot(checkpoints, [100 * r[k] for k in keys], "o-", label=a)
        ax.set_title(dl, fontsize=9)
        ax.set_xlabel("queries")
        ax.set_ylim(-3, 103)
    axes[0][0].set_ylabel("ASR (%), majority of 9")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COLUMNS_HEAD = [("attack", "attack", "s"), ("defense_label", "defense", "s")]
COLUMNS_TAIL = [("queries_mean", "q_mean", ".0f"), ("dist_best_median", "d_best", ".3f"),
                ("l2_query", "l2_query", ".3f"), ("p_mis", "p_mis", ".3f"), ("p_mis_clean", "p_mis_clean", ".4f")]


def main(argv=None) -> dict:
    """Run the experiment; each (attack, defense) row is kept in ``rows.jsonl`` as it finishes, so a run
    started again with the same options and ``--out`` skips the finished rows (and compiles nothing for
    an attack whose rows are all done); another configuration in that ``--out`` is refused."""
    parser = get_parser()
    args = parser.parse_args(argv)
    try:
        cfg = configure(args, given_options(parser, argv, args))
    except ValueError as e:
        parser.error(str(e))
    defenses = cfg.pop("_defenses")
    run_ = setup(args, cfg, train_split=True)
    out, show, t_start, clean = run_.out, run_.show, run_.t_start, run_.clean
    x_test, k_def_clean = run_.x_test, run_.k_def_acc
    ctx = Context(train_images=run_.x_train, train_labels=run_.y_train, num_classes=cfg["num_classes"])
    sel = select_images(run_.k_data, clean, x_test, run_.y_test, cfg["n_images"], False, cfg["num_classes"])
    ka, kd, kc = image_keys(run_.k_attack, run_.k_def_images, sel.index)
    built = {}
    for name in cfg["attacks"]:  # every attack checked against the chosen images before anything is written
        norm = ATTACKS[name].battery["norm"]
        eps = cfg["eps"][norm]
        attack = make_attack(name, ctx, **preset_config(name, cfg["dataset"], eps=eps, norm=norm, targeted=False))
        protocol = Protocol(n_images=cfg["n_images"], targeted=False, budget=cfg["budget"], eps=eps, norm=norm,
                            check_queries=9, stop_rule=cfg["stop_rule"], count_checks=cfg["count_checks"])
        validate_selection(attack, Oracle(clean, "label"), protocol, sel)
        built[name] = (norm, eps, attack, protocol)
    cfg["images"] = {"attacked": int(len(sel.labels)), "selected": int(sel.selected)}
    log = open_run(out, cfg)  # the run is valid: config.json, then one line per finished row

    rows, timing = [], {}
    m = 9
    pmis_fn = p_mis_clean_fn(clean, cfg["output_postprocess"])
    pmis_clean = {}
    for d, v in defenses:
        nu, sigma = (v, 0.0) if d == "input_noise" else (0.0, v)
        k_level = jax.random.fold_in(k_def_clean, len(pmis_clean))
        draws = [float(pmis_fn(nu, sigma, x_test, jax.random.fold_in(k_level, r))) for r in range(cfg["clean_draws"])]
        pmis_clean[(d, v)] = float(np.mean(draws))
    for name in tqdm(cfg["attacks"], desc="attacks", disable=not show):
        t0 = time.time()
        norm, eps, attack, protocol = built[name]
        tap = QueryTap()
        post = cfg["output_postprocess"]
        compiled = []

        def cell(defense, level):
            if not compiled:  # compiled on the attack's first unfinished row only
                compiled.append(compile_runner(make_tapped_runner(attack, Partial(_leveled_at, clean, post), clean,
                                                                  protocol, tap)))
            nu, sigma = (level, 0.0) if defense == "input_noise" else (0.0, level)
            res, votes, clean_pred, taps = run_tapped(compiled[0], tap, sel, (ka, kd, kc), protocol,
                                                      level=(nu, sigma))
            artifacts.write(artifact_file(out, name, defense, level), cell_artifact(  # before the row is logged
                f"{name}/{defense}/{level:g}", sel, res, votes, clean_pred, protocol, clean))
            label = "none" if level == 0.0 else (f"SND nu={level:g}" if defense == "input_noise"
                                                 else f"output sigma={level:g}")
            return {"attack": name, "norm": norm, "eps": eps, "defense": defense, "level": level,
                    "defense_label": label,
                    **cell_metrics(sel, res, votes, clean_pred, eps, norm, cfg["checkpoints"], m),
                    "p_mis": taps["p_mis"], "p_mis_clean": pmis_clean[(defense, level)], "l2_query": taps["l2_query"]}

        for defense, level in defenses:
            rows.append(log.unit(f"{name}/{defense}/{level!r}", lambda: cell(defense, level)))
        timing[name] = time.time() - t0

    tag = lambda b: f"{b // 1000}K" if b % 1000 == 0 else str(b)
    asr_cols = [(f"asr_lucky@{tag(b)}", f"lucky@{tag(b)}", ".2f") for b in cfg["checkpoints"]]
    asr_cols += [(f"asr@{tag(cfg['checkpoints'][-1])}", f"asr@{tag(cfg['checkpoints'][-1])}", ".2f")]
    columns = COLUMNS_HEAD + asr_cols + COLUMNS_TAIL
    print(table(rows, columns))
    print(f"untargeted; {cfg['n_images']} images, budget {cfg['budget']}, eps l2 {cfg['eps']['l2']:g} / linf "
          f"{cfg['eps']['linf']:g}; results in {out}/",
          file=sys.stderr)
    results = {"config": cfg, "rows": rows}
    write_json(out / "results.json", results)
    extra = [c for c in rows[0] if c not in {k for k, _, _ in columns}]
    write_csv(out / "results.csv", rows, [k for k, _, _ in columns] + extra)
    asr_plot(rows, cfg["checkpoints"], out / "asr_vs_queries.png",
             f"untargeted decision attacks on {cfg['dataset']}/{cfg['model']} ({cfg['n_images']} images)")
    write_timing(out, {**timing, "resumed_rows": log.resumed}, t_start)
    return results


def artifact_file(out: Path, attack: str, defense: str, level: float) -> Path:
    """The artifact of one (attack, defense, level) row: ``artifacts/<attack>-<defense>-<level>.npz``."""
    return artifacts.row_path(out, attack, defense, float(level))


if __name__ == "__main__":
    cli(main)
