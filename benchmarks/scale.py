"""Compile time, run time and memory of attacks on CIFAR-10- and ImageNet-sized inputs.

    python -m benchmarks.scale                           # both sizes, all seven attacks (~10 min on 2 cores)
    python -m benchmarks.scale --sizes 32 --closure      # the same with arrays compiled in as constants
    python -m benchmarks.scale --xla fast --model-batch 32   # CPU fast-compile options, chunked forwards

For NES, Square, SimBA-DCT, HSJA, Sign-OPT, GeoDA and RayS, on random-init models:

- ``32``: ``cifar10_cnn`` (2.3M parameters) on 32x32x3 with a pool of 50 000 images (the CIFAR-10
  training size) for the decision attacks' starting points;
- ``224``: ``resnet50`` (25.6M parameters, 1000 classes) on 224x224x3 with a pool of 2 000 images.

Each (size, attack) runs in a fresh Python process, so its numbers are its own: ``compile_s`` (lowering
and XLA compilation of the whole protocol runner), ``run_s`` (one run of ``--n-images`` images at the
smallest budget that lets every image take ``--steps`` steps), ``peak_rss_mb`` (the process's peak
resident memory while compiling and running: the mark is reset once the arrays exist), ``arrays_mb``
(pool + params + images) and ``overhead_mb`` = that peak - the resident memory once the arrays exist
(what compiling and running cost beyond the arrays themselves).
``hlo_mb`` is the size of the lowered program's text.

``--xla fast`` compiles with :data:`rnd_jax.pytree.FAST_CPU_COMPILE`; ``--model-batch B`` evaluates each
query batch in chunks of ``B`` points (``model_scorer(..., batch_size=B)``), bounding activation memory.

By default the arrays are **arguments** of the compiled program (:mod:`rnd_jax.pytree`).
``--closure`` compiles the same runner as a plain closure, with params and pool as constants, as
every program was built before arrays became arguments: the "before" numbers.

Decision attacks run targeted (their starting points come from the pool), RayS and the score attacks
untargeted; labels are the random model's own classes of the attacked images.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

SIZES = {"32": dict(model="cifar10_cnn", shape=(32, 32, 3), classes=10, pool=50_000),
         "224": dict(model="resnet50", shape=(224, 224, 3), classes=1000, pool=2_000)}
ATTACK_NAMES = ("nes", "square_linf", "simba_dct", "hsja", "signopt", "geoda", "rays")
TARGETS = {"compile_s": 10.0, "overhead_mb": 2048.0}


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    """Resident memory now (MB)."""
    return _status("VmRSS")


def reset_peak() -> bool:
    """Restart the peak-memory mark at the current resident memory (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb(reset_ok: bool) -> float:
    """Peak resident memory (MB) since :func:`reset_peak` (since the start of the process if it failed)."""
    return _status("VmHWM") if reset_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(size: str, name: str, n_images: int, steps: int, closure: bool, hlo: bool, xla: str,
        model_batch: int | None, callback: bool = False) -> dict:
    """Measure one (size, attack) in this process."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rnd_jax import models, pytree
    from rnd_jax.attacks import ATTACKS, Context, make_attack
    from rnd_jax.defenses import model_scorer
    from rnd_jax.evaluate import Protocol, compile_runner, image_keys, make_runner
    from rnd_jax.oracle import Oracle

    s = SIZES[size]
    jax.block_until_ready(jax.jit(lambda v: v + 1)(jnp.zeros(())))  # start the runtime before any big array
    model = models.get_model(s["model"], s["classes"])
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, *s["shape"])))["params"]
    host = np.random.default_rng(0).random((s["pool"], *s["shape"]), dtype=np.float32)
    pool = jax.block_until_ready(jax.device_put(host))  # the one copy the programs see
    del host
    gc.collect()
    pool_labels = jnp.asarray((np.arange(s["pool"]) % s["classes"]).astype(np.int32))
    if callback:
        from rnd_jax.foreign import separately_compiled

        clean = separately_compiled(model, params, s["shape"], model_batch)
    else:
        clean = model_scorer(model, params, model_batch)
    x0 = pool[:n_images]
    labels = np.asarray(jnp.argmax(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x0), -1), np.int32)
    spec = ATTACKS[name]
    targeted = spec.family == "decision" and spec.supports_targeted
    targets = (labels + 1) % s["classes"] if targeted else np.full_like(labels, -1)
    ctx = Context(pool, pool_labels, s["classes"])
    attack = make_attack(name, ctx, targeted=targeted) if spec.supports_targeted and spec.supports_untargeted \
        else make_attack(name, ctx)
    budget = steps * attack.cost
    protocol = Protocol(n_images=n_images, targeted=targeted, budget=budget)
    ka, kd, kc = image_keys(jax.random.key(1), jax.random.key(2), jnp.arange(n_images))
    inputs = (jnp.asarray(x0), jnp.asarray(labels), jnp.asarray(targets), ka, kd, kc)
    runner = make_runner(attack, Oracle(clean, attack.output), clean, protocol)
    arrays_mb = (pool.nbytes + pool_labels.nbytes + x0.nbytes + pytree.n_bytes(params)) / 2**20
    gc.collect()
    jax.block_until_ready(params)
    reset_ok = reset_peak()
    base = rss_mb()
    options = pytree.fast_compile() if xla == "fast" else None
    t0 = time.perf_counter()
    if closure:
        lowered = jax.jit(lambda *a: runner(*a)).lower(*inputs)
    else:
        lowered = compile_runner(runner).lower(*inputs)
    compiled = lowered.compile(options) if options else lowered.compile()
    compile_s = time.perf_counter() - t0
    hlo_mb = len(lowered.as_text()) / 2**20 if hlo else float("nan")
    t0 = time.perf_counter()
    res, votes, _ = jax.block_until_ready(compiled(*inputs))
    run_s = time.perf_counter() - t0
    peak = peak_mb(reset_ok)
    return {"size": size, "attack": name, "mode": "closure" if closure else "arguments", "xla": xla,
            "model_batch": model_batch, "model": s["model"] + (" (separately compiled)" if callback else ""),
            "n_images": n_images, "budget": budget, "pool": s["pool"], "compile_s": compile_s, "run_s": run_s,
            "queries": int(np.sum(res.queries)), "peak_rss_mb": peak, "arrays_mb": arrays_mb,
            "overhead_mb": peak - base, "hlo_mb": hlo_mb}


def get_parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--attacks", nargs="+", default=list(ATTACK_NAMES), choices=list(ATTACK_NAMES))
    p.add_argument("--n-images", type=int, default=None, help="images per run (default: 8 at 32, 2 at 224)")
    p.add_argument("--steps", type=int, default=2, help="attack steps each image may take (budget = steps x cost)")
    p.add_argument("--closure", action="store_true", help="compile arrays in as constants (the old way)")
    p.add_argument("--hlo", action="store_true", help="also measure the lowered program's text size")
    p.add_argument("--xla", choices=("default", "fast"), default="default",
                   help="XLA options: its defaults, or pytree.FAST_CPU_COMPILE on the CPU (LLVM's expensive passes off)")
    p.add_argument("--model-batch", type=int, default=None,
                   help="evaluate each query batch in chunks of this many points (model_scorer's batch_size)")
    p.add_argument("--separately-compiled", action="store_true",
                   help="query the model through foreign.separately_compiled (compiled once, outside the attack)")
    p.add_argument("--out", default="runs/benchmarks/scale.json", help="JSON file for the numbers")
    p.add_argument("--one", nargs=2, metavar=("SIZE", "ATTACK"), help=argparse.SUPPRESS)
    return p


def main(argv=None) -> dict:
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.steps < 1 or any(v is not None and v < 1 for v in (args.n_images, args.model_batch)):
        parser.error("--steps, --n-images and --model-batch must be >= 1")
    if args.one:
        size, name = args.one
        n = args.n_images or (8 if size == "32" else 2)
        print(json.dumps(one(size, name, n, args.steps, args.closure, args.hlo, args.xla, args.model_batch,
                             args.separately_compiled)))
        return {}
    rows = []
    print(f"xla options: {args.xla}")
    print(f"{'size':>4} {'attack':>12} {'mode':>9} {'compile_s':>9} {'run_s':>8} {'peak_mb':>8} {'arrays_mb':>9} "
          f"{'overhead_mb':>11} {'hlo_mb':>7}", flush=True)
    for size in args.sizes:
        for name in args.attacks:
            cmd = [sys.executable, "-m", "benchmarks.scale", "--one", size, name, "--steps", str(args.steps)]
            cmd += ["--n-images", str(args.n_images)] if args.n_images else []
            cmd += ["--closure"] if args.closure else []
            cmd += ["--hlo"] if args.hlo else []
            cmd += ["--xla", args.xla]
            cmd += ["--model-batch", str(args.model_batch)] if args.model_batch else []
            cmd += ["--separately-compiled"] if args.separately_compiled else []
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            if proc.returncode != 0:
                row = {"size": size, "attack": name, "error": proc.stderr.strip().splitlines()[-1:]}
                print(f"{size:>4} {name:>12} failed: {row['error']}", flush=True)
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"{size:>4} {name:>12} {row['mode']:>9} {row['compile_s']:9.2f} {row['run_s']:8.2f} "
                      f"{row['peak_rss_mb']:8.0f} {row['arrays_mb']:9.0f} {row['overhead_mb']:11.0f} "
                      f"{row['hlo_mb']:7.2f}", flush=True)
            rows.append(row)
    ok = [r for r in rows if "error" not in r]
    meets = {k: all(r[k] <= v for r in ok) for k, v in TARGETS.items()}
    out = {"device": _device(), "targets": TARGETS, "meets_targets": meets, "rows": rows}
    print(f"targets (compile <= {TARGETS['compile_s']:g} s, overhead <= {TARGETS['overhead_mb']:g} MB): {meets}")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.out}")
    return out


def _device() -> str:
    import jax

    return f"{jax.devices()[0]} x{jax.device_count()}, {os.cpu_count()} cpus"


if __name__ == "__main__":
    main()
