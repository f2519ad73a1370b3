"""The papers' tables on our data: run a built-in grid's sweep (resumable), then lay it out as the paper does.

Each built-in grid of :mod:`rnd_jax.grids` mirrors one table (its ``table`` block names it):

========================  ===================================================================
grid                      mirrors (each under its paper's protocol, :mod:`rnd_jax.grids`)
========================  ===================================================================
``aithal_table2``         Aithal & Li (2022) Table 2: targeted soft-label attacks x sigma
``aithal_table3``         Aithal & Li Table 3: targeted hard-label attacks x sigma
``aithal_table10``        Aithal & Li Table 10: untargeted hard-label attacks x sigma
``aithal_table5``         Aithal & Li Table 5: quantization / correlated noise (Lemma 2)
``aithal_table6``         Aithal & Li Table 6: NES step beta x sigma
``aithal_table7``         Aithal & Li Table 7 / Theorem 4: AutoZOOM with N repeats, N x budget
                          (``aithal_table7_equal``: at an equal budget)
``aithal_table8``         Aithal & Li Table 8: NES samples J at sigma = 1e-4
``aithal_table9``         Aithal & Li Table 9: untargeted soft-label attacks x sigma
``aithal_table12``        Aithal & Li Table 12: distortion (same cells as table 2)
``snd_table2`` .. ``5``   SND Tables 2-5: decision / l2 attacks x nu, P_mis, HSJA with T repeats
                          at 2K x T (``snd_table5_equal``: equal budget)
``rnd_mu_nu``             RND: failure rate over the (mu, nu) grid, NES and Square
``rnd_eot``               RND: EOT with M samples, M x budget (``rnd_eot_equal``: fixed budget)
``rfd_table1`` / ``2``    randomized feature defense Tables 1 / 2 (1%-2% / 2%-4% accuracy drops)
``rfd_table5``            randomized feature defense Table 5 (RayS, Sign-Flip)
``rfd_table6`` / ``14``   randomized feature defense Tables 6 / 14 (one layer: fixed nu / 4% drop)
``rfd_table7``            randomized feature defense Table 7 (EOT, M x 1000 queries)
========================  ===================================================================

Commands (default size: at most about 20 minutes on 2 CPU cores for the NES-based grids;
``--smoke``: seconds to minutes; ``--full``: the paper's size, for an accelerator)::

    python -m experiments.paper_tables --grid aithal_table7 --out runs/tables/aithal_table7
    python -m experiments.paper_tables --grid aithal_table2 --full --out runs/tables/aithal_table2-full
    python -m experiments.paper_tables --grid aithal_table12 --results runs/tables/aithal_table2  # table 2's cells
    python -m experiments.paper_tables --grid snd_table2 --skip-missing                        # run what is registered

A grid whose attacks are not all registered fails at once, naming them; ``--skip-missing`` runs the
rest and the table says which attacks are missing. ``--render-only`` lays out whatever cells are
already in ``--out`` without running anything. Outputs under ``--out`` (default
``runs/tables/<grid>[-smoke|-full]``): the sweep's ``results.jsonl`` / ``sweep.json`` /
``timing.jsonl``, ``log.jsonl`` and ``artifacts/<cell id>.npz`` (or in ``--results``, a sweep folder shared
with another table; ``--no-artifacts`` skips the arrays; ``--chunk K`` snapshots long cells every K steps
so a killed run resumes inside them), and ``table.md`` (printed too), ``table.csv`` (one row per cell),
``table.png`` (the first metric over the columns), ``asr_vs_queries.png`` (success vs queries, one panel
per attack) and ``median_queries.png`` (median queries of the successes vs the noise level).
``python -m experiments.replay --results <folder> --cell <id> --image <i>`` replays one image of a cell.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.common import cli  # noqa: E402
from experiments.sweep import add_keep_args, keep_options, size_of  # noqa: E402
from rnd_jax import compile_cache, plots  # noqa: E402
from rnd_jax import grids as builtin  # noqa: E402
from rnd_jax import sweep  # noqa: E402
from rnd_jax.evaluate import SUCCESS_KINDS  # noqa: E402

RATE_PREFIXES = ("asr", "robust", "failure", "acc_", "within")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.paper_tables",
                                description="Run a built-in grid's sweep and render it as the paper's table.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--grid", required=True, help=f"a built-in grid ({', '.join(builtin.GRIDS)}) or a grid JSON file "
                                                 "with a 'table' block")
    p.add_argument("--out", default=None, help="folder (default runs/tables/<grid>[-smoke|-full])")
    p.add_argument("--results", default=None,
                   help="sweep folder whose results.jsonl holds (and receives) the cells; default: --out")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny size (tests)")
    size.add_argument("--full", action="store_true", help="the paper's size (accelerator)")
    p.add_argument("--skip-missing", action="store_true", help="run the registered attacks and mark the others")
    p.add_argument("--render-only", action="store_true", help="render the cells already in --out; run nothing")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--no-progress", action="store_true")
    add_keep_args(p)
    return p


# ----------------------------------------------------------------------------- values

def parse_at(key: str):
    """``(base, success kind, over all selected images, B, scaled by M)`` of a ``<kind>@B`` table value;
    ``ValueError`` naming the value if it is not one."""
    base, _, b = key.partition("@")
    digits = b[:-2] if b.endswith("xM") else b
    if base.startswith("robust"):
        over_all = base.startswith("robust_all")
        kind = "asr" + base[len("robust_all" if over_all else "robust"):]
    else:
        kind, over_all = base, False
    if kind not in SUCCESS_KINDS or not digits.isascii() or not digits.isdigit() or int(digits) < 1:
        raise ValueError(f"unknown table value {key!r}: '<kind>@B' takes a success notion ({', '.join(SUCCESS_KINDS)}) "
                         f"or robust[_all][_stop], and a budget B (an int >= 1, optionally 'BxM')")
    return base, kind, over_all, int(digits), b.endswith("xM")


def check_table(grid: dict) -> None:
    """The resolved grid's ``table`` values that :func:`value` computes (``<kind>@B``) are well formed, so a table
    never fails after its sweep has run."""
    for key in (grid.get("table") or {}).get("values", []):
        if "@" in key:
            parse_at(key)


def _at_budget(record: dict, key: str):
    """``<kind>@B`` for a success notion (``asr``, ``asr_stop``, ``asr_clean``, ``asr_lucky``) and its robust
    accuracies (``robust[_all][_stop]@B``): the share of images with that success within ``B`` queries.
    ``@BxM`` scales ``B`` by the cell's EOT repeats M (SND's "2K x T", RFD's "M x 1000")."""
    base, kind, over_all, b, scaled = parse_at(key)
    if scaled:
        b *= record["cell"]["attack"]["eot"]
    img = record["images"]
    ok = np.asarray(img[sweep.success_key(kind)], bool) & (np.asarray(img["queries"]) <= b)
    if not len(ok):
        return math.nan
    if base.startswith("robust"):
        selected = record["metrics"].get("n_selected", len(ok)) if over_all else len(ok)
        return (len(ok) - int(ok.sum())) / selected
    return float(np.mean(ok))


