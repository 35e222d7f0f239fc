"""lm-evaluation-harness in the tests: small tasks written here (local JSON data and task YAMLs), lm-eval's CLI
run and its per-document samples read back, llama-cpp-python's own server as a reference, and the
log-likelihoods lm-eval's rules ask for, computed from plain Llamas blended in numpy.

Three tasks: multiple choice (log-likelihoods of continuations), generate_until, and
loglikelihood_rolling (perplexity).
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import reference as R
from serve_driver import free_port, tiny_pair

MAX_TOKENS = 16  # llama-cpp-python's server's default answer length, which lm-eval's gguf client leaves as is
ATOL = 1e-3

MC = [
    {"question": "What color is the sky on a clear day?", "choices": ["blue", "green", "red"], "answer": 0},
    {"question": "How many legs does a cat have?", "choices": ["two", "four", "six"], "answer": 1},
    {"question": "Which one is a fruit?", "choices": ["stone", "apple", "chair"], "answer": 1},
]
GEN = [{"question": "The capital of France is", "answer": " Paris"}, {"question": "One, two,", "answer": " three"}]
ROLL = [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "A rainbow is an arc of colours."}]

TASKS = {
    "t_mc": ("mc", MC, 'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
             'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n'),
    "t_gen": ("gen", GEN, 'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
              'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 16\n  do_sample: false\n'
              'metric_list:\n  - metric: exact_match\n'),
    "t_roll": ("roll", ROLL, 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
               "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"),
}  # fmt: skip


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("models"))


def write_tasks(folder: Path, tasks: dict = TASKS) -> Path:
    """Each task's data (JSONL) and YAML in ``folder`` (lm-eval's ``--include_path``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (stem, rows, body) in tasks.items():
        data = folder / f"{stem}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        (folder / f"{name}.yaml").write_text(head + body)
    return folder


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def llama_cpp_servers(tmp_path_factory, paths):
    """llama-cpp-python's own server on the reference (lam 0) and on the aligned model (lam 1)."""
    procs = {}
    for lam, path in (("0", paths[0]), ("1", paths[1])):
        port = free_port()
        log = open(tmp_path_factory.mktemp("log") / f"llama-cpp-{lam}.log", "w")
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--n_ctx", "512"]
        command += ["--logits_all", "true", "--verbose", "false", "--host", "127.0.0.1", "--port", str(port)]
        procs[lam] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), f"http://127.0.0.1:{port}")
    for proc, url in procs.values():
        _wait(proc, url)
    yield {lam: url for lam, (_, url) in procs.items()}
    for proc, _ in procs.values():
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def _wait(proc, url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"llama_cpp.server exited with {proc.returncode}"
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"llama_cpp.server at {url} did not start")


def lm_eval(tmp_path: Path, tasks: Path, model: str, model_args: str, names: str, *more: str) -> dict:
    """Run lm-eval's CLI; each task's samples by doc id."""
    out = tmp_path / f"out-{model}-{abs(hash(model_args))}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "ds"))
    command = ["lm_eval", "run", "--model", model, "--model_args", model_args, "--tasks", names]
    command += ["--include_path", str(tasks), "--log_samples", "--output_path", str(out), *more]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    samples = {}
    for name in names.split(","):
        (path,) = glob.glob(str(out / "**" / f"samples_{name}_*.jsonl"), recursive=True)
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        samples[name] = {r["doc_id"]: r["resps"] for r in rows}
    return samples


def loglikelihoods(samples: dict) -> list:
    """Every (document, choice) log-likelihood of a multiple-choice or rolling task's samples."""
    values = []
    for doc in sorted(samples):
        for resp in samples[doc]:
            first = resp[0]
            values.append(float(first[0] if isinstance(first, (list, tuple)) else first))
    return values


def encode(llm, text: str, bos: bool = False) -> list:
    """lm-eval's remote tokenizer's encode (no BOS), special-token texts parsed; with ``bos``, as the model
    adds it (a GGUF model's own rule)."""
    return list(llm.tokenize(text.encode(), add_bos=bos, special=True)) if text else []


def pair_tokens(llm, context: str, continuation: str, bos: bool = False) -> tuple:
    """lm-eval's ``_encode_pair``: trailing spaces of the context move to the continuation."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, head = encode(llm, context + continuation, bos), encode(llm, context, bos)
    return head, whole[len(head) :]


def blended_loglikelihood(plains, lam: float, context: list, continuation: list) -> float:
    for m in plains:
        m.reset()
    tokens = context + continuation
    rows = R.log_softmax(R.blend(R.step_logits(plains, tokens), [1 - lam, lam]))
    return float(sum(rows[len(context) - 1 + i][t] for i, t in enumerate(continuation)))
