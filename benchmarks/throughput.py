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

from benchmarks import common
from benchmarks.common import add_args
from experiments.common import cli, table, write_json
from rnd_jax import pytree
from rnd_jax.attacks import ATTACKS, driver, make_attack
from rnd_jax.defenses import output_noise
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
    add_args(p)
    p.add_argument("--steps", type=int, default=20, help="attack steps per timed run")
    return p


def configure(args) -> dict:
    """Validate every option before any model is trained or timed (``ValueError`` naming the option)."""
    return common.configure(args, counts=("n_images", "steps", "repeats"))


def main(argv=None) -> dict:
    args, c = common.parse(get_parser(), configure, argv)
    names, sigmas, ds, model_name = c["names"], c["sigmas"], c["ds"], c["model"]
    b = common.load(args, c)
    model, params, clean, x_test, y_test, ctx = b.model, b.params, b.clean, b.x_test, b.y_test, b.ctx
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