def value(row: dict, record: dict, key: str):
    """A table value of one cell: a metric of :func:`rnd_jax.sweep.flat` or a derived one."""
    if "@" in key:
        return _at_budget(record, key)
    if key == "failure":
        return None if row.get("asr") is None else 1.0 - row["asr"]
    if key == "acc_drop":
        return row["acc_clean"] - row["acc_defended_mean"]
    if key == "l2_per_pixel_e4":
        return None if row.get("l2_per_pixel") is None else row["l2_per_pixel"] * 1e4
    return row.get(key)


def fmt(key: str, v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, bool) or isinstance(v, str):
        return str(v)
    if key.startswith("acc_"):
        return f"{v:.4f}"
    if key.startswith(RATE_PREFIXES):
        return f"{v:.2f}"
    if key.startswith("queries"):
        return f"{v:.0f}"
    if key in ("level", "drop") or key.startswith(("cfg.", "opt.")):
        return f"{v:g}" if isinstance(v, (int, float)) else str(v)
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"


def _short(key: str) -> str:
    return key.split(".", 1)[1] if key.startswith(("cfg.", "opt.")) else key


def label(row: dict, keys) -> str:
    parts = []
    for k in keys:
        v = row.get(k)
        if v is None:
            continue
        if k in ("attack", "defense", "label", "dataset", "model"):
            parts.append(str(v))
        elif k == "drop":
            parts.append(f"{100 * v:g}% drop")
        else:
            parts.append(f"{_short(k)}={fmt(k, v)}")
    return ", ".join(parts) or "-"


