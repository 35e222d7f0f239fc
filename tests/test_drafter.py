"""A small drafter (issue 23): draft_model_path= / --draft, a third model drafting for the pair to verify.

Outputs are checked against tests/reference.py (plain ``llama_cpp.Llama`` instances decoding one
token at a time, blended in numpy): greedy on cases whose top-2 margins are far above llama.cpp's
batch-shape drift (tests/drafting_cases.py), seeded sampling against llama.cpp's own sampler chain
on the reference's blend. ``Pace(timed=False)`` makes drafts whatever steps cost, so that they are
really made and verified; a drafter that is one of the pair's files passes often, another random
model seldom, and both leave the outputs exact.
"""

from __future__ import annotations

import functools
import json
import pickle
import subprocess
import sys

import llama_cpp
import pytest
import reference as R
from chat_driver import cli_env, run_cli
from drafting_cases import clear_greedy_case, repeated_prompt, weights_of
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
from test_chat import printable_vocab
from tiny_models import CHAT_TEMPLATE, tiny_vocab, write_tiny_llama, write_tiny_lora

from dera_gguf import DeRaError, DeRaLlama
from dera_gguf.speculation import costs
from dera_gguf.speculation.verify import Pace

N_CTX = 256
KW = dict(n_ctx=N_CTX, verbose=False, n_gpu_layers=R.N_GPU_LAYERS)


@pytest.fixture(scope="module")
def other_path(models_dir):
    """A random model with the pair's vocabulary but weights of its own: its drafts seldom pass."""
    return write_tiny_llama(models_dir / "other-drafter.gguf", seed=4)


@pytest.fixture(scope="module")
def reference_models(ref_path, aligned_path):
    return [R.plain(ref_path, n_ctx=N_CTX), R.plain(aligned_path, n_ctx=N_CTX)]


@functools.lru_cache(maxsize=None)
def greedy_cases(models: tuple, lam: float) -> tuple:
    return clear_greedy_case(list(models), weights_of(lam))


def drafting(llm: DeRaLlama) -> DeRaLlama:
    """Draft at every step the gate allows, however steps are timed (what a test sees must not depend
    on the machine's speed)."""
    llm.draft_model.pace = Pace(timed=False)
    return llm


def decoded(context) -> int:
    """Tokens llama.cpp has decoded in this context (its own counters)."""
    perf = llama_cpp.llama_perf_context(context.ctx.ctx)
    return perf.n_p_eval + perf.n_eval


def drafter_of(llm: DeRaLlama):
    return llm.draft_model.source.context


# lam 1: one model decodes and verifies, as in llama.cpp's own speculative decoding
CASES = [(d, lam) for d in ("aligned", "reference", "other") for lam in (1.5, -0.5)] + [("aligned", 1.0)]


@pytest.mark.parametrize("drafter,lam", CASES)
def test_greedy_tokens_with_a_drafter_are_the_blends(
    ref_path, aligned_path, other_path, reference_models, drafter, lam
):
    prompt, expected = greedy_cases(tuple(reference_models), lam)
    path = {"aligned": aligned_path, "reference": ref_path, "other": other_path}[drafter]
    llm = drafting(DeRaLlama(str(ref_path), str(aligned_path), lam=lam, draft_model_path=str(path), **KW))
    assert R.generated(llm, prompt, len(expected)) == expected
    stats = llm.speculation_stats
    assert stats.verifications > 0 and stats.drafted > 0
    if (drafter, lam) in (("aligned", 1.5), ("reference", -0.5), ("aligned", 1.0)):  # the largest weight's model
        assert stats.accepted > 0
    # Its cache follows the text: each position is decoded once, plus the drafted tokens that failed
    # (without that, every draft would decode the whole text again).
    assert decoded(drafter_of(llm)) <= len(prompt) + len(expected) + stats.drafted


def test_seeded_sampling_with_a_drafter_is_llama_cpp_chain_on_the_blend(ref_path, aligned_path, reference_models):
    lam, n = 1.5, 24
    settings = dict(temp=0.3, top_k=50, top_p=0.95, min_p=0.05, typical_p=1.0, repeat_penalty=1.0)
    prompt = repeated_prompt(reference_models[0].n_vocab(), seed=1)
    llm = drafting(DeRaLlama(str(ref_path), str(aligned_path), lam=lam, draft_model_path=str(aligned_path), **KW))
    llm.set_seed(1234)
    got = R.generated(llm, prompt, n, **settings)
    assert llm.speculation_stats.accepted > 0
    assert got == R.sampled(reference_models, weights_of(lam), prompt, n, 1234, **settings)


def test_speculative_model_with_a_draft_file_means_the_file(ref_path, aligned_path, other_path):
    llm = DeRaLlama(str(ref_path), str(aligned_path), speculative="model", draft_model_path=str(other_path), **KW)
    assert llm.draft_model.source.kind == f"drafter {other_path}"
    assert drafter_of(llm) not in llm.runtime.contexts  # a context of its own, not one of the pair's


