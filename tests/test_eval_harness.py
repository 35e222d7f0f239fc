"""dera-eval harness: lm-evaluation-harness tasks over a λ sweep, against independent computations.

At λ 0 and 1 every document's log-likelihood agrees with llama-cpp-python's own server on the
reference and the aligned GGUF (independent code: its echoed log-probs of the same tokens) within
1e-3 (both reuse a shared context's cached prefix, so a continuation's rows may be decoded in
another batch shape: CPU logits move by up to ~3e-4, tests/reference.py). Not through lm-eval's
``gguf`` client: it finds the continuation by character offsets, and with a tokenizer that adds a
space prefix (SentencePiece: Llama 2, Mistral, these test models) every offset is one character
late, so it counts the context's last token into the continuation (shown below). At every λ, the
log-likelihoods, the rolling log-likelihoods and the greedy generations equal plain Llamas
blended in numpy. The command writes lm-eval's own results per λ, the summary, the plot, and
resumes a killed run without redoing a finished λ.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import reference as R
from chat_driver import ROOT, cli_env
from lm_eval_driver import (
    ATOL,
    GEN,
    MC,
    ROLL,
    blended_loglikelihood,
    encode,
    llama_cpp_servers,
    lm_eval,
    loglikelihoods,
    pair_tokens,
    paths,
    tasks,
)
from serve_driver import pair_toml

pytestmark = pytest.mark.skipif(shutil.which("lm_eval") is None, reason="needs lm-eval (the test extra)")
__all__ = ["llama_cpp_servers", "paths", "tasks"]  # fixtures of lm_eval_driver used here

LAMS = [0.0, 0.5, 1.0, 1.5]
NAMES = "t_mc,t_gen,t_roll"


def offline_env(tmp: Path) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp / "ds"))


def run_harness(tmp: Path, paths, tasks, out: Path, lams=LAMS, **popen) -> subprocess.CompletedProcess:
    args = ["--ref", str(paths[0]), "--aligned", str(paths[1]), "--n-ctx", "512", "--tasks", NAMES]
    args += ["--include-path", str(tasks), "--lams", ",".join(str(x) for x in lams), "--out", str(out)]
    env = {**cli_env(), **offline_env(tmp)}
    command = [sys.executable, "-m", "dera_gguf.cli.eval", "harness", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT, **popen)


def samples_of(out: Path, lam: float, task: str) -> dict:
    """lm-eval's samples file of ``task`` at ``lam``: each document's responses."""
    (path,) = sorted((out / f"lam-{lam:g}").rglob(f"samples_{task}_*.jsonl"))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["doc_id"]: r["resps"] for r in rows}


@pytest.fixture(scope="module")
def swept(tmp_path_factory, paths, tasks):
    out = tmp_path_factory.mktemp("harness") / "run"
    done = run_harness(out.parent, paths, tasks, out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


@pytest.fixture(scope="module")
def plains(paths):
    return [R.plain(paths[0], n_ctx=512), R.plain(paths[1], n_ctx=512)]


def server_loglikelihood(url: str, context: str, continuation: str, n_continuation: int) -> float:
    """The log-likelihood llama-cpp-python's server gives the last ``n_continuation`` tokens of
    context + continuation (its echoed log-probs; the last entry is the token it generated)."""
    body = dict(prompt=context + continuation, echo=True, logprobs=1, max_tokens=1, temperature=0)
    logprobs = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    return float(sum(logprobs["token_logprobs"][-(n_continuation + 1) : -1]))


@pytest.mark.parametrize("lam", ["0", "1"])
def test_log_likelihoods_at_0_and_1_are_llama_cpp_pythons_servers(swept, plains, llama_cpp_servers, lam):
    out, _ = swept
    expected = []
    for doc in MC:
        for choice in doc["choices"]:
            context = f"Question: {doc['question']}\nAnswer:"
            _, tail = pair_tokens(plains[0], context, " " + choice, bos=True)
            expected.append(server_loglikelihood(llama_cpp_servers[lam], context, " " + choice, len(tail)))
    got = loglikelihoods(samples_of(out, float(lam), "t_mc"))
    assert len(got) == sum(len(d["choices"]) for d in MC)
    assert got == pytest.approx(expected, abs=ATOL)


def test_lm_evals_gguf_client_counts_a_context_token_with_a_space_prefix_tokenizer(
    tmp_path, swept, plains, llama_cpp_servers, tasks
):
    """Why the test above asks the server directly: through lm-eval's gguf client, each choice's
    figure is the harness's plus the log-prob of the context's last token (":")."""
    out, _ = swept
    theirs = loglikelihoods(lm_eval(tmp_path, tasks, "gguf", f"base_url={llama_cpp_servers['1']}", "t_mc")["t_mc"])
    shifted = []
    for doc in MC:
        for choice in doc["choices"]:
            context = f"Question: {doc['question']}\nAnswer:"
            _, tail = pair_tokens(plains[0], context, " " + choice, bos=True)
            shifted.append(server_loglikelihood(llama_cpp_servers["1"], context, " " + choice, len(tail) + 1))
    assert theirs == pytest.approx(shifted, abs=ATOL)
    assert loglikelihoods(samples_of(out, 1.0, "t_mc")) != pytest.approx(theirs, abs=0.5)


@pytest.mark.parametrize("lam", LAMS)
def test_every_lam_is_the_numpy_blend(swept, plains, lam):
    out, _ = swept
    ref = plains[0]
    expected = []
    for doc in MC:
        for choice in doc["choices"]:
            head, tail = pair_tokens(ref, f"Question: {doc['question']}\nAnswer:", " " + choice, bos=True)
            expected.append(blended_loglikelihood(plains, lam, head, tail))
    assert loglikelihoods(samples_of(out, lam, "t_mc")) == pytest.approx(expected, abs=ATOL)
    rolling = [blended_loglikelihood(plains, lam, [ref.token_bos()], encode(ref, d["text"])) for d in ROLL]
    assert loglikelihoods(samples_of(out, lam, "t_roll")) == pytest.approx(rolling, abs=ATOL)
    generated = samples_of(out, lam, "t_gen")
    for doc_id, doc in enumerate(GEN):
        prompt = encode(ref, doc["question"], bos=True)
        tokens, _ = R.greedy(plains, [1 - lam, lam], prompt, 16, stop=[2, 4])
        text = ref.detokenize([t for t in tokens if t not in (2, 4)], prev_tokens=prompt).decode(errors="ignore")
        assert generated[doc_id][0][0] == text.split("\n")[0]


def test_the_run_writes_lm_evals_results_the_summary_and_the_plot(swept):
    out, done = swept
    for lam in LAMS:
        (results,) = sorted((out / f"lam-{lam:g}").rglob("results_*.json"))
        assert set(json.loads(results.read_text())["results"]) == set(NAMES.split(","))
    summary = json.loads((out / "summary.json").read_text())
    assert {(r["task"], r["lam"]) for r in summary} == {(t, lam) for t in NAMES.split(",") for lam in LAMS}
    assert (out / "summary.csv").read_text().startswith("task,metric,lam")
    assert (out / "sweep.png").stat().st_size > 0
    assert "best lam for t_mc by acc,none" in done.stdout


def test_a_killed_run_resumes_without_redoing_a_finished_lam(tmp_path, paths, tasks, swept):
    """Killed once the first λ's results are written: the rerun says it is done and only runs the rest;
    its figures equal an uninterrupted run's."""
    out = tmp_path / "run"
    args = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**cli_env(), **offline_env(tmp_path)}
    command = [sys.executable, "-m", "dera_gguf.cli.eval", "harness", "--ref", str(paths[0]), "--aligned"]
    command += [str(paths[1]), "--n-ctx", "512", "--tasks", NAMES, "--include-path", str(tasks)]
    command += ["--lams", ",".join(str(x) for x in LAMS), "--out", str(out)]
    proc = subprocess.Popen(command, env=env, cwd=ROOT, **args)
    deadline = time.monotonic() + 300
    while not list((out / "lam-0").rglob("results_*.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    again = run_harness(tmp_path, paths, tasks, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "λ 0: already done" in again.stderr
    unbroken = json.loads((swept[0] / "summary.json").read_text())
    resumed = json.loads((out / "summary.json").read_text())
    assert [(r["task"], r["metric"], r["lam"]) for r in resumed] == [
        (r["task"], r["metric"], r["lam"]) for r in unbroken
    ]
    assert [r["value"] for r in resumed] == pytest.approx([r["value"] for r in unbroken], abs=ATOL)


def test_an_unknown_task_is_a_clear_error(tmp_path, paths, tasks):
    toml = pair_toml(tmp_path, paths)
    env = {**cli_env(toml), **offline_env(tmp_path)}
    command = [sys.executable, "-m", "dera_gguf.cli.eval", "harness", "--pair", "tiny", "--n-ctx", "512"]
    unknown = subprocess.run(
        [*command, "--tasks", "no_such_task", "--include-path", str(tasks), "--out", str(tmp_path / "o")],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert unknown.returncode != 0 and "no_such_task" in unknown.stderr and "Traceback" not in unknown.stderr


def test_tasks_shared_out_to_ray_workers_give_the_one_process_figures(tmp_path, paths, tasks, swept):
    """--ray --workers 2 on a local Ray runtime: each worker runs every λ of its tasks; the summary equals
    the one-process run's, and each shard keeps lm-eval's own results per λ."""
    pytest.importorskip("ray")
    out = tmp_path / "ray-run"
    args = ["--ref", str(paths[0]), "--aligned", str(paths[1]), "--n-ctx", "512", "--tasks", NAMES, "--threads", "1"]
    args += ["--include-path", str(tasks), "--lams", ",".join(str(x) for x in LAMS), "--out", str(out)]
    env = {**cli_env(), **offline_env(tmp_path), "RAY_ADDRESS": ""}
    command = [sys.executable, "-m", "dera_gguf.cli.eval", "harness", *args, "--ray", "--workers", "2"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    key = lambda r: (r["task"], r["metric"], r["lam"])
    alone = sorted(json.loads((swept[0] / "summary.json").read_text()), key=key)
    shared = sorted(json.loads((out / "summary.json").read_text()), key=key)
    assert [key(r) for r in shared] == [key(r) for r in alone]
    assert [r["value"] for r in shared] == pytest.approx([r["value"] for r in alone], abs=ATOL)
    shards = sorted(p.name for p in (out / "shards").iterdir())
    assert shards == ["0-of-2", "1-of-2"] and all(list((out / "shards" / s).rglob("results_*.json")) for s in shards)