def _ordered(items):
    seen, out = set(), []
    for it in items:
        if it not in seen:
            seen.add(it)
            out.append(it)
    return out


# ----------------------------------------------------------------------------- rendering

def render(grid: dict, records: list[dict], command: str, missing=(), pending: int = 0):
    """(markdown, csv rows, plot data) of a resolved grid's records (records of unfinished cells: None)."""
    spec = grid.get("table") or {"rows": ["label"], "cols": [], "values": ["asr", "queries_mean"]}
    recs = [r for r in records if r is not None]
    rows = [sweep.flat(r) for r in recs]
    rk, ck, values = spec.get("rows", ["label"]), spec.get("cols", []), spec.get("values", ["asr"])
    rlabels = _ordered(label(r, rk) for r in rows)
    clabel = (lambda r: fmt(ck[0], r.get(ck[0])) if r.get(ck[0]) is not None else "-") if len(ck) == 1 else \
        (lambda r: label(r, ck) if ck else "")
    clabels = _ordered(clabel(r) for r in rows)
    lines = [f"### {spec.get('mirrors', grid.get('name', ''))}: {grid.get('name', '')}", ""]
    if spec.get("title"):
        lines += [spec["title"] + ".", ""]
    if rows:
        first = rows[0]
        budgets = sorted({r["budget"] for r in rows})
        sel = first.get("n_selected", first["n_images"])
        images = (f"{first['n_images']} images per cell" if sel == first["n_images"] else
                  f"{sel} images per cell ({first['n_images']} correctly classified and attacked)")
        lines += [f"Setup: {first['dataset']} / {first['model']}, {images}, "
                  f"{'targeted' if first['targeted'] else 'untargeted'}, budget {', '.join(map(str, budgets))} "
                  f"queries, seeds {sorted({r['seed'] for r in rows})}; clean accuracy {first['acc_clean']:.4f}. "
                  f"Command: `{command}`", ""]
    if missing:
        lines += [f"**Not registered yet (not run): {', '.join(missing)}.**", ""]
    if pending:
        lines += [f"**{pending} cell(s) not finished yet: shown as blank.**", ""]
    grid_vals = {}
    for key in values:
        table = {}
        for r, rec in zip(rows, recs):
            table[(label(r, rk), clabel(r))] = value(r, rec, key)
        grid_vals[key] = table
        head = f"{' / '.join(_short(k) for k in rk) or 'cell'} \\ {spec.get('col_name', ' / '.join(ck))}" if ck \
            else (' / '.join(_short(k) for k in rk) or "cell")
        cols = clabels if ck else [key]
        lines += [f"**{key}**", "", "| " + " | ".join([head] + [c or key for c in cols]) + " |",
                  "|" + "---|" * (len(cols) + 1)]
        for rl in rlabels:
            cells = [fmt(key, table.get((rl, c))) if (rl, c) in table else " " for c in clabels]
            lines.append("| " + " | ".join([rl] + cells) + " |")
        lines.append("")
    if spec.get("note"):
        lines += [f"Note: {spec['note']}", ""]
    csv_cols = ["id", "label"] + list(rk) + list(ck) + list(values)
    csv_rows = []
    for r, rec in zip(rows, recs):
        csv_rows.append({**{k: r.get(k) for k in ["id", "label"] + list(rk) + list(ck)},
                         **{k: value(r, rec, k) for k in values}})
    return "\n".join(lines), (csv_cols, csv_rows), (rlabels, clabels, grid_vals, values[0] if values else None)


