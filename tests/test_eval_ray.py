"""dera-eval sharded over Ray workers: the same results as one process, resume, killed workers, Ctrl-C.

One local Ray runtime (2 CPUs) serves the whole module: starting one is slow on a small machine.
The reference for every ``--ray`` run is the same sweep in one process (whose own results the
other eval tests check against plain llama_cpp.Llama).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from chat_driver import default_sigint
from click.testing import CliRunner
from eval_fixtures import write_jsonl

ray = pytest.importorskip("ray")

from dera_gguf.cli.eval import main  # noqa: E402
from dera_gguf.eval import SamplingParams, generate, load_reward, score  # noqa: E402
from dera_gguf.eval.cluster import RayOptions  # noqa: E402
from dera_gguf.eval.models import PairSpec  # noqa: E402

LAMS = "0,0.5,1,2"
PREFS = [
    {
        "prompt": f"question {i}: tell me about the cat",
        "chosen": " the cat is short" * (1 + i % 3),
        "rejected": " a dog",
    }
    for i in range(12)
]
PROMPTS = [{"prompt": f"write a short answer {i}:"} for i in range(8)]


@pytest.fixture(scope="module", autouse=True)
def ray_runtime():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()
    assert not worker_processes(timeout=10)


def worker_processes(timeout: float = 0.0):
    """Live processes of this module's Ray workers (their title is ``ray::RowWorker...``)."""
    deadline = time.time() + timeout
    while True:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.info["cmdline"] and p.info["cmdline"][0].startswith("ray::RowWorker"):
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        if not found or time.time() >= deadline:
            return found
        time.sleep(0.2)


def models(ref_path, aligned_path):
    return ["--ref", str(ref_path), "--aligned", str(aligned_path), "--n-ctx", "256", "--threads", "1"]


def spec(ref_path, aligned_path):
    return PairSpec.check(str(ref_path), str(aligned_path), n_ctx=256, n_threads=1)