def test_a_fresh_engine_times_its_drafter_steps_as_their_own_kind_and_does_not_draft_yet(ref_path, aligned_path):
    """Conservative start: a fresh process has measured nothing, so nothing is drafted in a short reply;
    the steps are timed under a key that names the drafter's file."""
    costs.forget()
    llm = DeRaLlama(str(ref_path), str(aligned_path), lam=1.5, draft_model_path=str(aligned_path), **KW)
    at_start = decoded(drafter_of(llm))
    R.generated(llm, [1, 5, 6, 7], 30)
    assert llm.speculation_stats.verifications == 0
    kinds = [key for key in costs.measured() if key[1] == f"drafter {aligned_path}"]
    assert kinds and costs.measured()[kinds[0]].measured(1) > 0
    assert decoded(drafter_of(llm)) == at_start  # no draft made: the drafter decoded nothing


def test_a_pickled_engine_keeps_its_drafter(ref_path, aligned_path, other_path):
    llm = DeRaLlama(str(ref_path), str(aligned_path), lam=1.5, draft_model_path=str(other_path), **KW)
    twin = pickle.loads(pickle.dumps(llm))
    assert twin.draft_model.source.kind == f"drafter {other_path}"


# --------------------------------------------------------------- refused


# (a drafter whose vocabulary fails llama.cpp's rule: tests/test_draft_vocab.py)


def test_other_bad_drafters_are_refused(ref_path, aligned_path, models_dir, tmp_path):
    with pytest.raises(DeRaError, match="draft model not found"):
        DeRaLlama(str(ref_path), str(aligned_path), draft_model_path=str(tmp_path / "absent.gguf"), **KW)
    adapter = write_tiny_lora(models_dir / "drafter-adapter.gguf", seed=6)
    with pytest.raises(DeRaError, match="is a LoRA adapter"):
        DeRaLlama(str(ref_path), str(aligned_path), draft_model_path=str(adapter), **KW)
    for other in (dict(speculative="lookup"), dict(draft_model=LlamaPromptLookupDecoding())):
        with pytest.raises(DeRaError, match="names another source of drafts"):
            DeRaLlama(str(ref_path), str(aligned_path), draft_model_path=str(aligned_path), **other, **KW)


# --------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def chat_pair(tmp_path_factory):
    """The pair with printable tokens, as tests/test_chat.py writes it (valid UTF-8 answers)."""
    folder = tmp_path_factory.mktemp("drafter_chat")
    return [
        write_tiny_llama(folder / f"{name}.gguf", seed=s, vocab=printable_vocab()) for name, s in [("r", 1), ("a", 2)]
    ]


def test_dera_chat_draft_flag_answers_the_blend(chat_pair):
    """dera-chat --draft: the JSON completion is the greedy blend of plain models (as without drafts)."""
    (ref_path, aligned_path), lam, question = chat_pair, 1.5, "please write about the rain"
    args = ["--ref", str(ref_path), "--aligned", str(aligned_path), "--n-ctx", "256", "--lam", str(lam)]
    more = ["--draft", str(aligned_path), "--json", "--prompt", question, "--temperature", "0", "--max-tokens", "16"]
    result = run_cli([*args, *more], cli_env())
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    models, n = [R.plain(ref_path), R.plain(aligned_path)], out["usage"]["completion_tokens"]
    text = Jinja2ChatFormatter(template=CHAT_TEMPLATE, eos_token="</s>", bos_token="<s>")(
        messages=[{"role": "user", "content": question}]
    )
    prompt = models[0].tokenize(text.prompt.encode(), add_bos=not text.added_special, special=True)
    tokens, _ = R.greedy(models, weights_of(lam), prompt, n)
    expected = models[0].detokenize(tokens, prev_tokens=prompt).decode("utf-8", errors="ignore")
    assert out["choices"][0]["message"]["content"] == expected


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_the_draft_flag_reaches_the_engine(ref_path, aligned_path, models_dir, command):
    """--draft with another vocabulary is refused by the engine's check, named, with exit status 1;
    beside --speculative lookup it is refused by flag name."""
    vocab = tiny_vocab()
    vocab.tokens[300] = "\u2581renamed"
    bad = write_tiny_llama(models_dir / "drafter-cli.gguf", seed=7, vocab=vocab)
    args = ["--ref", str(ref_path), "--aligned", str(aligned_path), "--n-ctx", "256"]
    module = f"dera_gguf.cli.{command}"
    run = lambda *more: subprocess.run(
        [sys.executable, "-m", module, *args, *more, *(["--prompt", "hi"] if command == "chat" else ["--port", "0"])],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    result = run("--draft", str(bad))
    assert result.returncode == 1 and f"the draft model {bad}" in result.stderr, result.stderr
    result = run("--draft", str(aligned_path), "--speculative", "lookup")
    assert result.returncode == 1 and "--draft drafts from" in result.stderr, result.stderr
    result = run("--draft", str(aligned_path), "--no-draft")
    assert result.returncode == 1 and "give --draft FILE or --no-draft, not both" in result.stderr, result.stderr
