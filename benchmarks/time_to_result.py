"""Time to result: a batch of images attacked to its full budget, against the sequential bound.

    python -m benchmarks.time_to_result                         # every attack, 100 digits images
    python -m benchmarks.time_to_result --attacks square_linf simba --n-images 100 --out runs/ttr.json

For each attack and each output-noise level (``--sigmas``, default undefended and σ = 0.01), the
evaluator's whole cell runs once (:func:`rnd_jax.evaluate.make_runner`: the attack to its budget
under the stop rule, then the 9 success checks and the clean predictions), compiled with the model
inlined and evaluated on the live points only (:mod:`rnd_jax.compact`, as in the experiments;
``--no-compact``: on every image's points, finished or not). Reported per (attack, σ):

- ``wall_s``: the run, compile excluded (best of ``--repeats`` runs);
- ``compile_cold_s``: tracing, lowering and compiling the program with an empty persistent
  compilation cache; ``compile_warm_s``: the same again after the in-memory caches are cleared, so
  the program is loaded from the persistent cache (:mod:`rnd_jax.compile_cache`; the cache folder
  is a fresh temporary one unless ``--cache-dir`` is given);
- ``asr``, ``queries_mean`` (per image, all queries);
- ``calls``: sequential oracle calls of the batch, and ``calls_slowest``: those of its slowest image,
  counted by a second run of the same cell whose scorer also sends each oracle call's live points to
  a host callback (:func:`rnd_jax.foreign.host_scorer`) that records how many there were and which
  images they came from, and answers nothing (the answers are the compiled model's: a callback that
  itself runs a JAX program can leave XLA:CPU's worker threads all waiting on each other when a
  program makes several callbacks at once, as GenAttack's does); ``host_queries_match`` says whether
  that run spent exactly the same queries per image; white-box attacks, which need the model's
  gradients, have no host run);
- ``bound_s``, the **sequential bound**: the sum over those calls of the raw forward time of the
  model at the batch that call had in flight (its live points; measured in the same run, jitted
  ``model.apply`` at powers of two, interpolated linearly), i.e. the time an implementation that
  did nothing but the model's forward passes on live points would need; ``ratio = bound_s / wall_s``
  (1 is the bound; the issue's target is >= 0.5 on attacks that ask >= 1 point per image per step).

Measured on whatever device JAX uses; timings on a shared machine vary by +-15 %, so compare ratios
and runs made back to back.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from benchmarks import common
from benchmarks.common import add_args
from experiments.common import cli, table
from rnd_jax import compile_cache, pytree
from rnd_jax.attacks import ATTACKS, make_attack
from rnd_jax.defenses import output_noise
from rnd_jax.evaluate import Protocol, cell_inputs, image_keys, make_runner, select_images, summarize
from rnd_jax.foreign import HostModel, host_scorer
from rnd_jax.oracle import Oracle


class RecordingHost(HostModel):
    """A :class:`HostModel` that records, per host call, the live points and which images were live.

    Its ``predict`` answers zeros without running any model (see :func:`counted`)."""

    def __init__(self, num_classes: int):
        super().__init__(lambda x: np.zeros((len(x), num_classes), np.float32), num_classes, "probs")

    def reset(self) -> None:
        super().reset()
        self.sizes: list[int] = []
        self.live_images: np.ndarray | None = None

    def answer(self, x, mask):
        out = super().answer(x, mask)
        lead = np.shape(x)[:-3]
        keep = np.broadcast_to(np.asarray(mask, bool), lead)
        n = int(keep.sum())
        if n:
            self.sizes.append(n)
            per_image = keep.reshape(lead[0], -1).any(1) if len(lead) > 1 else keep
            if self.live_images is None or len(self.live_images) != len(per_image):
                self.live_images = np.zeros(len(per_image), np.int64)
            self.live_images += per_image
        return out


def counted(scorer, host: RecordingHost):
    """``scorer``'s answers, unchanged, with every call's live points also reported to ``host``."""
    return Partial(_counted_scores, scorer, host_scorer(host))


def _counted_scores(scorer, counter, x, keys):
    return scorer(x, keys) + 0.0 * counter(x, None)  # answers + 0: the same bits; the callback stays


def forward_times(fwd, params, example, sizes, repeats: int) -> dict[int, float]:
    """Best time of the jitted forward at each batch size (powers of two covering ``sizes``)."""
    top = max(sizes) if sizes else 1
    grid = sorted({1 << k for k in range(0, max(1, top - 1).bit_length() + 1)} | {top})
    times = {}
    for b in grid:
        xb = jnp.asarray(np.resize(example, (b,) + example.shape[1:]))
        jax.block_until_ready(fwd(params, xb))
        best = np.inf
        for _ in range(max(3, repeats)):
            t0 = time.perf_counter()
            jax.block_until_ready(fwd(params, xb))
            best = min(best, time.perf_counter() - t0)
        times[b] = best
    return times


def bound(sizes, times: dict[int, float]) -> float:
    """Sum of the interpolated forward time at each call's batch size."""
    if not sizes:
        return 0.0
    grid = np.array(sorted(times))
    return float(np.sum(np.interp(np.asarray(sizes, float), grid, [times[b] for b in grid])))