def records(path):
    """A results file's records, in a fixed order (workers finish rows in any order)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted(rows, key=lambda r: (r["line"], r["lam"], r["sample"]))


@pytest.fixture(scope="module")
def score_reference(ref_path, aligned_path, tmp_path_factory):
    """The score sweep in one process, through the CLI: (data file, output folder)."""
    tmp = tmp_path_factory.mktemp("score-ref")
    data = write_jsonl(tmp / "prefs.jsonl", PREFS + ["{broken"])
    out = tmp / "out"
    args = ["score", *models(ref_path, aligned_path), "--data", data, "--lams", LAMS, "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return data, out


def test_score_with_ray_writes_the_summary_of_one_process(ref_path, aligned_path, score_reference, tmp_path):
    data, reference = score_reference
    out = tmp_path / "out"
    args = ["score", *models(ref_path, aligned_path), "--data", data, "--lams", LAMS, "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--ray", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert (out / "summary.json").read_text() == (reference / "summary.json").read_text()
    assert (out / "summary.csv").read_text() == (reference / "summary.csv").read_text()
    assert records(out / "results.jsonl") == records(reference / "results.jsonl")
    assert "line 13" in result.output  # the bad row, reported as in one process
    loaded = [line.split(" loaded")[0] for line in result.output.splitlines() if "loaded the pair" in line]
    assert 1 <= len(loaded) == len(set(loaded)) <= 2  # each worker's loading shown once (if done in time)
    assert not worker_processes(timeout=10)  # the sweep's workers are gone with it


def test_generate_with_ray_equals_one_process(ref_path, aligned_path, tmp_path, monkeypatch):
    # a reward module on the driver's path only (as `--reward my_rewards:count_a` run from its folder)
    (tmp_path / "my_rewards_ray.py").write_text("def count_a(prompt, response):\n    return response.count('a')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = load_reward("my_rewards_ray:count_a")
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    params = SamplingParams(temperature=0.7, max_tokens=8)
    pair = spec(ref_path, aligned_path)
    kwargs = dict(params=params, seed=5, samples=2, reward=reward)
    one = generate(pair, data, [0, 1, 2], out_dir=str(tmp_path / "one"), **kwargs)
    lines = []
    sharded = generate(
        pair, data, [0, 1, 2], out_dir=str(tmp_path / "ray"), ray=True, workers=2, log=lines.append, **kwargs
    )
    assert sharded.computed == one.computed == len(PROMPTS) * 3 * 2
    assert sharded.records == one.records
    assert (tmp_path / "ray" / "summary.json").read_text() == (tmp_path / "one" / "summary.json").read_text()
    assert len({r["response"] for r in one.records}) > 3  # samples differ: the test can tell seeds apart
    assert 1 <= len(lines) == len(set(lines)) <= 2
    assert any(r["reward"] > 0 for r in one.records)


def test_resume_across_runs_with_and_without_ray(ref_path, aligned_path, score_reference, tmp_path):
    data, reference = score_reference
    pair, lams = spec(ref_path, aligned_path), [0, 0.5, 1, 2]
    out = str(tmp_path / "out")
    first = score(pair, data, lams, out_dir=out, limit=3)  # one process
    second = score(pair, data, lams, out_dir=out, limit=7, ray=True, workers=2)
    assert (first.computed, second.reused, second.computed) == (12, 12, 16)
    third = score(pair, data, lams, out_dir=out)  # one process again finishes it
    assert (third.reused, third.computed) == (28, 20)
    assert (tmp_path / "out" / "summary.json").read_text() == (reference / "summary.json").read_text()


def kill_a_busy_worker(when: int):
    """A progress callback that SIGKILLs a worker computing a row once ``when`` rows are done.

    Rows are quick: at a given callback both workers may be between rows, so it watches for a
    while (the workers go on with the rows already sent them while the driver waits here)."""
    killed = []

    def progress(label, done, total):
        deadline = time.time() + 2
        while done >= when and not killed and time.time() < deadline:
            busy = [p for p in worker_processes() if ".run" in p.info["cmdline"][0]]
            if busy:
                os.kill(busy[0].pid, signal.SIGKILL)
                killed.append(busy[0].pid)
            else:
                time.sleep(0.01)

    return progress, killed


def test_a_killed_worker_costs_only_its_rows(ref_path, aligned_path, score_reference, tmp_path):
    data, reference = score_reference
    progress, killed = kill_a_busy_worker(when=2)
    lines = []
    result = score(
        spec(ref_path, aligned_path), data, [0, 0.5, 1, 2], out_dir=str(tmp_path / "out"),
        progress=progress, ray=True, workers=2, log=lines.append,
    )  # fmt: skip
    assert killed and any("died" in line for line in lines), lines
    print("\n".join(lines))
    assert result.computed == len(PREFS) * 4 and len(result.skipped) == 1  # only the bad input row
    assert (tmp_path / "out" / "summary.json").read_text() == (reference / "summary.json").read_text()


def test_a_row_failing_on_every_try_is_skipped_with_its_line_then_resumed(
    ref_path, aligned_path, score_reference, tmp_path
):
    data, reference = score_reference
    pair, out = spec(ref_path, aligned_path), str(tmp_path / "out")
    progress, killed = kill_a_busy_worker(when=2)
    result = score(pair, data, [0, 0.5, 1, 2], out_dir=out, progress=progress, ray=RayOptions(workers=2, max_tries=1))
    assert killed
    failed = [b for b in result.skipped if "failed on 1 tries" in b.reason]
    assert len(failed) == 1 and 1 <= failed[0].line <= len(PREFS)
    assert "worker" in str(failed[0]) and str(failed[0]).startswith(f"line {failed[0].line}:")
    again = score(pair, data, [0, 0.5, 1, 2], out_dir=out)  # a re-run computes just that row
    assert again.computed == 4
    assert (tmp_path / "out" / "summary.json").read_text() == (reference / "summary.json").read_text()


def test_ctrl_c_on_a_cluster_driver_loses_nothing_and_leaves_no_worker(
    ref_path, aligned_path, score_reference, tmp_path
):
    """A dera-eval process joins this module's runtime (--ray auto); SIGINT stops it mid-sweep."""
    _, reference = score_reference
    rows = PREFS * 40  # 480 rows: far from done when interrupted
    data = write_jsonl(tmp_path / "prefs.jsonl", [dict(r, prompt=f"{i}: {r['prompt']}") for i, r in enumerate(rows)])
    out = tmp_path / "out"
    args = ["score", *models(ref_path, aligned_path), "--data", data, "--lams", "0,1", "--out", str(out)]
    command = [sys.executable, "-m", "dera_gguf.cli.eval", *args, "--ray", "auto", "--workers", "2", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
    results = out / "results.jsonl"
    deadline = time.time() + 240  # (a loaded machine starts Ray's workers slowly)
    while time.time() < deadline and (not results.exists() or len(results.read_bytes().splitlines()) < 20):
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]  # the driver must still run
        time.sleep(0.1)
    assert worker_processes(), "the sweep's workers are running"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert not worker_processes(timeout=15), err.decode()[-2000:]
    written = results.read_text().splitlines()
    assert 20 <= len(written) < 2 * len(rows) and (out / "summary.json").exists()
    again = score(spec(ref_path, aligned_path), data, [0, 1], out_dir=str(out), limit=30)
    assert again.reused == sum(json.loads(line)["line"] <= 30 for line in written)
    assert again.reused + again.computed == 60
