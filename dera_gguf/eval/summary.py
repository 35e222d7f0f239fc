"""Per-λ summaries: means with standard errors, summary.json / summary.csv, the best λ."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from ..errors import DeRaError
from .store import atomic_write

# summary metric -> (per-record field it averages, whether higher is better)
SCORE_METRICS = {
    "pairwise_accuracy": ("correct", True),
    "mean_logprob_chosen": ("logprob_chosen", True),
    "mean_logprob_rejected": ("logprob_rejected", False),
    "mean_kl_to_reference": ("kl_chosen", False),
}
GENERATE_METRICS = {
    "mean_reward": ("reward", True),
    "mean_length_tokens": ("length_tokens", None),
    "mean_kl_to_reference": ("kl_mean", False),
    "mean_kl_sum": ("kl_sum", False),
}


def mean_stderr(values: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    """Mean and standard error of the mean (sample std / sqrt(n)); None where undefined."""
    n = len(values)
    if n == 0:
        return None, None
    mean = math.fsum(values) / n
    if n == 1:
        return mean, None
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


Counts = Mapping[str, Callable[[Mapping[str, Any]], bool]]  # name -> which records it counts


def summarize(
    records: Sequence[Mapping[str, Any]],
    lams: Sequence[float],
    metrics: Mapping[str, tuple],
    counts: Optional[Counts] = None,
) -> List[Dict[str, Any]]:
    """One object per λ: ``lam``, ``n``, each count and each metric with ``<metric>_stderr``; a metric
    averages the records that have its field (a judge's grade is missing where it failed)."""
    by_lam: Dict[float, List[Mapping[str, Any]]] = {float(lam): [] for lam in lams}
    for r in records:
        if float(r["lam"]) in by_lam:
            by_lam[float(r["lam"])].append(r)
    out = []
    for lam in lams:
        group = by_lam[float(lam)]
        entry: Dict[str, Any] = {"lam": float(lam), "n": len(group)}
        for name, counted in (counts or {}).items():
            entry[name] = sum(1 for r in group if counted(r))
        for name, (field, _) in metrics.items():
            values = [float(r[field]) for r in group if r.get(field) is not None]
            entry[name], entry[f"{name}_stderr"] = mean_stderr(values)
        out.append(entry)
    return out


def summarize_by_category(
    records: Sequence[Mapping[str, Any]],
    lams: Sequence[float],
    metrics: Mapping[str, tuple],
    counts: Optional[Counts] = None,
) -> List[Dict[str, Any]]:
    """One object per (category, λ), as :func:`summarize`, for rows with a ``category`` (those without one
    under ``"(none)"``); empty when no record has a category."""
    if not any(r.get("category") is not None for r in records):
        return []
    categories = sorted({r.get("category") or "(none)" for r in records})
    out = []
    for category in categories:
        mine = [r for r in records if (r.get("category") or "(none)") == category]
        out += [{"category": category, **entry} for entry in summarize(mine, lams, metrics, counts)]
    return out


def write_summary(out_dir: str, summary: List[Dict[str, Any]], name: str = "summary") -> None:
    """NAME.json and NAME.csv (summary.json, summary.csv), each replaced atomically."""
    atomic_write(os.path.join(out_dir, f"{name}.json"), json.dumps(summary, indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(summary[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in summary)
    atomic_write(os.path.join(out_dir, f"{name}.csv"), buf.getvalue())


def best_lam(
    summary: Sequence[Mapping[str, Any]], metric: str, metrics: Mapping[str, tuple], maximize: Optional[bool] = None
) -> Optional[Mapping[str, Any]]:
    """The summary entry with the best ``metric`` (its natural direction unless ``maximize`` says)."""
    if metric not in metrics:
        raise DeRaError(f"unknown metric {metric!r}: choose one of {', '.join(metrics)}")
    if maximize is None:
        maximize = metrics[metric][1]
        if maximize is None:
            raise DeRaError(f"{metric} has no better direction: say --maximize or --minimize")
    scored = [e for e in summary if e.get(metric) is not None]
    if not scored:
        return None
    pick = max if maximize else min
    return pick(scored, key=lambda e: e[metric])
