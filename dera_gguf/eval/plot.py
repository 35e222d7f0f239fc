"""sweep.png: each metric against λ with standard-error bars (matplotlib, the `plot` extra); with rows in
categories, one more panel draws the first metric per category (a line each), as the paper's radar plots
set MT-bench's categories side by side."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

PLOT_HINT = "pip install 'dera-gguf[plot]'"


def plot_sweep(
    summary: List[Dict[str, Any]],
    metrics: Sequence[str],
    path: str,
    title: str = "",
    beta: Optional[float] = None,
    columns: Optional[int] = None,
    by_category: Sequence[Dict[str, Any]] = (),
) -> Optional[str]:
    """Draw the sweep into ``path``; return None, or a message saying why there is no plot.
    With ``beta`` (the pair's KL strength), a top axis gives β/λ, the strength each λ realigns to.
    ``columns``: panels per row (None: all in one); ``by_category``: per-(category, λ) entries, drawn
    for ``metrics[0]`` in a panel of their own."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: works without a display
        import matplotlib.pyplot as plt
    except ImportError:
        return f"no sweep.png: matplotlib is missing ({PLOT_HINT})"
    panels = len(metrics) + bool(by_category and metrics)
    ncols = min(columns or panels, panels)
    nrows = -(-panels // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    lams = [e["lam"] for e in summary]
    for ax, metric in zip(axes.flat, metrics):
        y = [float("nan") if e[metric] is None else e[metric] for e in summary]
        err = [0.0 if e[f"{metric}_stderr"] is None else e[f"{metric}_stderr"] for e in summary]
        ax.errorbar(lams, y, yerr=err, marker="o", capsize=3)
        ax.set_xlabel("λ")
        ax.set_title(metric, fontsize=10)
        ax.grid(alpha=0.3)
        if beta is not None:
            _beta_axis(ax, lams, beta)
    if by_category and metrics:
        _category_panel(axes.flat[len(metrics)], by_category, metrics[0])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), ".tmp-sweep.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return None


def _beta_axis(ax, lams: Sequence[float], beta: float) -> None:
    """A top axis labelling each λ > 0 with β/λ."""
    top = ax.twiny()
    top.set_xlim(ax.get_xlim())
    ticks = [lam for lam in lams if lam > 0]
    top.set_xticks(ticks)
    top.set_xticklabels([f"{beta / lam:.3g}" for lam in ticks], fontsize=7)
    top.set_xlabel("β/λ", fontsize=8)


def _category_panel(ax, by_category: Sequence[Dict[str, Any]], metric: str) -> None:
    """``metric`` against λ, one line per category."""
    categories = list(dict.fromkeys(e["category"] for e in by_category))
    for category in categories:
        mine = [e for e in by_category if e["category"] == category]
        y = [float("nan") if e.get(metric) is None else e[metric] for e in mine]
        ax.plot([e["lam"] for e in mine], y, marker=".", label=category)
    ax.set_xlabel("λ")
    ax.set_title(f"{metric} by category", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
