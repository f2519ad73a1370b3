"""Run a grid of (dataset/model × attack × defense × level × seed) cells: sharded, resumable.

Each cell is one run of the evaluation protocol (:mod:`rnd_jax.evaluate`); its images run as one
batch sharded over every device; each finished cell appends one JSON line to
``<out>/results.jsonl`` (flushed and fsynced), and re-running the same command skips finished
cells, so a killed sweep resumes. See :mod:`rnd_jax.sweep` for the grid format and the keys.

Commands::

    python -m experiments.sweep --list                                     # built-in grids
    python -m experiments.sweep --grid aithal_table7 --smoke               # seconds to a minute
    python -m experiments.sweep --grid aithal_table7                       # default size (<= 20 min, 2 CPU cores)
    python -m experiments.sweep --grid my_grid.json --out runs/my_grid     # a grid file
    python -m experiments.sweep --grid aithal_table7 --dry-run             # validate, list the cells, run nothing

Devices. One host with several GPUs (or TPU chips) needs nothing more: the cells' images are
sharded over ``jax.devices()``, i.e. every visible accelerator::

    CUDA_VISIBLE_DEVICES=0,1,2,3 python -m experiments.sweep --grid aithal_table2 --full --out runs/aithal_table2

Several CPU devices (to check sharding without accelerators)::

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m experiments.sweep --grid aithal_table7 --smoke

A TPU pod slice (one process per TPU VM host; ``jax.distributed.initialize()`` finds its peers by
itself; results are written by process 0, so give ``--out`` a path on worker 0 or on a shared
disk)::

    gcloud compute tpus tpu-vm ssh $TPU_NAME --zone $ZONE --worker=all --command \\
      "cd rnd_jax && python -m experiments.sweep --grid aithal_table2 --full --distributed --out runs/aithal_table2"

Several GPU hosts without a cluster manager that JAX detects (on host ``i`` of ``N``)::

    python -m experiments.sweep --grid aithal_table2 --full --distributed \\
      --coordinator-address host0:8476 --num-processes N --process-id i --out /shared/runs/aithal_table2

(under SLURM, ``srun python -m experiments.sweep ... --distributed`` is enough.) Every process
must see the same grid, dataset and model cache, with the models trained beforehand by one process
(e.g. run the grid's ``--smoke`` size once without ``--distributed``). Two CPU processes on one
machine (how the tests check that the lines equal a one-process run)::

    python -m experiments.sweep --grid g.json --out runs/g --distributed \
      --coordinator-address 127.0.0.1:8476 --num-processes 2 --process-id 0 &
    python -m experiments.sweep --grid g.json --out runs/g --distributed \
      --coordinator-address 127.0.0.1:8476 --num-processes 2 --process-id 1

Independent runs may also share one ``--out`` (two grids sharing cells, or workers started by hand):
each claims a cell before running it, so every cell runs and is written once (:mod:`rnd_jax.sweep`).
Results lines that are not complete records are moved to ``results.rejected.jsonl`` and their cells
run again. ``--dry-run`` runs every check of a real run (image counts against the trained model if it
is in the cache, else against the test split, with a note).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from experiments.common import cli
from rnd_jax import compile_cache, metric_log
from rnd_jax import grids as builtin
from rnd_jax import sweep


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.sweep",
                                description="Run a grid of attack x defense cells (sharded over devices, resumable).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--grid", help="a grid JSON file, or the name of a built-in grid (--list)")
    p.add_argument("--out", default=None, help="results folder (default runs/sweep/<grid name>[-smoke|-full])")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="the grid's tiny size (seconds to minutes)")
    size.add_argument("--full", action="store_true", help="the paper's size (for an accelerator)")
    p.add_argument("--list", action="store_true", help="list the built-in grids and exit")
    p.add_argument("--dry-run", action="store_true", help="validate the grid, print its cells, run nothing")
    p.add_argument("--skip-missing", action="store_true",
                   help="drop attacks that are not registered (yet) instead of failing, and say which")
    p.add_argument("--cache-dir", default=None, help="checkpoint cache (default $RND_JAX_CACHE or ~/.cache/rnd_jax)")
    p.add_argument("--data-dir", default=None, help="tensorflow-datasets data_dir for mnist/fashion_mnist/cifar10")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_keep_args(p)
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (TPU pod slice, SLURM, or the flags below)")
    p.add_argument("--coordinator-address", default=None, help="host:port of process 0 (with --distributed)")
    p.add_argument("--num-processes", type=int, default=None, help="number of processes (with --distributed)")
    p.add_argument("--process-id", type=int, default=None, help="this process's index (with --distributed)")
    return p


def add_keep_args(p) -> None:
    """What a run keeps besides its results: artifacts, snapshots inside long cells, the metric log."""
    p.add_argument("--no-artifacts", action="store_true",
                   help="do not write each cell's arrays (x_adv, traces, scores) to artifacts/<cell id>.npz")
    p.add_argument("--chunk", type=int, default=None, metavar="K",
                   help="run each cell K attack steps at a time and snapshot its carry after each piece "
                        "(snapshots/<cell id>.npz), so a killed run resumes inside the cell; default: one program "
                        "per cell, no snapshots")
    p.add_argument("--log", default="jsonl", choices=metric_log.WRITERS,
                   help="metric log: each cell's metrics (and, with --chunk, each piece's progress) to log.jsonl "
                        "or TensorBoard event files (needs tensorboardX: rnd_jax[tensorboard])")


def keep_options(args) -> dict:
    """The :func:`rnd_jax.sweep.run_sweep` options of :func:`add_keep_args` (checked there)."""
    return {"keep_artifacts": not args.no_artifacts, "chunk": args.chunk, "metrics": args.log}


def size_of(args) -> str:
    return "smoke" if args.smoke else ("full" if args.full else "default")


def default_out(grid: dict, size: str) -> Path:
    name = grid.get("name", "grid")
    return Path("runs") / "sweep" / (name if size == "default" else f"{name}-{size}")


def prepare(args, parser) -> tuple[dict, list, "sweep.Sweeper"]:
    """The grid at the requested size, validated (image counts too, against the models already trained);
    (grid, missing attack names dropped, the Sweeper that checked them, to run the cells)."""
    if not args.grid:
        parser.error("--grid is required (a JSON file or a built-in name; see --list)")
    try:
        grid = sweep.load_grid(args.grid)
        missing = sweep.missing_attacks(grid)
        if missing and args.skip_missing:
            grid = sweep.without_attacks(grid, missing)
        elif missing:
            raise ValueError(f"grid {grid.get('name', args.grid)!r} uses attack(s) {missing} that are not registered "
                             f"(yet); registered: {sorted(sweep.ATTACKS)}. Use --skip-missing to run the rest.")
        resolved = sweep.resolve(grid, size_of(args))
        cells = sweep.expand(resolved)
        runner = sweep.Sweeper(args.cache_dir, args.data_dir, progress=not args.no_progress)
        sweep.plan(cells, args.data_dir, sweeper=runner, log=lambda s: print(s, file=sys.stderr, flush=True))
    except ValueError as e:
        parser.error(str(e))
    return grid, missing, runner


def list_grids() -> None:
    for name, g in builtin.GRIDS.items():
        miss = sweep.missing_attacks(g)
        try:
            n = [len(sweep.expand(sweep.resolve(sweep.without_attacks(g, miss), s))) for s in sweep.SIZES]
            count = "/".join(str(k) for k in n)
        except ValueError as e:
            count = f"invalid: {e}"
        extra = f"  [not registered yet: {', '.join(miss)}]" if miss else ""
        print(f"{name:18s} cells smoke/default/full = {count:12s} {g.get('description', '')}{extra}")


def main(argv=None) -> list[dict]:
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.list:
        list_grids()
        return []
    compile_cache.enable()  # a second run loads its programs (RND_JAX_COMPILE_CACHE=off: none)
    if args.distributed:
        import jax

        kw = {k: v for k, v in (("coordinator_address", args.coordinator_address),
                                ("num_processes", args.num_processes), ("process_id", args.process_id))
              if v is not None}
        jax.distributed.initialize(**kw)
    grid, missing, runner = prepare(args, parser)
    size = size_of(args)
    if missing:
        print(f"note: attack(s) {missing} of grid {grid.get('name')!r} are not registered yet; running the rest",
              file=sys.stderr)
    if args.dry_run:
        for c in sweep.expand(sweep.resolve(grid, size)):
            print(c.id, c.label, c.spec)
        return []
    out = Path(args.out) if args.out else default_out(grid, size)
    try:
        records = sweep.run_sweep(grid, out, size=size, cache_dir=args.cache_dir, data_dir=args.data_dir,
                                  progress=not args.no_progress, sweeper=runner, **keep_options(args))
    except sweep.OptionError as e:
        parser.error(str(e))
    print(summary(records))
    return records


def summary(records) -> str:
    rows = [("cell", "asr", "asr_clean", "q_mean", "acc_def")]
    for r in records:
        if r is None:  # a cell another process recorded (only process 0 reads the results)
            continue
        m, d = r["metrics"], r["defended"]
        f = lambda v, spec: "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)
        rows.append((r["label"], f(m["asr"], ".2f"), f(m["asr_clean"], ".2f"), f(m["queries_mean"], ".0f"),
                     f(d["acc_defended_mean"], ".4f")))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w[0]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows)


if __name__ == "__main__":
    cli(main)