def get_parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.time_to_result", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_args(p, sigmas=(0.0, 0.01), repeats=1)
    p.add_argument("--budget", type=int, default=None, help="queries per image (default: each attack's battery budget)")
    p.add_argument("--no-host", action="store_true", help="skip the host-counted run (no calls / bound)")
    p.add_argument("--no-compact", action="store_true",
                   help="evaluate the model on every image's points, finished or not (rnd_jax.compact off)")
    p.add_argument("--cache-dir", default=None, help="persistent compilation cache (default: a fresh temporary folder)")
    p.add_argument("--set", action="append", default=[], metavar="ATTACK.FIELD=VALUE",
                   help="override a config field of one attack (a JSON value), e.g. --set opt.lockstep=true; "
                        "repeatable")
    return p


def overrides(items, names) -> dict:
    """``--set`` items -> {attack: {field: value}}, checked against the attacks' config fields."""
    out: dict = {}
    for item in items:
        target, sep, text = item.partition("=")
        name, dot, field = target.partition(".")
        if not sep or not dot or not name or not field:
            raise ValueError(f"--set wants ATTACK.FIELD=VALUE, got {item!r}")
        if name not in names:
            raise ValueError(f"--set {item!r}: {name!r} is not among the attacks run ({', '.join(names)})")
        fields = {f.name for f in dataclasses.fields(ATTACKS[name].config)}
        if field not in fields:
            raise ValueError(f"--set {item!r}: {name} has no config field {field!r}; it has {', '.join(sorted(fields))}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out.setdefault(name, {})[field] = value
    return out


def configure(args) -> dict:
    """Validate every option before any model is trained or timed (``ValueError`` naming the option)."""
    c = common.configure(args)
    if args.budget is not None and not 1 <= args.budget < 2 ** 31:
        raise ValueError(f"--budget must be in 1..2^31-1, got {args.budget}")
    c["set"] = overrides(args.set, c["names"])
    for name in c["set"]:  # built once here, so a bad value fails before any training
        ATTACKS[name].config(**attack_config(name, c["set"]))
    return c


def attack_config(name: str, overrides: dict) -> dict:
    """The config an attack runs with: its battery settings (targeted if it must be), then ``--set``'s."""
    spec = ATTACKS[name]
    cfg = {k: v for k, v in spec.battery.items() if k != "budget"}
    cfg["targeted"] = not spec.supports_untargeted
    return {**cfg, **overrides.get(name, {})}


def main(argv=None) -> dict:
    args, c = common.parse(get_parser(), configure, argv)
    names, sigmas, ds, model_name = c["names"], c["sigmas"], c["ds"], c["model"]
    b = common.load(args, c, compact=not args.no_compact)
    tmp = None
    if args.cache_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="rnd_jax_xla_")
    cache = compile_cache.enable(args.cache_dir or tmp.name)  # cold: an empty cache unless --cache-dir
    model, params, clean, x_test, y_test, ctx = b.model, b.params, b.clean, b.x_test, b.y_test, b.ctx
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
    host = RecordingHost(ds.num_classes)
    host_clean = counted(clean, host)
    program = pytree.jit(pytree.apply)

    out = {"device": str(jax.devices()[0]), "dataset": args.dataset, "model": model_name,
           "n_images": args.n_images, "compact": not args.no_compact, "compilation_cache": str(cache), "rows": []}
    print(f"device {out['device']}; {model_name} on {args.dataset}; {args.n_images} images", file=sys.stderr)
    for name in names:
        spec = ATTACKS[name]
        cfg = attack_config(name, c["set"])
        targeted = cfg["targeted"]
        attack = make_attack(name, ctx, **cfg)
        budget = args.budget or spec.battery.get("budget", 1_000)
        eps = cfg.get("eps") if spec.family == "decision" else None
        protocol = Protocol(n_images=args.n_images, targeted=targeted, budget=budget, eps=eps,
                            norm=cfg.get("norm", "linf"))
        sel = select_images(jax.random.key(0), clean, x_test, y_test, args.n_images, targeted, ds.num_classes)
        keys = image_keys(jax.random.key(1), jax.random.key(2), sel.index)
        inputs = cell_inputs(sel, keys)
        for sigma in sigmas:
            row = {"attack": name, "sigma": sigma, "budget": budget, "cost": attack.cost, "set": c["set"].get(name, {})}
            oracle = Oracle(output_noise(clean, sigma), attack.output)
            runner = make_runner(attack, oracle, clean, protocol)
            jax.clear_caches()
            t0 = time.perf_counter()
            exe = program.lower(runner, *inputs).compile()
            row["compile_cold_s"] = time.perf_counter() - t0
            jax.clear_caches()
            t0 = time.perf_counter()
            exe = program.lower(runner, *inputs).compile()
            row["compile_warm_s"] = time.perf_counter() - t0
            walls = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                res = jax.block_until_ready(exe(*inputs))
                walls.append(time.perf_counter() - t0)
            row["wall_s"] = min(walls)
            metrics = summarize(sel, *res, protocol.targeted, protocol.check_queries, protocol.eps, protocol.norm)
            row["asr"] = metrics["asr"]
            row["queries_mean"] = float(np.mean(np.asarray(res[0].queries)))
            if not args.no_host and spec.family == "whitebox":
                row["host"] = "skipped: a white-box attack needs the model's gradients, which a host model lacks"
            elif not args.no_host:
                h_oracle = Oracle(output_noise(host_clean, sigma), attack.output)
                h_runner = make_runner(attack, h_oracle, host_clean, protocol)
                h_exe = program.lower(h_runner, *inputs).compile()
                jax.block_until_ready(h_exe(*inputs))  # warm the forward's batch shapes
                host.reset()
                h_res = jax.block_until_ready(h_exe(*inputs))
                sizes = list(host.sizes)
                times = forward_times(fwd, params, x_test, sizes, args.repeats)
                row["calls"] = len(sizes)
                row["calls_slowest"] = int(host.live_images.max()) if host.live_images is not None else 0
                row["mean_points_per_call"] = float(np.mean(sizes)) if sizes else 0.0
                row["host_queries_match"] = bool(np.array_equal(np.asarray(h_res[0].queries),
                                                                np.asarray(res[0].queries)))
                row["bound_s"] = bound(sizes, times)
                row["ratio"] = row["bound_s"] / row["wall_s"] if row["wall_s"] > 0 else float("nan")
            out["rows"].append(row)
            print(f"{name:>16} sigma={sigma:g}: wall {row['wall_s']:.2f}s, compile {row['compile_cold_s']:.2f}s "
                  f"(warm {row['compile_warm_s']:.2f}s), asr {row['asr']:.2f}"
                  + (f", ratio {row['ratio']:.2f}" if "ratio" in row else ""), file=sys.stderr, flush=True)
    cols = [("attack", "attack", "s"), ("sigma", "sigma", "g"), ("wall_s", "wall s", ".2f"),
            ("compile_cold_s", "compile s", ".2f"), ("compile_warm_s", "warm s", ".2f"), ("asr", "asr", ".2f"),
            ("queries_mean", "queries", ".0f")]
    if not args.no_host:
        cols += [("calls", "calls", "d"), ("calls_slowest", "slowest", "d"), ("bound_s", "bound s", ".3f"),
                 ("ratio", "bound/wall", ".2f")]
    print(table(out["rows"], cols))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    if tmp is not None:
        compile_cache.disable()
        tmp.cleanup()
    return out


if __name__ == "__main__":
    cli(main)