def write_csv(path: Path, cols, rows) -> None:
    """The rows as CSV, written atomically (runs sharing ``--out`` never tear it)."""
    f = io.StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None or (isinstance(r.get(k), float) and not math.isfinite(r[k]))
                        else r[k]) for k in cols})
    sweep.write_atomic(path, f.getvalue())


def plot(path: Path, plot_data, title: str, col_name: str) -> None:
    rlabels, clabels, grid_vals, key = plot_data
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(clabels) + 3), 4))
    xs = np.arange(len(clabels))
    if key is not None:
        for rl in rlabels:
            ys = [grid_vals[key].get((rl, c)) for c in clabels]
            ys = [np.nan if y is None else y for y in ys]
            ax.plot(xs, ys, "o-", label=rl)
        ax.set_ylabel(key)
    ax.set_xticks(xs, clabels, fontsize=8, rotation=20 if len(clabels) > 6 else 0)
    ax.set_xlabel(col_name)
    ax.grid(alpha=0.3)
    if 0 < len(rlabels) <= 12 and key is not None:
        ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    sweep.write_atomic(path, buf.getvalue())


def main(argv=None) -> str:
    parser = get_parser()
    args = parser.parse_args(argv)
    size = size_of(args)
    compile_cache.enable()  # a second run loads its programs (RND_JAX_COMPILE_CACHE=off: none)
    try:
        grid = sweep.load_grid(args.grid)
        missing = sweep.missing_attacks(grid)
        if missing and not (args.skip_missing or args.render_only):
            raise ValueError(f"table {grid.get('name', args.grid)!r} needs attack(s) {missing}, which are not "
                             f"registered yet; use --skip-missing to run the others (the table will say so)")
        grid = sweep.without_attacks(grid, missing)
        resolved = sweep.resolve(grid, size)
        cells = sweep.expand(resolved)
        check_table(resolved)
        runner = sweep.Sweeper(args.cache_dir, args.data_dir, progress=not args.no_progress)
        sweep.plan(cells, args.data_dir, sweeper=runner, log=lambda s: print(s, file=sys.stderr, flush=True))
    except ValueError as e:
        parser.error(str(e))
    name = grid.get("name", "grid")
    out = Path(args.out) if args.out else Path("runs") / "tables" / (name if size == "default" else f"{name}-{size}")
    flag = {"smoke": " --smoke", "full": " --full", "default": ""}[size]
    command = f"python -m experiments.paper_tables --grid {name}{flag}" + (" --skip-missing" if missing else "")
    if missing:
        print(f"note: table {name!r}: attack(s) {missing} are not registered yet and are left out", file=sys.stderr)
    results = Path(args.results) if args.results else out
    if args.render_only:
        done = sweep.read_results(results / sweep.RESULTS)
        records = [done.get(c.id) for c in cells]
    else:
        try:
            records = sweep.run_sweep(grid, results, size=size, cache_dir=args.cache_dir, data_dir=args.data_dir,
                                      progress=not args.no_progress, sweeper=runner, **keep_options(args))
        except sweep.OptionError as e:
            parser.error(str(e))
    pending = sum(r is None for r in records)
    md, (cols, rows), pdata = render(resolved, records, command, missing, pending)
    out.mkdir(parents=True, exist_ok=True)
    sweep.write_atomic(out / "table.md", md + "\n")
    write_csv(out / "table.csv", cols, rows)
    spec = resolved.get("table", {})
    plot(out / "table.png", pdata, f"{spec.get('mirrors', name)} ({name})", spec.get("col_name", ""))
    done = [r for r in records if r is not None]
    if done:
        title = f"{spec.get('mirrors', name)} ({name})"
        plots.asr_vs_queries(done, out / "asr_vs_queries.png", title)
        plots.median_queries_vs_level(done, out / "median_queries.png", title)
    print(md)
    return md


if __name__ == "__main__":
    cli(main)
