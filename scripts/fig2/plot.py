"""fig2.png, after the paper's Figure 2: reward against lam per method, and length histograms."""

from __future__ import annotations

import os
from typing import Any, Dict

STYLE = {
    "dera": dict(label="DeRa at λ", color="tab:blue", marker="s"),
    "retrained": dict(label="retrained at β/λ", color="tab:orange", marker="^"),
    "weights": dict(label="weight-space at λ", color="tab:green", marker="o"),
}


def plot_fig2(summary: Dict[str, Any], path: str, title: str = "") -> None:
    """Reward vs lam, one length histogram per lam, and the KL to the retrained model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = summary["cells"]
    lams = sorted({c["lam"] for c in cells})
    fig, axes = plt.subplots(1, len(lams) + 2, figsize=(3.1 * (len(lams) + 2), 3.0))
    _reward_panel(axes[0], cells)
    for ax, lam in zip(axes[1:], lams):
        _histogram_panel(ax, [c for c in cells if c["lam"] == lam], lam)
    _ruler_panel(axes[-1], summary["ruler"])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), ".tmp-fig2.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def _reward_panel(ax, cells) -> None:
    for j, (method, style) in enumerate(STYLE.items()):
        mine = sorted((c for c in cells if c["method"] == method), key=lambda c: c["lam"])
        x = [c["lam"] * 2 ** (0.04 * (j - 1)) for c in mine]  # side by side, so the error bars show
        ax.errorbar(
            x, [c["mean_reward"] for c in mine], yerr=[c["mean_reward_stderr"] or 0 for c in mine], capsize=3, **style
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({c["lam"] for c in cells}), labels=[f"{c:g}" for c in sorted({c["lam"] for c in cells})])
    ax.set_xlabel("λ  (KL strength 0.1/λ)")
    ax.set_title("(a) length reward (eq. 10)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _histogram_panel(ax, cells, lam: float) -> None:
    for c in cells:
        h = c["length_histogram"]
        ax.stairs(h["counts"], h["edges"], color=STYLE[c["method"]]["color"], label=STYLE[c["method"]]["label"])
    ax.axvspan(20, 60, color="0.9", zorder=0)
    ax.set_xlabel("response length (tokens)")
    ax.set_title(f"length at λ = {lam:g}" + (" (one model)" if lam == 1 else ""), fontsize=9)


def _ruler_panel(ax, ruler) -> None:
    """KL(retrained || x) for DeRa, weight-space and the unchanged beta = 0.1 model, per lam."""
    bars = [
        ("kl_retrained_vs_dera", "DeRa", STYLE["dera"]["color"]),
        ("kl_retrained_vs_weights", "weight-space", STYLE["weights"]["color"]),
        ("kl_retrained_vs_aligned", "β=0.1 as is", "0.6"),
    ]
    width = 0.8 / len(bars)
    for j, (field, label, color) in enumerate(bars):
        x = [i + (j - 1) * width for i in range(len(ruler))]
        heights = [e[field] for e in ruler]
        ax.bar(x, heights, width, yerr=[e[f"{field}_stderr"] or 0 for e in ruler], color=color, label=label)
    ax.set_xticks(range(len(ruler)), labels=[f"λ={e['lam']:g}" for e in ruler])
    ax.set_title("KL(retrained ‖ ·) per token", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
