"""lm-evaluation-harness's own CLI as a client of dera-serve, on small tasks written here.

Three tasks (local JSON data and task YAMLs): multiple choice (log-likelihoods of continuations),
generate_until, and loglikelihood_rolling (perplexity). Two of lm-eval's clients:

* ``--model gguf`` (its client for llama-cpp-python's server: ``echo`` + ``logprobs``): run against
  dera-serve at ``--lam 0`` and ``--lam 1`` and against ``python -m llama_cpp.server`` on the
  reference and the aligned GGUF. Every document's log-likelihood agrees within 1e-3 and every
  generation is equal. Why not exactly: both servers reuse the prompt prefix of the previous
  request (the choices of a question share their context), and dera-serve's prompt cache restores
  states, so a continuation's rows may be decoded in another batch shape than the other server's,
  which moves CPU logits by up to ~3e-4 (see tests/reference.py);
* ``--model local-completions`` with ``tokenizer_backend=remote`` (token-id prompts, the vLLM-shaped
  tokenizer routes) at a λ between, ``model=tiny@0.5``: every document's log-likelihood against
  plain Llamas blended in numpy on the tokens lm-eval's rules give (its ``_encode_pair``: trailing
  spaces of the context go to the continuation; context and whole text encoded without special
  tokens; an empty context is the end-of-text token), and generations against the greedy blend.
"""

from __future__ import annotations

import glob
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
from chat_driver import cli_env
from serve_driver import ServerProcess, free_port, pair_toml, tiny_pair

from dera_gguf import DeRaLlama

pytestmark = pytest.mark.skipif(shutil.which("lm_eval") is None, reason="needs lm-eval (the test extra)")

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
              'generation_kwargs:\n  until: ["\\n"]\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n'),
    "t_roll": ("roll", ROLL, 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
               "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"),
}  # fmt: skip


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    for name, (stem, rows, body) in TASKS.items():
        data = folder / f"{stem}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        (folder / f"{name}.yaml").write_text(head + body)
    return folder


@pytest.fixture(scope="module")
def dera(tmp_path_factory, paths):
    """dera-serve at --lam 0 and at --lam 1, with llama-cpp-python's server's default repeat penalty."""
    toml = pair_toml(tmp_path_factory.mktemp("pairs"), paths)
    servers = {}
    for lam in ("0", "1"):
        args = ["--pair", "tiny", "--lam", lam, "--n-ctx", "512", "--logprobs", "--max-tokens", str(MAX_TOKENS)]
        args += ["--repeat-penalty", "1.1"]
        log = tmp_path_factory.mktemp("log") / f"dera-{lam}.log"
        servers[lam] = ServerProcess(args, cli_env(toml), log)
    yield servers
    for server in servers.values():
        assert server.stop(signal.SIGTERM) == 0, server.log()


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


@pytest.mark.parametrize("lam", ["0", "1"])
def test_gguf_client_agrees_with_llama_cpp_pythons_server(tmp_path, tasks, dera, llama_cpp_servers, lam):
    ours = lm_eval(tmp_path, tasks, "gguf", f"base_url={dera[lam].url}", "t_mc,t_gen")
    theirs = lm_eval(tmp_path, tasks, "gguf", f"base_url={llama_cpp_servers[lam]}", "t_mc,t_gen")
    got, expected = loglikelihoods(ours["t_mc"]), loglikelihoods(theirs["t_mc"])
    assert len(got) == sum(len(d["choices"]) for d in MC)
    assert got == pytest.approx(expected, abs=ATOL)
    assert ours["t_gen"] == theirs["t_gen"] and any(r[0][0] for r in ours["t_gen"].values())


def encode(llm, text: str) -> list:
    """lm-eval's remote tokenizer's encode: no BOS, special-token texts parsed."""
    return list(llm.tokenize(text.encode(), add_bos=False, special=True)) if text else []


def pair_tokens(llm, context: str, continuation: str) -> tuple:
    """lm-eval's ``_encode_pair``: trailing spaces of the context move to the continuation."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, head = encode(llm, context + continuation), encode(llm, context)
    return head, whole[len(head) :]


def blended_loglikelihood(plains, lam: float, context: list, continuation: list) -> float:
    for m in plains:
        m.reset()
    tokens = context + continuation
    rows = R.log_softmax(R.blend(R.step_logits(plains, tokens), [1 - lam, lam]))
    return float(sum(rows[len(context) - 1 + i][t] for i, t in enumerate(continuation)))


def test_local_completions_with_the_remote_tokenizer_at_a_lam_between(tmp_path, tasks, dera, paths):
    lam = 0.5
    args = f"model=tiny@{lam},base_url={dera['1'].url}/v1/completions,tokenizer_backend=remote"
    args += f",max_gen_toks={MAX_TOKENS}"  # batches of two prompts per request:
    got = lm_eval(tmp_path, tasks, "local-completions", args, "t_mc,t_gen,t_roll", "--batch_size", "2")
    plains = [R.plain(paths[0], n_ctx=512), R.plain(paths[1], n_ctx=512)]
    prefix = [plains[0].token_bos()]  # lm-eval's prefix token with the remote tokenizer: BOS, else EOS
    expected_mc = []
    for doc in MC:
        for choice in doc["choices"]:
            head, tail = pair_tokens(plains[0], f"Question: {doc['question']}\nAnswer:", " " + choice)
            expected_mc.append(blended_loglikelihood(plains, lam, head, tail))
    assert loglikelihoods(got["t_mc"]) == pytest.approx(expected_mc, abs=ATOL)
    expected_roll = [blended_loglikelihood(plains, lam, prefix, encode(plains[0], d["text"])) for d in ROLL]
    assert loglikelihoods(got["t_roll"]) == pytest.approx(expected_roll, abs=ATOL)
    engine = DeRaLlama(str(paths[0]), str(paths[1]), n_ctx=512, verbose=False)  # the server's repeat penalty 1.1
    eos = plains[0].detokenize([plains[0].token_eos()], special=True).decode()
    for doc_id, doc in enumerate(GEN):
        prompt = encode(plains[0], doc["question"])
        settings = dict(temperature=0.0, repeat_penalty=1.1, max_tokens=MAX_TOKENS, stop=["\n", eos])
        expected = engine.create_completion(prompt, lam=lam, **settings)["choices"][0]["text"]
        assert got["t_gen"][doc_id][0][0] == expected
    assert any(got["t_gen"][d][0][0] for d in got["t_gen"])  # (an empty answer everywhere would prove little)


def test_local_chat_completions_generate_as_the_engine_does(tmp_path, tasks, dera, paths):
    lam = 1.5
    args = f"model=tiny@{lam},base_url={dera['1'].url}/v1/chat/completions,max_gen_toks={MAX_TOKENS}"
    got = lm_eval(tmp_path, tasks, "local-chat-completions", args, "t_gen", "--apply_chat_template")
    engine = DeRaLlama(str(paths[0]), str(paths[1]), n_ctx=512, verbose=False)
    for doc_id, doc in enumerate(GEN):
        messages = [{"role": "user", "content": doc["question"]}]
        settings = dict(temperature=0.0, repeat_penalty=1.1, max_tokens=MAX_TOKENS, stop=["\n"])
        expected = engine.create_chat_completion(messages, lam=lam, **settings)["choices"][0]["message"]["content"]
        assert got["t_gen"][doc_id][0][0] == expected
    assert any(got["t_gen"][d][0][0] for d in got["t_gen"])  # (an empty answer everywhere would prove little)
