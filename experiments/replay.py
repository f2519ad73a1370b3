"""Replay one image of one sweep cell alone, check it against the stored record, and plot its trajectory.

Every run is a deterministic function of its keys (DESIGN.md, "Keys and replay"): image ``i`` of a cell
gets the keys it had in the whole batch, so attacking it alone must reproduce the stored record — the
same queries, steps, claims, stop-rule verdict, check votes and clean class (exactly) and the same final
point, trace and final scores (floats to 1e-6). This command re-runs that one image, compares it field
by field with ``results.jsonl`` and, when present, the cell's artifact (``artifacts/<cell id>.npz``), and
draws its trajectory from the replayed trace and a second, tapped replay that sees every query:

- the attack's loss vs queries (its success belief after each recorded step marked),
- the distance of its point to the original image (ℓ2 and ℓ∞) vs queries, and of every query point,
- the defended answers it saw (adversarial or not, per query) beside the clean model's answer at the
  same point: a defended "adversarial" the clean model does not share is a lucky answer.

Usage (any sweep folder: ``experiments.sweep`` or ``experiments.paper_tables`` output)::

    python -m experiments.paper_tables --grid aithal_table2 --smoke --out runs/t2
    python -m experiments.replay --results runs/t2 --cell <cell id or unique prefix> --image 0
    python -m experiments.replay --results runs/t2 --list          # the folder's cells

Writes ``replay.json`` (every compared field: stored, replayed, equal) and ``trajectory.png`` under
``--out`` (default ``<results>/replay/<cell id>-<image>``). Exits 1 if the replay differs, 2 on bad options.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.common import check_out, cli, write_json  # noqa: E402
from rnd_jax import artifacts, compile_cache, sweep  # noqa: E402
from rnd_jax.evaluate import QueryTap  # noqa: E402

EXACT = ("queries", "loss_queries", "check_queries", "steps", "claims", "lucky", "stopped_success", "invalid",
         "clean_pred", "check_votes", "success", "success_stop", "success_clean", "success_lucky", "index", "label",
         "target")
EXACT_ARRAYS = ("trace_queries", "trace_claimed")
CLOSE_ARRAYS = ("x_adv", "trace_loss", "trace_l2", "trace_linf", "scores_defended", "scores_clean")
ATOL = 1e-6


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.replay", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--results", required=True, help="a sweep results folder (results.jsonl, sweep.json)")
    p.add_argument("--cell", default=None, help="cell id (or a unique prefix of one)")
    p.add_argument("--image", type=int, default=0, help="position of the image in the cell's selection")
    p.add_argument("--list", action="store_true", help="list the folder's recorded cells and exit")
    p.add_argument("--out", default=None, help="folder for replay.json and trajectory.png "
                                               "(default <results>/replay/<cell id>-<image>)")
    p.add_argument("--no-answers", action="store_true",
                   help="skip the tapped replay of every query (its answers and query distances)")
    p.add_argument("--cache-dir", default=None, help="checkpoint cache (default $RND_JAX_CACHE or ~/.cache/rnd_jax)")
    p.add_argument("--data-dir", default=None)
    return p


class AnswerTap(QueryTap):
    """A :class:`QueryTap` that keeps, per query, the defended and clean classes and the query's distances."""

    def reset(self):
        super().reset()
        self.noisy, self.clean, self.l2, self.linf = [], [], [], []
        self.x0 = getattr(self, "x0", None)

    def record(self, noisy, clean, x):
        super().record(noisy, clean, x)
        x = np.asarray(x)
        self.noisy.extend(np.asarray(noisy).tolist())
        self.clean.extend(np.asarray(clean).tolist())
        if len(x):
            d = (x - self.x0[None]).reshape(len(x), -1)
            self.l2.extend(np.linalg.norm(d, axis=1).tolist())
            self.linf.extend(np.abs(d).max(1).tolist())


