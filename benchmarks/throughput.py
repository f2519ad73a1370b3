"""Query throughput of NES relative to the model's raw forward throughput, in one run.

    python -m benchmarks.throughput                      # digits, 100 images x (J+1) = 5 100 points/step

Both are measured at the same batch size ``B = n_images * (J + 1)`` (the points one NES step of
the whole batch sends to the model) on the same model:

- ``raw``: ``model.apply`` on ``B`` images, jitted — forward passes per second;
- ``nes``: ``driver.advance`` for ``--steps`` steps of the vmapped NES loop. Two rates:
  ``step`` counts every point the loop sends to the model (loop iterations x B: the cost of one NES
  step — noise generation, oracle, loss, update — per point), ``counted`` only the budgeted queries
  the driver reports. They differ when some images stop early: under ``vmap`` the loop runs until
  the last image stops, so finished images still cost compute; ``utilization = counted / step``.

Ratios to ``raw`` are printed for the undefended oracle and for output noise (whose noise draws are
part of the defended oracle's cost). Timings take the best of ``--repeats`` runs after a
compile-and-warm-up run; raw and NES runs are interleaved so machine load affects both alike.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from rnd_jax import data, models, train
from rnd_jax.attacks import NESConfig, driver, nes
from rnd_jax.defenses import model_scorer, output_noise
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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--model", default=None)
    p.add_argument("--n-images", type=int, default=100)
    p.add_argument("--samples", type=int, default=50, help="NES J")
    p.add_argument("--steps", type=int, default=40, help="NES steps per timed run")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 1e-2], help="output-noise levels to time")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="optional JSON file for the numbers")
    args = p.parse_args(argv)

    ds = data.info(args.dataset)
    model_name = args.model or models.DEFAULT_MODEL[args.dataset]
    model, params = train.load_or_train(model_name, args.dataset, train.TrainConfig(), progress=False)
    clean = model_scorer(model, params)
    x_test, y_test = data.load(args.dataset, "test")
    n = args.n_images
    sel = select_images(jax.random.key(0), clean, x_test, y_test, n, True, ds.num_classes)
    ka, kd, _ = image_keys(jax.random.key(1), jax.random.key(2), sel.index)
    attack = nes(NESConfig(samples=args.samples))
    batch = n * attack.cost
    budget = args.steps * attack.cost

    xb = jnp.asarray(np.resize(x_test, (batch,) + x_test.shape[1:]))
    fwd = jax.jit(lambda x: model.apply({"params": params}, x))
    t_raw = best_time(lambda: fwd(xb), args.repeats)
    raw_qps = batch / t_raw
    out = {"device": str(jax.devices()[0]), "dataset": args.dataset, "model": model_name, "batch": batch,
           "n_images": n, "samples": args.samples, "steps": args.steps, "raw_queries_per_s": raw_qps, "nes": {}}
    print(f"device {out['device']}; {model_name} on {args.dataset}; batch {batch} = {n} images x {attack.cost} points")
    print(f"raw forward: {raw_qps:,.0f} queries/s")

    for sigma in args.sigmas:
        oracle = Oracle(output_noise(clean, sigma))

        @jax.jit
        def run_steps(x, y, t, ka, kd):
            def one(x, y, t, a, d):
                c = driver.start(attack, a, x, y, t, budget)
                c = driver.advance(attack, oracle, c, d, budget, max_steps=args.steps)
                return c.queries, c.state.step
            return jax.vmap(one)(x, y, t, ka, kd)

        fn = lambda: run_steps(sel.images, sel.labels, sel.targets, ka, kd)
        t = best_time(fn, args.repeats)
        t_raw = min(t_raw, best_time(lambda: fwd(xb), args.repeats))  # interleaved re-measure
        raw_qps = batch / t_raw
        queries, steps = (np.asarray(a) for a in fn())
        counted = int(queries.sum())
        computed = int(steps.max()) * batch  # vmapped loop iterations x points per iteration
        r = {"counted_queries": counted, "computed_points": computed, "seconds": t,
             "step_points_per_s": computed / t, "counted_queries_per_s": counted / t,
             "ratio_step": computed / t / raw_qps, "ratio_counted": counted / t / raw_qps,
             "utilization": counted / computed}
        out["nes"][f"{sigma:g}"] = r
        print(f"NES, output noise sigma={sigma:g}: step {r['step_points_per_s']:,.0f} points/s -> ratio "
              f"{r['ratio_step']:.2f}; counted {r['counted_queries_per_s']:,.0f} queries/s -> ratio "
              f"{r['ratio_counted']:.2f} (utilization {r['utilization']:.2f})")
    out["raw_queries_per_s"] = raw_qps
    print(f"raw forward (best of all runs): {raw_qps:,.0f} queries/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
