"""``dera-eval harness``: lm-evaluation-harness tasks over a λ sweep, in one run, resumable.

Every λ is evaluated by lm-eval itself (``simple_evaluate``: its tasks, few-shot building,
metrics and stderr), on :class:`~dera_gguf.eval.harness.SweepModels`, which answers each
request for every λ from one decode per model. Written into ``out_dir``:

* ``lam-<λ>/``: lm-eval's own results file and per-task samples for that λ (its
  ``EvaluationTracker``, so lm-eval's tooling reads them); a λ whose results are there is not
  run again, and ``cache/lam-<λ>`` (lm-eval's request cache) keeps what a killed run finished;
* ``summary.json`` / ``summary.csv``: one row per task, metric and λ (value, stderr, β/λ);
* ``sweep.png``: each task's main metric against λ (and β/λ where the pair's β is known);
* ``settings.json``: what the run was asked; a resumed run must ask the same.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..blend import format_lam
from ..errors import DeRaError
from .harness import SweepModels
from .models import EvalPair, PairSpec
from .plot import plot_sweep
from .store import atomic_write, check_run_settings

FIELDS = ["task", "metric", "lam", "beta_over_lam", "value", "stderr"]


@dataclass
class HarnessResult:
    """Per λ, lm-eval's results dict; the summary rows; the best λ of each task's main metric."""

    results: Dict[float, dict] = field(default_factory=dict)
    summary: List[Dict[str, Any]] = field(default_factory=list)
    best: Dict[str, tuple] = field(default_factory=dict)  # task -> (metric, λ, value)


def harness(
    pair,
    lams: Sequence[float],
    tasks: Sequence[str],
    out_dir: Optional[str] = None,
    num_fewshot: Optional[int] = None,
    limit: Optional[float] = None,
    include_path: Optional[str] = None,
    apply_chat_template: bool = False,
    batch_size: int = 1,
    beta: Optional[float] = None,
    log: Callable[[str], None] = lambda line: None,
) -> HarnessResult:
    """Run lm-eval ``tasks`` at every λ of ``lams`` on ``pair`` (an :class:`EvalPair` or a :class:`PairSpec`);
    see the module docstring for what ``out_dir`` receives. ``beta``: the pair's KL strength, for β/λ."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lams = [float(x) for x in lams]
    if not lams or not tasks:
        raise DeRaError("give at least one λ and one task")
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        check_run_settings(out_dir, _settings(pair, tasks, num_fewshot, limit, include_path, apply_chat_template))
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise DeRaError(f"lm-eval knows no task {unknown[0]!r}: check --tasks (and --include-path for your own)")
    opened = isinstance(pair, PairSpec)
    pair = EvalPair.from_spec(pair) if opened else pair
    sweep = SweepModels(pair, lams)
    result = HarnessResult()
    try:
        for i, lam in enumerate(lams):
            done = _finished(out_dir, lam)
            if done is not None:
                log(f"λ {format_lam(lam)}: already done ({done})")
                result.results[lam] = _read(done)
                continue
            log(f"λ {format_lam(lam)}: evaluating {', '.join(tasks)}")
            tracker = _tracker(out_dir, lam)
            results = simple_evaluate(
                model=sweep.at(i),
                tasks=list(tasks),
                num_fewshot=num_fewshot,
                limit=limit,
                batch_size=batch_size,
                task_manager=manager,
                apply_chat_template=apply_chat_template,
                use_cache=os.path.join(out_dir, "cache", f"lam-{format_lam(lam)}") if out_dir else None,
                log_samples=out_dir is not None,
                evaluation_tracker=tracker,
            )
            samples = results.pop("samples", None) if results else None
            if tracker is not None:
                tracker.save_results_aggregated(results=results, samples=samples)
                for task in results["configs"]:
                    tracker.save_results_samples(task_name=task, samples=samples[task])
            result.results[lam] = results
    finally:
        sweep.close()
        if opened:
            pair.close()
    result.summary = summarize(result.results, beta)
    result.best = best_lams(result.results)
    if out_dir is not None:
        write_outputs(out_dir, result, beta)
    return result