def find_cell(results: Path, cell: str):
    """(Cell, its record, its artifact arrays or None) of a results folder, by id or unique id prefix."""
    meta_path = results / "sweep.json"
    if not meta_path.is_file():
        raise ValueError(f"{results} is not a sweep results folder (no sweep.json)")
    cells = {c["id"]: c for c in json.loads(meta_path.read_text())["cells"]}
    matches = [i for i in cells if i.startswith(cell)] if cell else []
    if len(matches) != 1:
        some = ", ".join(f"{i} ({cells[i]['label']})" for i in list(cells)[:8])
        why = "no cell id starts with" if not matches else f"{len(matches)} cell ids start with"
        raise ValueError(f"{why} {cell!r} in {results}; its cells include: {some} (--list shows all)")
    cid = matches[0]
    done = sweep.read_results(results / sweep.RESULTS)
    if cid not in done:
        raise ValueError(f"cell {cid} ({cells[cid]['label']}) has no record in {results / sweep.RESULTS} yet")
    c = sweep.Cell.make(cells[cid]["cell"], cells[cid]["label"])
    if c.id != cid:
        raise ValueError(f"cell {cid} now has id {c.id}: its definition changed since it was run (another version "
                         f"of rnd_jax?); it cannot be replayed exactly")
    path = artifacts.artifact_path(results, cid)
    art = artifacts.check_cell(artifacts.read(path), cid, path) if path.exists() else None
    return c, done[cid], art


def compare(stored_images: dict, stored_arrays: dict | None, i: int, record: dict, arrays: dict) -> list[dict]:
    """Field-by-field comparison of stored image ``i`` with the replayed image (position 0 of ``record``)."""
    rows = []
    for key in EXACT:
        if key in stored_images:
            a, b = stored_images[key][i], record["images"][key][0]
            rows.append({"field": key, "stored": a, "replayed": b, "equal": a == b})
    if stored_arrays is not None:
        for key in EXACT_ARRAYS + CLOSE_ARRAYS:
            if key not in stored_arrays or key not in arrays:
                continue
            a, b = np.asarray(stored_arrays[key][i]), np.asarray(arrays[key][0])
            if key in EXACT_ARRAYS:
                ok = bool(a.shape == b.shape and np.array_equal(a, b))
                diff = None
            else:
                ok = bool(a.shape == b.shape and np.allclose(a, b, rtol=0, atol=ATOL, equal_nan=True))
                both = np.isfinite(a) & np.isfinite(b) if a.shape == b.shape else np.zeros(0, bool)
                diff = float(np.max(np.abs(a - b)[both])) if both.any() else 0.0
            rows.append({"field": key, "shape": list(a.shape), "max_abs_diff": diff, "equal": ok})
    return rows


