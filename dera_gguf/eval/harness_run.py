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
import time
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
    see the module docstring for what ``out_dir`` receives. ``beta``: the pair's KL strength, for β/λ.

    The tasks are loaded once (lm-eval's ``TaskManager``), then each λ is one call of lm-eval's
    ``evaluate`` (its request building and grouping, few-shot prompts, metrics), with lm-eval's
    request cache around the model: what ``simple_evaluate`` does per call, without re-reading the
    tasks and the environment for every λ."""
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
    loaded = _load_tasks(manager, tasks, num_fewshot)
    opened = isinstance(pair, PairSpec)
    pair = EvalPair.from_spec(pair) if opened else pair
    sweep = SweepModels(pair, lams)
    about = _about(sweep, batch_size, limit)
    result = HarnessResult()
    try:
        for i, lam in enumerate(lams):
            done = _finished(out_dir, lam)
            if done is not None:
                log(f"λ {format_lam(lam)}: already done ({done})")
                result.results[lam] = _read(done)
                continue
            log(f"λ {format_lam(lam)}: evaluating {', '.join(tasks)}")
            results = _evaluate(sweep.at(i), loaded, out_dir, lam, limit, apply_chat_template, about)
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


def _load_tasks(manager, tasks: Sequence[str], num_fewshot: Optional[int]) -> dict:
    """lm-eval's tasks, with the few-shot count asked for (where a task does not fix 0), as simple_evaluate sets it."""
    loaded = manager.load(list(tasks))
    for task in loaded["tasks"].values():
        if num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
    return loaded


def _about(sweep: SweepModels, batch_size: int, limit: Optional[float]) -> dict:
    """What lm-eval's results file says of the run besides the results (read once for every λ)."""
    from lm_eval.loggers.utils import add_env_info

    about = {"config": {"model": "dera-gguf", "model_args": sweep.name, "batch_size": batch_size, "limit": limit}}
    add_env_info(about)  # (no git hash: lm-eval would read the current folder's, not dera-gguf's)
    return about


def _evaluate(lm, loaded: dict, out_dir: Optional[str], lam: float, limit, apply_chat_template: bool, about: dict):
    """One λ: lm-eval's evaluate on ``lm`` (behind its request cache), its results and samples saved."""
    import random

    import numpy as np
    from lm_eval.api.model import CachingLM
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED
    from lm_eval.evaluator import evaluate

    random.seed(DEFAULT_RANDOM_SEED)  # as simple_evaluate seeds every run: the same few-shot picks at every λ
    np.random.seed(DEFAULT_OTHER_SEED)
    for task in loaded["tasks"].values():
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    model = lm
    if out_dir is not None:
        model = CachingLM(lm, os.path.join(out_dir, "cache", f"lam-{format_lam(lam)}") + ".db")
    tracker = _tracker(out_dir, lam)
    if tracker is not None:
        template = lm.chat_template(apply_chat_template) if apply_chat_template else None
        model_args = f"{about['config']['model_args']},lam={format_lam(lam)}"
        tracker.general_config_tracker.log_experiment_args("dera-gguf", model_args, None, template, False)
    started = time.time()
    results = evaluate(lm=model, task_dict=loaded, limit=limit, log_samples=out_dir is not None,
                       apply_chat_template=apply_chat_template)  # fmt: skip
    results.update(json.loads(json.dumps(about)))
    results["config"]["lam"] = lam
    results["date"] = started
    samples = results.pop("samples", None)
    if tracker is not None:
        tracker.save_results_aggregated(results=results, samples=samples)
        for task in results["configs"]:
            tracker.save_results_samples(task_name=task, samples=samples[task])
    return results


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
