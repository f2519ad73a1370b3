"""Query throughput of every registered attack relative to the model's raw forward throughput.

    python -m benchmarks.throughput                       # all attacks, digits, 100 images
    python -m benchmarks.throughput --attacks nes --sigmas 0 1e-2

For each attack, both rates are measured in the same run at the same batch size
``B = n_images * attack.cost`` (the points one step of the whole batch sends to the model) on the
same model:

- ``raw``: ``model.apply`` on ``B`` images, jitted — forward passes per second;
- the attack: ``driver.advance`` for ``--steps`` steps of the vmapped loop, built with the attack's
  battery config. Two rates: ``step`` counts every point the loop asks the model about (loop
  iterations x B, an upper bound for attacks whose steps report a variable count), ``counted``
  only the budgeted queries the driver reports. They differ when images stop early: under ``vmap``
  the loop runs until the last image stops, so finished images still cost compute;
  ``utilization = counted / step``.

``ratio = rate / raw``. Timings are the best of ``--repeats`` runs after a compile-and-warm-up run;
the raw forward is re-measured after each attack and the best is kept, so machine load affects
both sides alike.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import cli, dataset_info, resolve_model, table, write_json
from rnd_jax import data, pytree, train
from rnd_jax.attacks import ATTACKS, Context, driver, make_attack
from rnd_jax.defenses import check_level, model_scorer, output_noise
from rnd_jax.evaluate import image_keys, select_images
from rnd_jax.oracle import Oracle


def best_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def _run_steps(bundle, x, y, t, ka, kd):
    """``steps`` steps of the vmapped driver loop: (queries, steps) per image."""
    attack, oracle, budget, steps = bundle

    def one(x, y, t, a, d):
        c = driver.start(attack, a, x, y, t, budget)
        c = driver.advance(attack, oracle, c, d, budget, max_steps=steps)
        return c.queries, c.state.step

    return jax.vmap(one)(x, y, t, ka, kd)


RUN_STEPS = pytree.jit(_run_steps)  # the attack's pool and the model's params are program arguments


def get_parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--attacks", nargs="+", default=None, help=f"default: all registered ({', '.join(sorted(ATTACKS))})")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--model", default=None)
    p.add_argument("--n-images", type=int, default=100)
    p.add_argument("--steps", type=int, default=20, help="attack steps per timed run")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.0], help="output-noise levels to time")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="optional JSON file for the numbers")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while a model trains")
    return p


def check_out_file(path) -> Path:
    """``ValueError`` unless ``path`` can be written as a file: not a folder, in an existing writable
    folder. Probed with a temporary file in that folder (removed at once); ``path`` itself is not touched."""
    import tempfile

    out = Path(path).expanduser()
    if out.is_dir():
        raise ValueError(f"--out {str(path)!r} is a folder; give a JSON file name")
    folder = out.parent
    if not folder.is_dir():
        raise ValueError(f"--out {str(path)!r}: its folder {str(folder)!r} does not exist or is not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"--out {str(path)!r}: cannot write in {str(folder)!r} ({e.strerror or e})") from None
    return out


def configure(args) -> dict:
    """Validate every option before any model is trained or timed (``ValueError`` naming the option)."""
    names = args.attacks or sorted(ATTACKS)
    bad = [n for n in names if n not in ATTACKS]
    if bad:
        raise ValueError(f"unknown attack(s) {bad}; choose from {sorted(ATTACKS)}")
    for flag, v in (("--n-images", args.n_images), ("--steps", args.steps), ("--repeats", args.repeats)):
        if v < 1:
            raise ValueError(f"{flag} must be a positive int, got {v}")
    sigmas = [check_level("sigma", s) for s in args.sigmas]
    ds = dataset_info(args.dataset, args)
    model_name = resolve_model(args, ds)  # unknown, or not built for the dataset's images: ValueError
    if args.out is not None:
        check_out_file(args.out)
    return {"names": names, "sigmas": sigmas, "ds": ds, "model": model_name}


def main(argv=None) -> dict:
    parser = get_parser()
    args = parser.parse_args(argv)
    try:
        c = configure(args)
    except ValueError as e:
        parser.error(str(e))
    names, sigmas, ds, model_name = c["names"], c["sigmas"], c["ds"], c["model"]
    show = not args.no_progress
    model, params = train.load_or_train(model_name, args.dataset, train.TrainConfig(), progress=show)
    clean = model_scorer(model, params)
    x_test, y_test = data.load(args.dataset, "test")
    x_train, y_train = data.load(args.dataset, "train")
    surrogate = None
    if any("surrogate" in ATTACKS[n].needs for n in names):
        s_model, s_params = train.load_or_train(model_name, args.dataset, train.TrainConfig(seed=1), progress=show)
        surrogate = model_scorer(s_model, s_params)
    ctx = Context(jnp.asarray(x_train), jnp.asarray(y_train), ds.num_classes, surrogate)
    n = args.n_images
    sel = select_images(jax.random.key(0), clean, x_test, y_test, n, True, ds.num_classes)
    ka, kd, _ = image_keys(jax.random.key(1), jax.random.key(2), sel.index)
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
    raw = {}  # batch -> best seconds

    def raw_time(batch):
        xb = jnp.asarray(np.resize(x_test, (batch,) + x_test.shape[1:]))
        raw[batch] = min(raw.get(batch, np.inf), best_time(lambda: fwd(params, xb), args.repeats))
        return raw[batch]

    out = {"device": str(jax.devices()[0]), "dataset": args.dataset, "model": model_name, "n_images": n,
           "steps": args.steps, "rows": []}
    print(f"device {out['device']}; {model_name} on {args.dataset}; {n} images; {args.steps} steps per run")
    for name in names:
        spec = ATTACKS[name]
        cfg = {k: v for k, v in spec.battery.items() if k != "budget"}
        cfg["targeted"] = not spec.supports_untargeted
        attack = make_attack(name, ctx, **cfg)
        batch = n * attack.cost
        budget = args.steps * attack.cost
        raw_time(batch)
        for sigma in sigmas:
            oracle = Oracle(output_noise(clean, sigma), attack.output)
            targets = sel.targets if attack.targeted else np.full_like(sel.labels, -1)
            bundle = (attack, oracle, budget, args.steps)
            fn = lambda: RUN_STEPS(bundle, sel.images, sel.labels, targets, ka, kd)
            t = best_time(fn, args.repeats)
            raw_qps = batch / raw_time(batch)
            queries, steps = (np.asarray(a) for a in fn())
            counted, computed = int(queries.sum()), int(steps.max()) * batch
            row = {"attack": name, "sigma": sigma, "batch": batch, "raw_queries_per_s": raw_qps,
                   "step_points_per_s": computed / t, "counted_queries_per_s": counted / t,
                   "ratio_step": computed / t / raw_qps, "ratio_counted": counted / t / raw_qps,
                   "utilization": counted / computed if computed else float("nan")}
            out["rows"].append(row)
            print(f"{name:>14} sigma={sigma:g}: ratio_step {row['ratio_step']:.2f}, "
                  f"ratio_counted {row['ratio_counted']:.2f}", flush=True)
    print(table(out["rows"], [("attack", "attack", "s"), ("sigma", "sigma", "g"), ("batch", "batch", "d"),
                              ("raw_queries_per_s", "raw q/s", ",.0f"), ("step_points_per_s", "step pts/s", ",.0f"),
                              ("ratio_step", "ratio_step", ".2f"), ("ratio_counted", "ratio_counted", ".2f"),
                              ("utilization", "util", ".2f")]))
    if args.out:
        write_json(Path(args.out), out)  # atomic: a killed run leaves no half-written file
    return out


if __name__ == "__main__":
    cli(main)
