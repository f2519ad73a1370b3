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
