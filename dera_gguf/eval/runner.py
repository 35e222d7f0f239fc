"""The loop both commands share: rows x λ with resume, progress, skipped rows, summaries.

A command supplies an ``execute`` that computes the λ values each row still lacks
(:mod:`.executors`: in this process, or on Ray workers); this module decides what is
left, writes results row by row as they arrive, and writes the summary (json, csv,
plot) at the end, and also when interrupted, from whatever was finished. A judge
(:class:`~.judges.judging.Judging`) is handed the samples as rows finish (and those of
earlier runs first), and its outcomes join the summary; rows with a ``category`` are
also summarized per category (summary_by_category.json / .csv).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from .data import BadRow, Dataset, Row
from .plot import plot_sweep
from .store import ResultStore, check_run_settings
from .summary import summarize, summarize_by_category, write_summary
from .tasks import Execute

KEY_FIELDS = ("row", "lam", "sample")  # what identifies one result record

# progress(label, rows_done, rows_total): called once before the first row and after every row.
Progress = Callable[[str, int, int], None]


@dataclass
class SweepResult:
    """What a sweep produced: the per-λ summary and every record behind it."""

    summary: List[Dict[str, Any]]
    records: List[Dict[str, Any]]
    skipped: List[BadRow] = field(default_factory=list)
    computed: int = 0  # records computed by this call
    reused: int = 0  # records found in --out from an earlier run
    out_dir: Optional[str] = None
    plot_message: Optional[str] = None
    by_category: List[Dict[str, Any]] = field(default_factory=list)  # per (category, λ), when rows have one
    judge_report: Optional[str] = None  # how the judging went (None: no judge)

    def skipped_report(self, n_listed: int = 0) -> str:
        """All skipped rows with line numbers; the first ``n_listed`` only counted (shown before)."""
        if not self.skipped:
            return ""
        head = f"skipped {len(self.skipped)} row(s)" + (
            f" ({n_listed} bad input row(s) listed above)" if n_listed else ""
        )
        return "\n".join([head + ":"] + [f"  {b}" for b in self.skipped[n_listed:]])


def run_sweep(
    data: Dataset,
    lams: Sequence[float],
    per_lam: int,
    metrics: Mapping[str, tuple],
    results_name: str,
    out_dir: Optional[str],
    settings: Dict[str, Any],
    progress: Optional[Progress],
    label: str,
    execute: Execute,
    judging=None,
) -> SweepResult:
    """Run ``execute`` on every row for the λ values it lacks; summarize all of them.

    Results are written as rows finish, in whatever order ``execute`` yields them; the
    summary does not depend on that order (exactly rounded sums). ``judging``: a
    :class:`~.judges.judging.Judging` that judges the samples as they come.
    """
    store = _open_store(out_dir, settings, results_name)
    result = SweepResult(summary=[], records=[], skipped=list(data.bad), out_dir=out_dir)
    todo = [(row, _missing(store, row, lams, per_lam)) for row in data.rows]
    result.reused = sum(len(lams) * per_lam - len(missing) * per_lam for _, missing in todo)
    pending = [(row, missing) for row, missing in todo if missing]
    if judging is not None:
        judging.open()
    try:
        report = progress or (lambda label, done, total: None)
        if judging is not None and store is not None:
            judging.submit(store.select(row.id for row in data.rows))
        done = len(todo) - len(pending)
        report(label, done, len(todo))
        for row, records, problem in execute(pending):
            if problem is not None:
                result.skipped.append(BadRow(row.line, problem))
            if store is not None:
                store.append(records)
            else:
                result.records.extend(records)
            if judging is not None:
                judging.submit(records)
            result.computed += len(records)
            done += 1
            report(label, done, len(todo))
        if judging is not None:
            judging.wait(progress)
    finally:  # Ctrl-C too: summarize what is finished
        if judging is not None:
            judging.close()
        _finish(result, store, data, lams, metrics, out_dir, judging)
    result.skipped[len(data.bad) :] = sorted(result.skipped[len(data.bad) :], key=lambda b: b.line)
    return result


def _open_store(out_dir, settings, results_name) -> Optional[ResultStore]:
    if out_dir is None:
        return None
    os.makedirs(out_dir, exist_ok=True)
    check_run_settings(out_dir, settings)
    return ResultStore(os.path.join(out_dir, results_name), KEY_FIELDS)


def _missing(store: Optional[ResultStore], row: Row, lams: Sequence[float], per_lam: int) -> List[float]:
    """The λ values this row still needs (a λ is done when all its ``per_lam`` samples are)."""
    if store is None:
        return list(lams)
    return [lam for lam in lams if not all(store.has(row.id, float(lam), s) for s in range(per_lam))]


def _finish(result: SweepResult, store, data: Dataset, lams, metrics, out_dir, judging=None) -> None:
    if store is not None:
        result.records = store.select(row.id for row in data.rows)
    # data order and the lams' order, whatever order rows finished in
    rows = {row.id: i for i, row in enumerate(data.rows)}
    lam_order = {float(lam): i for i, lam in enumerate(lams)}
    result.records.sort(key=lambda r: (rows.get(r["row"], len(rows)), lam_order.get(float(r["lam"]), -1), r["sample"]))
    counts = None
    if judging is not None:
        result.records = judging.annotate(result.records)
        metrics, counts = {**judging.judge.metrics(), **metrics}, judging.judge.counts()
        result.judge_report = judging.report()
    result.summary = summarize(result.records, lams, metrics, counts)
    result.by_category = summarize_by_category(result.records, lams, metrics, counts)
    if out_dir is not None and result.records:
        write_summary(out_dir, result.summary)
        if result.by_category:
            write_summary(out_dir, result.by_category, "summary_by_category")
        metric_names = [m for m in metrics if any(e[m] is not None for e in result.summary)]
        result.plot_message = plot_sweep(
            result.summary,
            metric_names,
            os.path.join(out_dir, "sweep.png"),
            columns=4,
            by_category=result.by_category,
        )