def _settings(pair, tasks, num_fewshot, limit, include_path, apply_chat_template) -> dict:
    files = pair.files
    return {
        "command": "harness",
        "reference": os.path.abspath(files.reference),
        "aligned": os.path.abspath(files.aligned[0]),
        "tasks": sorted(tasks),
        "num_fewshot": num_fewshot,
        "limit": limit,
        "include_path": os.path.abspath(include_path) if include_path else None,
        "apply_chat_template": bool(apply_chat_template),
    }


def _lam_dir(out_dir: str, lam: float) -> str:
    return os.path.join(out_dir, f"lam-{format_lam(lam)}")


def _finished(out_dir: Optional[str], lam: float) -> Optional[str]:
    """The results file lm-eval wrote for ``lam`` in an earlier run, if any."""
    if out_dir is None:
        return None
    found = sorted(glob.glob(os.path.join(_lam_dir(out_dir, lam), "**", "results_*.json"), recursive=True))
    return found[-1] if found else None


def _read(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _tracker(out_dir: Optional[str], lam: float):
    if out_dir is None:
        return None
    from lm_eval.loggers import EvaluationTracker

    return EvaluationTracker(output_path=_lam_dir(out_dir, lam))


# ------------------------------------------------------------------ summary


def _metrics(task_results: dict) -> Dict[str, tuple]:
    """``{"acc,none": (value, stderr)}`` of one task's results (lm-eval's keys, filter included)."""
    out = {}
    for key, value in task_results.items():
        if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
            continue
        metric, _, flt = key.partition(",")
        stderr = task_results.get(f"{metric}_stderr,{flt}")
        out[key] = (float(value), float(stderr) if isinstance(stderr, (int, float)) else None)
    return out


def summarize(results: Dict[float, dict], beta: Optional[float]) -> List[Dict[str, Any]]:
    """One row per task, metric and λ."""
    rows = []
    for lam in sorted(results):
        for task, task_results in sorted(results[lam].get("results", {}).items()):
            for metric, (value, stderr) in sorted(_metrics(task_results).items()):
                ratio = beta / lam if beta is not None and lam > 0 else None
                rows.append(dict(task=task, metric=metric, lam=lam, beta_over_lam=ratio, value=value, stderr=stderr))
    return rows


def best_lams(results: Dict[float, dict]) -> Dict[str, tuple]:
    """Each task's main metric (the first it reports) and the λ that does best on it, by lm-eval's
    ``higher_is_better``."""
    best: Dict[str, tuple] = {}
    for lam in sorted(results):
        for task, task_results in results[lam].get("results", {}).items():
            metrics = _metrics(task_results)
            if not metrics:
                continue
            key = best.get(task, (next(iter(metrics)),))[0]
            higher = results[lam].get("higher_is_better", {}).get(task, {}).get(key.partition(",")[0], True)
            value = metrics.get(key, (None,))[0]
            if value is None:
                continue
            if task not in best or (value > best[task][2] if higher else value < best[task][2]):
                best[task] = (key, lam, value)
    return best


def write_outputs(out_dir: str, result: HarnessResult, beta: Optional[float]) -> Optional[str]:
    """summary.json, summary.csv and sweep.png; returns why there is no plot, if there is none."""
    atomic_write(os.path.join(out_dir, "summary.json"), json.dumps(result.summary, indent=1) + "\n")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(result.summary)
    atomic_write(os.path.join(out_dir, "summary.csv"), text.getvalue())
    mains = [f"{task}/{metric}" for task, (metric, _, _) in sorted(result.best.items())]
    per_lam: Dict[float, Dict[str, Any]] = {}
    for row in result.summary:
        entry = per_lam.setdefault(row["lam"], {"lam": row["lam"]})
        entry[f"{row['task']}/{row['metric']}"] = row["value"]
        entry[f"{row['task']}/{row['metric']}_stderr"] = row["stderr"]
    points = [per_lam[lam] for lam in sorted(per_lam)]
    for point in points:
        for name in mains:
            point.setdefault(name, None)
            point.setdefault(f"{name}_stderr", None)
    return plot_sweep(points, mains, os.path.join(out_dir, "sweep.png"), beta=beta) if mains else None
