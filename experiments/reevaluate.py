"""Re-evaluate stored adversarial points against another defense or noise level, without re-attacking.

A sweep keeps each cell's final points (``artifacts/<cell id>.npz``, :mod:`rnd_jax.artifacts`). This
command judges them again: for each chosen cell, ``check_queries`` (9) fresh answers of the given defense
per image, from the image's own check stream, a success being a strict majority of adversarial answers
with the point within the cell's ε — the protocol's ``asr``, for points found under another defense. So
the transfer of adversarial points found under one σ to another is one command, and the cell's own
defense and level give back its stored success flags (the check keys are the same).

Usage::

    python -m experiments.paper_tables --grid aithal_table2 --smoke --out runs/t2
    python -m experiments.reevaluate --results runs/t2 --defense output_noise --levels 0 1e-3 1e-2
    python -m experiments.reevaluate --results runs/t2 --cell 4446 --defense input_noise --levels 0.01 \\
        --options '{"clip": false}'

Writes ``reevaluate.json`` and ``reevaluate.csv`` (one row per cell and level) under ``--out`` (default
``<results>/reevaluate``) and prints the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments.common import check_out, cli, table, write_csv, write_json
from rnd_jax import artifacts, sweep
from rnd_jax.defenses import DEFENSES


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.reevaluate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--results", required=True, help="a sweep results folder with artifacts/")
    p.add_argument("--cell", nargs="*", default=None, help="cell ids or unique prefixes (default: every cell with an "
                                                           "artifact)")
    p.add_argument("--defense", required=True, help=f"defense family ({', '.join(DEFENSES)}, or none)")
    p.add_argument("--levels", type=float, nargs="+", default=[0.0], help="noise levels of the defense")
    p.add_argument("--options", default="{}", help="defense options as a JSON object")
    p.add_argument("--out", default=None, help="folder (default <results>/reevaluate)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--data-dir", default=None)
    return p


COLUMNS = [("label", "cell", "s"), ("defense", "defense", "s"), ("level", "level", "g"),
           ("asr_stored", "asr (stored)", ".2f"), ("asr", "asr", ".2f"), ("asr_clean", "asr_clean", ".2f"),
           ("vote_mean", "mean vote", ".3f")]


def main(argv=None) -> list[dict]:
    from experiments.replay import find_cell

    parser = get_parser()
    args = parser.parse_args(argv)
    results = Path(args.results)
    try:
        options = json.loads(args.options)
        if not isinstance(options, dict):
            raise ValueError
    except ValueError:
        parser.error(f"--options must be a JSON object, got {args.options!r}")
    try:
        if args.defense != "none" and args.defense not in DEFENSES:
            raise ValueError(f"unknown defense {args.defense!r}; choose one of {sorted(DEFENSES)} or none")
        if args.cell:
            prefixes = args.cell
        else:
            done = sweep.read_results(results / sweep.RESULTS) if (results / sweep.RESULTS).exists() else {}
            prefixes = [cid for cid in done if artifacts.artifact_path(results, cid).exists()]
            if not prefixes:
                raise ValueError(f"no cell of {results} has an artifact (artifacts/<cell id>.npz)")
        found = [find_cell(results, p) for p in prefixes]
        for cell, _, art in found:
            if art is None:
                raise ValueError(f"cell {cell.id} ({cell.label}) has no artifact: it was run with --no-artifacts")
        out = check_out(args.out or results / "reevaluate")
    except ValueError as e:
        parser.error(str(e))
    runner = sweep.Sweeper(args.cache_dir, args.data_dir, progress=False)
    rows = []
    for cell, rec, art in found:
        for level in args.levels:
            r = runner.reevaluate(cell, art, args.defense, 0.0 if args.defense == "none" else level, options)
            r["asr_stored"] = rec["metrics"]["asr"]
            rows.append(r)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "reevaluate.json", rows)
    write_csv(out / "reevaluate.csv", rows, [c[0] for c in COLUMNS])
    print(table(rows, COLUMNS))
    return rows


if __name__ == "__main__":
    cli(main)