def plot(path: Path, title: str, arrays: dict, tap: AnswerTap | None, adversarial) -> None:
    tq, ok = arrays["trace_queries"][0], arrays["trace_queries"][0] >= 0
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    a1, a2, a3 = axes
    loss = arrays["trace_loss"][0]
    a1.plot(tq[ok], loss[ok], ".-", label="loss (recorded steps)")
    if "trace_claimed" in arrays:
        claimed = ok & arrays["trace_claimed"][0]
        a1.plot(tq[claimed], loss[claimed], "r*", ms=9, label="attack claims success")
    a1.set_xlabel("queries")
    a1.set_ylabel("attack loss")
    a1.legend(fontsize=8)
    if tap is not None and tap.l2:
        a2.plot(np.arange(len(tap.l2)), tap.l2, ",", color="0.6", label="every query point (ℓ2)")
    if "trace_l2" in arrays:
        a2.plot(tq[ok], arrays["trace_l2"][0][ok], ".-", label="attack's point ℓ2")
        a2.plot(tq[ok], arrays["trace_linf"][0][ok], ".--", label="attack's point ℓ∞")
    a2.set_xlabel("queries")
    a2.set_ylabel("distance to the original image")
    a2.legend(fontsize=8)
    if tap is not None and tap.noisy:
        q = np.arange(len(tap.noisy))
        noisy_adv = adversarial(np.asarray(tap.noisy))
        clean_adv = adversarial(np.asarray(tap.clean))
        lucky = noisy_adv & ~clean_adv
        a3.plot(q[noisy_adv], np.ones(noisy_adv.sum()), "|", color="tab:red", label="defended: adversarial")
        a3.plot(q[clean_adv], np.zeros(clean_adv.sum()), "|", color="tab:blue", label="clean: adversarial")
        a3.plot(q[lucky], np.full(lucky.sum(), 0.5), "x", color="tab:orange", ms=4,
                label=f"lucky (defended only): {int(lucky.sum())}")
        a3.set_xlim(-0.5, len(q) - 0.5)
        a3.set_yticks([0, 0.5, 1], ["clean", "lucky", "defended"])
        a3.set_ylim(-0.5, 1.5)
        a3.legend(fontsize=7, loc="center right")
    else:
        a3.text(0.5, 0.5, "no tapped replay (--no-answers)", ha="center", va="center", transform=a3.transAxes)
    a3.set_xlabel("query")
    a3.set_title("answers the attack saw", fontsize=9)
    for a in axes:
        a.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = get_parser()
    args = parser.parse_args(argv)
    results = Path(args.results)
    if args.list:
        done = sweep.read_results(results / sweep.RESULTS) if (results / sweep.RESULTS).exists() else {}
        if not done:
            parser.error(f"no recorded cells in {results}")
        for cid, rec in done.items():
            print(cid, rec["label"], f"({len(rec['images']['queries'])} images)")
        return {}
    if not args.cell:
        parser.error("--cell is required (or --list)")
    compile_cache.enable()
    try:
        cell, rec, art = find_cell(results, args.cell)
        n = len(rec["images"]["queries"])
        if not 0 <= args.image < n:
            raise ValueError(f"--image must be in 0..{n - 1}: cell {cell.id} attacked {n} images")
        out = check_out(args.out or results / "replay" / f"{cell.id}-{args.image}")
    except ValueError as e:
        parser.error(str(e))
    out.mkdir(parents=True, exist_ok=True)
    runner = sweep.Sweeper(args.cache_dir, args.data_dir, progress=False)
    replayed, arrays = runner.run_cell(cell, positions=[args.image])
    rows = compare(rec["images"], art, args.image, replayed, arrays)
    tap = None
    if not args.no_answers:
        tap = AnswerTap()
        tap.x0 = np.asarray(runner.selection(cell.d).images[args.image])
        res, _, _ = runner.watch_image(cell, args.image, tap)
        rows.append({"field": "tapped queries", "stored": rec["images"]["queries"][args.image],
                     "replayed": int(res.queries), "equal": int(res.queries) == rec["images"]["queries"][args.image]})
    same = all(r["equal"] for r in rows)
    label, target = rec["images"]["label"][args.image], rec["images"]["target"][args.image]
    targeted = cell.d["targeted"]
    adversarial = (lambda cls: cls == target) if targeted else (lambda cls: cls != label)
    title = (f"{cell.label} — image {args.image} (test index {rec['images']['index'][args.image]}, label {label}"
             + (f", target {target}" if targeted else "") + f"): {'reproduced' if same else 'DIFFERS'}")
    plot(out / "trajectory.png", title, arrays, tap, adversarial)
    summary = {"cell": cell.id, "label": cell.label, "image": args.image, "reproduced": same, "fields": rows,
               "artifact": art is not None,
               "answers": None if tap is None else {"queries": len(tap.noisy),
                                                    "defended_adversarial": int(adversarial(np.asarray(tap.noisy)).sum()),
                                                    "clean_adversarial": int(adversarial(np.asarray(tap.clean)).sum())}}
    write_json(out / "replay.json", summary)
    for r in rows:
        if "stored" in r:
            print(f"{'ok ' if r['equal'] else 'BAD'} {r['field']:16s} stored {r['stored']!r:>10}  replayed {r['replayed']!r}")
        else:
            print(f"{'ok ' if r['equal'] else 'BAD'} {r['field']:16s} {r['shape']}  max |diff| {r['max_abs_diff']}")
    print(f"{title}\nwrote {out / 'replay.json'} and {out / 'trajectory.png'}")
    if not same:
        print("replay differs from the stored record", file=sys.stderr)
        raise SystemExit(1)
    return summary


if __name__ == "__main__":
    cli(main)
