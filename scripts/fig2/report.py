"""The comparison's numbers: one cell per (method, lam), the KL ruler per lam, summary.json / .csv."""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
from typing import Any, Dict, List, Sequence, Tuple

from fig2.crosskl import KL_FIELDS

from dera_gguf.eval.store import atomic_write
from dera_gguf.eval.summary import mean_stderr

METHODS = ("dera", "retrained", "weights")
# the method's distance to the retrained model: KL(retrained || method) and its reverse
METHOD_KL = {
    "dera": ("kl_retrained_vs_dera", "kl_dera_vs_retrained"),
    "weights": ("kl_retrained_vs_weights", "kl_weights_vs_retrained"),
}
HIST_WIDTH = 8  # tokens per bin of the length histograms


def length_histogram(lengths: Sequence[int], max_tokens: int) -> Dict[str, list]:
    """Counts in bins of HIST_WIDTH tokens from 0 to max_tokens (the last bin holds max_tokens)."""
    edges = list(range(0, max_tokens + HIST_WIDTH, HIST_WIDTH))
    counts = [0] * (len(edges) - 1)
    for n in lengths:
        counts[min(n // HIST_WIDTH, len(counts) - 1)] += 1
    return {"edges": edges, "counts": counts}


def with_stderr(entry: Dict[str, Any], name: str, values: Sequence[float]) -> None:
    entry[name], entry[f"{name}_stderr"] = mean_stderr([float(v) for v in values])


def cell(
    method: str,
    lam: float,
    beta: float,
    samples: Sequence[Dict[str, Any]],
    cross: Sequence[Dict[str, Any]],
    max_tokens: int,
    length_range: Tuple[int, int],
) -> Dict[str, Any]:
    """Reward, length and KL to the reference of one method at one lam, and its KL to the retrained model.

    ``cross`` is the ruler's records at this lam (empty at lam 1, where every method is
    the retrained model itself: its KL to it is 0).
    """
    lengths = [r["length_tokens"] for r in samples]
    entry: Dict[str, Any] = {"method": method, "lam": lam, "kl_strength": beta / lam, "n": len(samples)}
    with_stderr(entry, "mean_reward", [r["reward"] for r in samples])
    with_stderr(entry, "mean_length_tokens", lengths)
    entry["median_length_tokens"] = statistics.median(lengths) if lengths else None
    n, (l_min, l_max) = max(len(samples), 1), length_range
    entry["share_below_range"] = sum(x < l_min for x in lengths) / n
    entry["share_in_range"] = sum(l_min <= x <= l_max for x in lengths) / n
    entry["share_above_range"] = sum(x > l_max for x in lengths) / n
    entry["share_cut_at_max_tokens"] = sum(r["finish_reason"] == "length" for r in samples) / n
    with_stderr(entry, "mean_kl_to_reference", [r["kl_mean"] for r in samples])
    forward, reverse = METHOD_KL.get(method, (None, None))
    if lam == 1 or method == "retrained":
        entry["kl_retrained_vs_method"], entry["kl_retrained_vs_method_stderr"] = 0.0, 0.0
        entry["kl_method_vs_retrained"], entry["kl_method_vs_retrained_stderr"] = 0.0, 0.0
    else:
        with_stderr(entry, "kl_retrained_vs_method", [r[forward] for r in cross])
        with_stderr(entry, "kl_method_vs_retrained", [r[reverse] for r in cross])
    entry["length_histogram"] = length_histogram(lengths, max_tokens)
    return entry


def ruler_entry(lam: float, cross: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Every KL of the ruler at one lam, mean and standard error over the retrained samples."""
    entry: Dict[str, Any] = {"lam": lam, "n": len(cross)}
    if cross:
        entry["mean_positions"] = statistics.fmean(r["positions"] for r in cross)
    for name in KL_FIELDS:
        with_stderr(entry, name, [r[name] for r in cross])
    return entry


def summarize(
    samples: Dict[str, Dict[float, List[Dict[str, Any]]]],
    cross: Dict[float, List[Dict[str, Any]]],
    lams: Sequence[float],
    beta: float,
    max_tokens: int,
    length_range: Tuple[int, int],
) -> Dict[str, Any]:
    """``samples[method][lam]``: generate records; ``cross[lam]``: the ruler's records."""
    cells = [
        cell(m, lam, beta, samples[m][lam], cross.get(lam, []), max_tokens, length_range)
        for lam in lams
        for m in METHODS
        if samples[m].get(lam)
    ]
    ruler = [ruler_entry(lam, cross[lam]) for lam in lams if cross.get(lam)]
    return {"cells": cells, "ruler": ruler}


def write_outputs(out_dir: str, summary: Dict[str, Any]) -> None:
    """summary.json (everything) and summary.csv (one line per method and lam, no histogram)."""
    atomic_write(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
    rows = [{k: v for k, v in c.items() if k != "length_histogram"} for c in summary["cells"]]
    if not rows:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    atomic_write(os.path.join(out_dir, "summary.csv"), buf.getvalue())


def markdown_table(summary: Dict[str, Any]) -> str:
    """The table of docs/figure2.md: one line per lam and method."""
    ruler = {e["lam"]: e for e in summary["ruler"]}
    lines = [
        "| λ (β/λ) | method | mean reward (eq. 10) | mean length (tokens) | below / in / above the range | "
        "KL to reference | KL(retrained ‖ method) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in summary["cells"]:
        kl_r = (
            "0 (same model)"
            if c["lam"] == 1 or c["method"] == "retrained"
            else f"{c['kl_retrained_vs_method']:.3f} ± {c['kl_retrained_vs_method_stderr']:.3f}"
        )
        lines.append(
            f"| {c['lam']:g} ({c['kl_strength']:g}) | {c['method']} | {c['mean_reward']:.3f} ± "
            f"{c['mean_reward_stderr']:.3f} | {c['mean_length_tokens']:.1f} ± {c['mean_length_tokens_stderr']:.1f} | "
            f"{c['share_below_range']:.2f} / {c['share_in_range']:.2f} / {c['share_above_range']:.2f} | "
            f"{c['mean_kl_to_reference']:.3f} | {kl_r} |"
        )
    for lam, e in ruler.items():
        lines.append(
            f"\nλ = {lam:g}, along {e['n']} retrained samples: KL(retrained ‖ β = 0.1 model unchanged) "
            f"{e['kl_retrained_vs_aligned']:.3f}, KL(retrained ‖ reference) {e['kl_retrained_vs_reference']:.3f}"
        )
    return "\n".join(lines)
