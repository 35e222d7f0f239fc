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

import shutil
import signal

import pytest
import reference as R
from chat_driver import cli_env
from lm_eval_driver import (
    ATOL,
    GEN,
    MAX_TOKENS,
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
from serve_driver import ServerProcess, pair_toml

from dera_gguf import DeRaLlama

pytestmark = pytest.mark.skipif(shutil.which("lm_eval") is None, reason="needs lm-eval (the test extra)")
__all__ = ["llama_cpp_servers", "paths", "tasks"]  # fixtures of lm_eval_driver used here


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


@pytest.mark.parametrize("lam", ["0", "1"])
def test_gguf_client_agrees_with_llama_cpp_pythons_server(tmp_path, tasks, dera, llama_cpp_servers, lam):
    ours = lm_eval(tmp_path, tasks, "gguf", f"base_url={dera[lam].url}", "t_mc,t_gen")
    theirs = lm_eval(tmp_path, tasks, "gguf", f"base_url={llama_cpp_servers[lam]}", "t_mc,t_gen")
    got, expected = loglikelihoods(ours["t_mc"]), loglikelihoods(theirs["t_mc"])
    assert len(got) == sum(len(d["choices"]) for d in MC)
    assert got == pytest.approx(expected, abs=ATOL)
    assert ours["t_gen"] == theirs["t_gen"] and any(r[0][0] for r in ours["t_gen"].values())


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
