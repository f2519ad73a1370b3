"""Figures for experiment results (matplotlib, headless Agg backend)."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _fmt_level(v: float) -> str:
    return "0" if v == 0 else f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")


def asr_vs_level(rows, path, level_key: str = "sigma", title: str = "", level_label: str = "output noise σ"):
    """Two panels over noise levels (categorical axis so level 0 fits): success rates in %, and
    mean queries of successes with the defended model's clean accuracy."""
    levels = [r[level_key] for r in rows]
    xs = list(range(len(levels)))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style, name in (("asr", "o-", "asr (majority of 9 defended)"),
                             ("asr_clean", "s--", "asr_clean (undefended model)"),
                             ("asr_lucky", "^:", "asr_lucky (attack's belief)")):
        a1.plot(xs, [100 * r[key] for r in rows], style, label=name)
    a1.set_ylabel("attack success rate (%)")
    a1.set_ylim(-3, 103)
    a1.legend(fontsize=8)
    q = [r["queries_mean"] if r["queries_mean"] is not None and not math.isnan(r["queries_mean"]) else float("nan")
         for r in rows]
    a2.plot(xs, q, "o-", color="tab:purple", label="mean queries (successes)")
    a2.set_ylabel("queries")
    a2.set_yscale("log")
    a3 = a2.twinx()
    a3.plot(xs, [100 * r["acc_defended_mean"] for r in rows], "s--", color="tab:green", label="defended accuracy (mean)")
    a3.plot(xs, [100 * r["acc_defended_worst"] for r in rows], "v:", color="tab:olive", label="defended accuracy (worst)")
    a3.set_ylabel("clean accuracy (%)")
    h1, l1 = a2.get_legend_handles_labels()
    h2, l2 = a3.get_legend_handles_labels()
    a2.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower left")
    for a in (a1, a2):
        a.set_xticks(xs, [_fmt_level(v) for v in levels])
        a.set_xlabel(level_label)
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def success_curve(queries, success, budget: int, points: int = 200):
    """(q, share of images that succeeded within q queries) for q on ``points`` steps of ``0..budget``:
    an image counts from the queries at which its run ended successfully (its stop), so the curve at
    ``budget`` is the success rate."""
    import numpy as np

    queries, success = np.asarray(queries), np.asarray(success, bool)
    qs = np.unique(np.linspace(0, max(int(budget), 1), points).round().astype(np.int64))
    if not len(queries):
        return qs, np.full(len(qs), np.nan)
    return qs, ((queries[None, :] <= qs[:, None]) & success[None, :]).mean(1)


def success_vs_queries(series: dict, budget: int, path, title: str = "", ylabel: str = "asr (%)") -> None:
    """One panel of success-vs-queries curves: ``series`` maps a line label to ``(queries, success)`` per image."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    _curves_on(ax, series, budget, ylabel, title)
    _save(fig, path)


def _curves_on(ax, series: dict, budget: int, ylabel: str, title: str, legend_max: int = 12) -> None:
    for name, (queries, success) in series.items():
        qs, y = success_curve(queries, success, budget)
        ax.plot(qs, 100 * y, label=str(name))
    ax.set_xlabel("queries")
    ax.set_ylim(-3, 103)
    _decorate(ax, ylabel, title, len(series), legend_max)


def _decorate(ax, ylabel: str, title: str, n_lines: int, legend_max: int = 12) -> None:
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if 0 < n_lines <= legend_max:
        ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)


def _save(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _split_label(label: str) -> tuple[str, str]:
    attack, _, defense = label.partition(" vs ")
    return attack, defense or label


def asr_vs_queries(records, path, title: str = "", kind: str = "success", max_panels: int = 12) -> None:
    """ASR vs queries, one panel per attack, one line per defense (level): from each record's per-image
    queries and success flags (``kind``: ``success`` = asr, ``success_stop``, ``success_lucky``, ...)."""
    records = [r for r in records if r is not None]
    panels: dict[str, list] = {}
    for r in records:
        attack, _ = _split_label(r["label"])
        panels.setdefault(attack, []).append(r)
    names = list(panels)[:max_panels]
    cols = min(3, max(1, len(names)))
    rows = max(1, -(-len(names) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        series = {}
        for r in panels[name]:
            im = r["images"]
            series[_split_label(r["label"])[1]] = (im["queries"], im.get(kind, im.get("success", [])))
        _curves_on(ax, series, max(r["cell"]["budget"] for r in panels[name]), f"{'asr' + kind[7:]} (%)", name, legend_max=10)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)


def median_queries_vs_level(records, path, title: str = "", kind: str = "success") -> None:
    """Median queries of the successful images vs the defense's noise level, one line per (attack, defense
    family); cells without a numeric level (no defense: level 0) are placed at level 0."""
    import numpy as np

    lines: dict[tuple[str, str], list] = {}
    for r in records:
        if r is None:
            continue
        attack, _ = _split_label(r["label"])
        family = r["cell"]["defense"]["name"]
        level = r.get("level")
        level = 0.0 if level is None or family == "none" else float(level)
        im = r["images"]
        q, ok = np.asarray(im["queries"]), np.asarray(im.get(kind, im.get("success", [])), bool)
        lines.setdefault((attack, family), []).append((level, float(np.median(q[ok])) if ok.any() else np.nan))
    levels = sorted({lv for pts in lines.values() for lv, _ in pts})
    xs = {lv: i for i, lv in enumerate(levels)}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(levels) + 3), 4))
    for (attack, family), pts in lines.items():
        pts = sorted(pts)
        ax.plot([xs[lv] for lv, _ in pts], [m for _, m in pts], "o-", label=f"{attack} / {family}")
    ax.set_xticks(range(len(levels)), [_fmt_level(v) for v in levels], fontsize=8)
    ax.set_xlabel("noise level")
    _decorate(ax, "median queries (successes)", title, len(lines))
    _save(fig, path)
