"""``dera-eval harness --ray``: the tasks shared out to Ray workers, each running every λ of its tasks.

Every λ of a task costs about one λ's decoding on one worker (:mod:`.harness`), so the work splits by
task: worker k of n takes the tasks ``sorted(tasks)[k::n]``, loads the pair once, and runs the whole
sweep of its tasks into ``out_dir/shards/k-of-n`` (lm-eval's results and samples per λ, resumable as
a run of its own). The driver puts the shards' results together into ``out_dir``'s summary, plot
and best λ. The same ``--out`` with another number of workers is another sharding: its shards start
afresh (each shard checks its own settings).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Sequence

from .cluster import LOCAL, import_ray, ray_options
from .harness_run import HarnessResult, best_lams, harness, summarize, write_outputs
from .models import PairSpec


def harness_on_ray(
    spec: PairSpec,
    lams: Sequence[float],
    tasks: Sequence[str],
    out_dir: str,
    ray: Any = True,
    workers: Optional[int] = None,
    beta: Optional[float] = None,
    log: Callable[[str], None] = lambda line: None,
    **options: Any,
) -> HarnessResult:
    """:func:`~dera_gguf.eval.harness_run.harness` with the tasks shared out to Ray workers (see above);
    ``ray``: True / ``"local"`` (a runtime on this machine), ``"auto"`` or ``"ray://host:port"``."""
    settings = ray_options(ray, workers)
    api = import_ray()
    owned = not api.is_initialized()
    if owned:
        address = {} if settings.address == LOCAL else {"address": settings.address}
        api.init(include_dashboard=False, configure_logging=False, log_to_driver=True, **address)
    try:
        n, resources, spec = _plan(api, spec, settings.workers, len(tasks))
        shards = [sorted(tasks)[k::n] for k in range(n)]
        run = api.remote(_run_shard).options(**resources)
        log(f"ray: {n} worker(s), tasks {' | '.join(', '.join(s) for s in shards)}")
        folders = [os.path.join(out_dir, "shards", f"{k}-of-{n}") for k in range(n)]
        parts = api.get([run.remote(spec, lams, shard, folder, options) for shard, folder in zip(shards, folders)])
    finally:
        if owned:
            api.shutdown()
    result = HarnessResult(results=merge(parts))
    result.summary = summarize(result.results, beta)
    result.best = best_lams(result.results)
    os.makedirs(out_dir, exist_ok=True)
    write_outputs(out_dir, result, beta)
    return result


def _plan(api, spec: PairSpec, workers: Optional[int], n_tasks: int) -> tuple:
    """How many workers (at most one per task), each one's Ray resources, and the spec they load."""
    resources = api.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    if spec.n_gpu_layers != 0 and gpus > 0:
        return min(workers or gpus, n_tasks), {"num_gpus": 1, "num_cpus": 1}, spec
    threads = spec.n_threads or max(cpus // max(workers or 1, 1), 1)
    n = workers or max(cpus // threads, 1)
    return min(n, n_tasks), {"num_cpus": threads}, replace(spec, n_threads=threads)


def _run_shard(spec: PairSpec, lams, tasks: List[str], out_dir: str, options: dict) -> Dict[float, dict]:
    """One worker: the sweep of its tasks (lm-eval's results dict per λ)."""
    return harness(spec, lams, tasks, out_dir, **options).results


def merge(parts: Sequence[Dict[float, dict]]) -> Dict[float, dict]:
    """The shards' lm-eval results per λ as one: each per-task table of theirs put together."""
    merged: Dict[float, dict] = {}
    for part in parts:
        for lam, results in part.items():
            into = merged.setdefault(lam, {})
            for key, value in results.items():
                if isinstance(value, dict) and isinstance(into.get(key, {}), dict):
                    into.setdefault(key, {}).update(value)
                else:
                    into.setdefault(key, value)
    return merged
