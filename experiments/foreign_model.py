"""Attack a model that is not JAX: a scikit-learn MLP on digits, through a host callback.

    python -m experiments.foreign_model            # Square, SimBA-DCT, HSJA; no defense and output noise
    python -m experiments.foreign_model --smoke    # 3 images, small budget (a minute)

The attacked model is a scikit-learn ``MLPClassifier`` trained on the digits training split (it ships
offline with scikit-learn; no JAX inside). It reaches the attacks as a scorer built by
:func:`rnd_jax.foreign.host_scorer`: the vmapped driver calls its ``predict_proba`` once per oracle
call for all images, with only the live points (:mod:`rnd_jax.foreign`). Defenses wrap it like any
scorer: ``output_noise(host, sigma)`` adds the defender's noise to its probabilities (hard-label HSJA
sees ``argmax(F(x) + sigma v)`` after the soft-label post-processing).

For each (attack, defense) the run reports the protocol's metrics (:mod:`rnd_jax.evaluate`; untargeted,
correctly classified test images, the stop rule of ``--stop-rule``) and, side by side, the points the
host model answered during the attack (``host_queries``, counted in ``predict``'s wrapper) and the
points the driver counted (``driver_queries`` = budgeted queries + the stop rule's checks): they are
equal by construction, and the run fails if they are not. ``host_calls`` is the number of host round
trips. The 9 success checks per image and the clean predictions are asked after the attack and
reported apart (``host_eval_queries``).

Writes ``results.json`` (config + rows), ``results.csv``, ``asr.png`` and
``artifacts/<attack>-<sigma>.npz`` (each row's final points, traces and per-image records:
:mod:`rnd_jax.artifacts`) to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from experiments.common import (add_protocol_args, apply_smoke, check_out, check_resumable, cli, given_options, open_run,
                                table, write_csv, write_json, write_timing)

ATTACKS = ("square_linf", "simba_dct", "hsja")


def get_parser():
    p = argparse.ArgumentParser(prog="python -m experiments.foreign_model", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS), help="registered attacks (score or decision)")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.01], help="output-noise levels (0 = none)")
    p.add_argument("--n-images", type=int, default=20)
    p.add_argument("--budget", type=int, default=2000)
    p.add_argument("--eps", type=float, default=None, help="radius (default: the battery's per-norm radius)")
    p.add_argument("--hidden", type=int, default=64, help="hidden units of the MLP")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/foreign_model",
                   help="output folder (created once the run is valid; the same options run again there resume "
                        "it, another configuration is refused)")
    p.add_argument("--smoke", action="store_true",
                   help="3 images, budget 300 (at least two steps of each attack); options given explicitly keep "
                        "their value")
    p.add_argument("--no-progress", action="store_true")
    add_protocol_args(p)
    return p


SMOKE = {"n_images": 3, "budget": 300}  # options left unset only


def configure(args, given: set[str] = frozenset()) -> dict:
    """Validate every option — before the model is trained or anything traced. ``given``: the options
    given explicitly (:func:`experiments.common.given_options`); ``--smoke`` changes only the others."""
    from rnd_jax.attacks import ATTACKS as REGISTRY
    from rnd_jax.attacks.registry import BATTERY_EPS
    from rnd_jax.defenses import check_level

    smoke = apply_smoke(args, given, SMOKE)
    smoke_budget = args.smoke and "budget" not in given  # smoke: at least two steps of each attack
    check_out(args.out)
    bad = [a for a in args.attacks if a not in REGISTRY]
    if bad:
        raise ValueError(f"unknown attack(s) {bad}; choose from {sorted(REGISTRY)}")
    no_untargeted = [a for a in args.attacks if not REGISTRY[a].supports_untargeted]
    if no_untargeted:
        raise ValueError(f"attack(s) {no_untargeted} are targeted only; this experiment is untargeted")
    sigmas = [check_level("sigma", s) for s in args.sigmas]
    for name in ("n_images", "budget", "hidden"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.eps is not None and not args.eps > 0:
        raise ValueError("--eps must be > 0")
    eps = {a: args.eps or BATTERY_EPS[REGISTRY[a].battery["norm"]] for a in args.attacks}
    from rnd_jax.attacks import Context, make_attack

    placeholder = Context(np.zeros((1, 8, 8, 1), np.float32), np.zeros((1,), np.int32), 10)
    budgets = {}
    for a in args.attacks:  # building an attack traces nothing; its cost is its worst-case step
        cost = make_attack(a, placeholder, targeted=False, eps=eps[a]).cost
        budgets[a] = max(args.budget, 2 * cost) if smoke_budget else args.budget
        if budgets[a] < cost:
            raise ValueError(f"--budget {args.budget} is smaller than one step of {a} ({cost} queries)")
    cfg = {"experiment": "foreign_model", "dataset": "digits", "model": f"sklearn MLPClassifier({args.hidden})",
           "attacks": list(args.attacks), "sigmas": sigmas, "n_images": args.n_images, "budget": args.budget,
           "budgets": budgets, "eps": eps, "seed": args.seed, "stop_rule": args.stop_rule,
           "count_checks": args.count_checks, "hidden": args.hidden, **smoke, "images": None}
    check_resumable(args.out, cfg)
    return cfg


def _attack(bundle, x0, labels, targets, ka, kd, kc):
    from rnd_jax.attacks.driver import run

    attack, oracle, protocol = bundle
    return run(attack, oracle, x0, labels, targets, ka, kd, protocol.budget, stop=protocol.stop, check_keys=kc)


def _evaluate(bundle, x_adv, labels, targets, kc):
    import jax.numpy as jnp

    from rnd_jax.evaluate import check_success

    defended, clean, targeted, m = bundle
    return check_success(defended, x_adv, labels, targets, kc, targeted, m), jnp.argmax(clean(x_adv, None), -1)


def main(argv=None) -> dict:
    """Run the experiment; each (attack, sigma) row is kept in ``rows.jsonl`` as it finishes, so a run
    started again with the same options and ``--out`` skips the finished rows; another configuration in
    that ``--out`` is refused."""
    parser = get_parser()
    args = parser.parse_args(argv)
    cfg = configure(args, given_options(parser, argv, args))
    import jax
    import jax.numpy as jnp
    from sklearn.neural_network import MLPClassifier
    from tqdm.auto import tqdm

    from rnd_jax import artifacts, data, pytree
    from rnd_jax.attacks import Context, make_attack
    from rnd_jax.attacks.driver import validate
    from rnd_jax.defenses import output_noise
    from rnd_jax.evaluate import Protocol, cell_artifact, image_keys, select_images, summarize
    from rnd_jax.foreign import HostModel, host_scorer, sklearn_predict
    from rnd_jax.oracle import Oracle

    t_start = time.time()
    out = check_out(args.out)
    show = not args.no_progress
    x_train, y_train = data.load("digits", "train")
    x_test, y_test = data.load("digits", "test")
    shape = x_test.shape[1:]
    clf = MLPClassifier(hidden_layer_sizes=(args.hidden,), max_iter=500, random_state=args.seed)
    clf.fit(np.asarray(x_train).reshape(len(x_train), -1), y_train)
    host = HostModel(sklearn_predict(clf, shape), 10, "probs")
    clean = host_scorer(host)
    cfg["acc_clean"] = float(clf.score(np.asarray(x_test).reshape(len(x_test), -1), y_test))
    _, k_data, k_attack, k_defense = jax.random.split(jax.random.key(args.seed), 4)
    sel = select_images(k_data, clean, x_test, y_test, args.n_images, False, 10)
    keys = image_keys(k_attack, k_defense, sel.index)
    ctx = Context(jnp.asarray(x_train), jnp.asarray(y_train), 10)
    attacks = {}
    for name in cfg["attacks"]:  # every attack checked against the chosen images before anything is written
        attacks[name] = attack = make_attack(name, ctx, targeted=False, eps=cfg["eps"][name])
        validate(attack, Oracle(clean, attack.output), cfg["budgets"][name], sel.images, sel.labels)
    cfg["images"] = {"attacked": int(len(sel.labels)), "selected": int(sel.selected)}
    log = open_run(out, cfg)  # the run is valid: config.json, then one line per finished row
    attack_program, eval_program = pytree.jit(_attack), pytree.jit(_evaluate)
    rows, timing = [], {}
    cells = [(a, s) for a in cfg["attacks"] for s in cfg["sigmas"]]
    def cell(name, sigma):
        t0 = time.time()
        attack, budget = attacks[name], cfg["budgets"][name]
        protocol = Protocol(n_images=len(sel.labels), targeted=False, budget=budget, eps=cfg["eps"][name],
                            norm=_norm(name), stop_rule=cfg["stop_rule"],
                            count_checks=cfg["count_checks"])
        defended = output_noise(clean, sigma)
        host.reset()
        res = jax.block_until_ready(attack_program((attack, Oracle(defended, attack.output), protocol), sel.images,
                                                   sel.labels, None, *keys))
        host_q, host_calls = host.points, host.calls
        driver_q = int(np.sum(res.queries)) + (0 if cfg["count_checks"] else int(np.sum(res.check_queries)))
        if host_q != driver_q:
            raise RuntimeError(f"{name} sigma={sigma}: the host answered {host_q} points, the driver counted {driver_q}")
        host.reset()
        votes, clean_pred = eval_program((defended, clean, False, protocol.check_queries), res.x_adv, sel.labels,
                                         jnp.full_like(jnp.asarray(sel.labels), -1), keys[2])
        res = jax.tree.map(np.asarray, res)
        eval_points = host.points
        m = summarize(sel, res, np.asarray(votes), np.asarray(clean_pred), False, protocol.check_queries,
                      protocol.eps, protocol.norm)
        artifacts.write(artifact_file(out, name, sigma), cell_artifact(  # before the row is logged
            f"{name}/{sigma:g}", sel, res, np.asarray(votes), np.asarray(clean_pred), protocol, clean))
        timing[f"{name}@{sigma:g}"] = time.time() - t0
        return {"attack": name, "sigma": sigma, "budget": budget, **m, "host_queries": host_q,
                "driver_queries": driver_q, "host_calls": host_calls, "host_eval_queries": eval_points,
                "seconds": time.time() - t0}

    for name, sigma in tqdm(cells, desc="cells", disable=not show, file=sys.stderr):
        rows.append(log.unit(f"{name}/{sigma!r}", lambda: cell(name, sigma)))

    cols = [("attack", "attack", "s"), ("sigma", "sigma", "g"), ("asr", "asr", ".2f"), ("asr_lucky", "lucky", ".2f"),
            ("queries_mean", "queries", ".0f"), ("host_queries", "host q", "d"), ("driver_queries", "driver q", "d"),
            ("host_calls", "host calls", "d"), ("seconds", "s", ".1f")]
    print(f"scikit-learn MLP on digits (clean accuracy {cfg['acc_clean']:.3f}), {len(sel.labels)} images, "
          f"budget {cfg['budget']}, stop rule {cfg['stop_rule']}")
    print(table(rows, cols))
    write_json(out / "results.json", {"config": cfg, "rows": rows})
    write_csv(out / "results.csv", rows, [c[0] for c in cols] + ["asr_clean", "robust", "loss_queries_mean"])
    _plot(rows, out / "asr.png")
    write_timing(out, {**timing, "resumed_rows": log.resumed}, t_start)
    return {"config": cfg, "rows": rows}


def _norm(name: str) -> str:
    from rnd_jax.attacks import ATTACKS as REGISTRY

    return REGISTRY[name].battery["norm"]


def _plot(rows, path):
    from rnd_jax.plots import plt  # the headless backend

    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    sigmas = list(dict.fromkeys(r["sigma"] for r in rows))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(sigmas)
    for j, s in enumerate(sigmas):
        vals = [100 * next(r["asr"] for r in rows if r["attack"] == a and r["sigma"] == s) for a in attacks]
        ax.bar([i + j * width for i in range(len(attacks))], vals, width, label=f"σ = {s:g}")
    ax.set_xticks([i + width * (len(sigmas) - 1) / 2 for i in range(len(attacks))], attacks)
    ax.set_ylabel("attack success rate (%)")
    ax.set_title("scikit-learn MLP through a host callback")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def artifact_file(out, attack: str, sigma: float):
    """The artifact of one (attack, sigma) row: ``artifacts/<attack>-<sigma>.npz``."""
    from rnd_jax import artifacts

    return artifacts.row_path(out, attack, float(sigma))


if __name__ == "__main__":
    cli(main)
