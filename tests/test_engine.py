"""DeRaLlama against plain llama_cpp.Llama instances blended in numpy (tests/reference.py)."""

from __future__ import annotations

import os

import llama_cpp
import numpy as np
import pytest
import reference as R
from llama_cpp import LlamaGrammar, llama_chat_format

from dera_gguf import DeRaLlama, Stopped

PROMPT = "hello world, tell me about the cat"
LAMS = [-0.5, 0.0, 0.3, 1.0, 1.5, 3.0]


def dera(ref_path, aligned, lam=1.0, **kw) -> DeRaLlama:
    kw.setdefault("n_ctx", 256)
    kw.setdefault("verbose", False)
    kw.setdefault("n_gpu_layers", R.N_GPU_LAYERS)
    return DeRaLlama(str(ref_path), aligned, lam=lam, **kw)


@pytest.fixture(scope="module")
def pair(ref_path, aligned_path):
    return R.plain(ref_path), R.plain(aligned_path)


@pytest.fixture(scope="module")
def engine(ref_path, aligned_path):
    return dera(ref_path, str(aligned_path), logits_all=True)


def prompt_tokens(llm) -> list[int]:
    return llm.tokenize(PROMPT.encode(), add_bos=True, special=True)


@pytest.mark.parametrize("lam", LAMS)
def test_greedy_tokens_are_the_argmax_of_the_blend(engine, pair, lam):
    prompt = prompt_tokens(engine)
    expected, _ = R.greedy(pair, [1 - lam, lam], prompt, 12)
    engine.lam = lam
    assert R.generated(engine, prompt, len(expected)) == expected


@pytest.mark.parametrize("lam", [-0.5, 0.7, 2.0])
def test_logprobs_are_the_log_softmax_of_the_blend(engine, pair, lam):
    out = engine.create_completion(PROMPT, max_tokens=8, temperature=0.0, logprobs=3, lam=lam)
    lp = out["choices"][0]["logprobs"]
    tokens, logits = R.greedy(pair, [1 - lam, lam], prompt_tokens(engine), len(lp["token_logprobs"]))
    expected = [R.log_softmax(z) for z in logits]
    for i, (token, row) in enumerate(zip(tokens, expected)):
        assert lp["token_logprobs"][i] == pytest.approx(row[token], abs=R.LOGPROB_ATOL)
        # top_logprobs is keyed by token text, and byte tokens share the text "": compare values
        best = np.sort(row)[::-1][:4]
        for value in lp["top_logprobs"][i].values():
            assert np.min(np.abs(best - value)) < R.LOGPROB_ATOL


@pytest.mark.parametrize("lam,which", [(0.0, 0), (1.0, 1)])
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, top_k=50, top_p=0.95, seed=7)])
def test_lam_0_and_1_equal_plain_llama(ref_path, aligned_path, lam, which, sampling):
    plain = R.plain([ref_path, aligned_path][which], logits_all=False)
    llm = dera(ref_path, str(aligned_path), lam=lam)
    expected = plain.create_completion(PROMPT, max_tokens=24, **sampling)["choices"][0]["text"]
    assert llm.create_completion(PROMPT, max_tokens=24, **sampling)["choices"][0]["text"] == expected
    messages = [{"role": "user", "content": "tell me about the dog"}]
    expected = plain.create_chat_completion(messages, max_tokens=16, **sampling)["choices"][0]["message"]
    assert llm.create_chat_completion(messages, max_tokens=16, **sampling)["choices"][0]["message"] == expected


def test_only_one_model_decodes_at_lam_0_and_1(ref_path, aligned_path):
    llm = dera(ref_path, str(aligned_path), lam=1.0)
    ref_ctx, aligned_ctx = (m.ctx.ctx for m in llm.runtime.contexts)
    decoded = lambda ctx: (lambda d: d.n_p_eval + d.n_eval)(llama_cpp.llama_perf_context(ctx))
    at_start = decoded(ref_ctx)
    llm.create_completion(PROMPT, max_tokens=10, temperature=0.0)
    assert decoded(ref_ctx) == at_start and decoded(aligned_ctx) > 0
    before = decoded(aligned_ctx)
    llm.create_completion(PROMPT, max_tokens=10, temperature=0.0, lam=0.0)
    assert decoded(aligned_ctx) == before and decoded(ref_ctx) > at_start


@pytest.mark.parametrize("lam", [0.5, 2.0])
def test_seeded_sampling_is_llama_cpp_chain_on_the_blend(ref_path, aligned_path, pair, lam):
    settings = dict(temp=0.9, top_k=50, top_p=0.95, min_p=0.05, typical_p=1.0, repeat_penalty=1.0)
    llm = dera(ref_path, str(aligned_path), lam=lam)
    prompt = prompt_tokens(llm)
    llm.set_seed(1234)
    got = R.generated(llm, prompt, 12, **settings)
    assert got == R.sampled(pair, [1 - lam, lam], prompt, 12, 1234, **settings)


def test_seeded_sampling_is_reproducible(ref_path, aligned_path):
    llm = dera(ref_path, str(aligned_path), lam=1.5)
    run = lambda seed: llm.create_completion(PROMPT, max_tokens=20, temperature=1.0, seed=seed)["choices"][0]["text"]
    first = run(11)
    assert run(11) == first
    assert any(run(s) != first for s in (12, 13, 14))


@pytest.mark.parametrize("lam", [0.6, 1.8])
def test_streaming_equals_non_streaming(ref_path, aligned_path, lam):
    # An ASCII grammar: llama-cpp-python itself assembles split multi-byte characters
    # differently when streaming, and random tiny models emit many byte tokens.
    ascii_only = LlamaGrammar.from_string("root ::= [a-z ,.]+", verbose=False)
    llm = dera(ref_path, str(aligned_path))
    kw = dict(max_tokens=20, temperature=0.8, seed=3, lam=lam, grammar=ascii_only)
    whole = llm.create_completion(PROMPT, **kw)["choices"][0]["text"]
    streamed = "".join(c["choices"][0]["text"] for c in llm.create_completion(PROMPT, stream=True, **kw))
    assert streamed == whole and len(whole) > 5
    messages = [{"role": "user", "content": "write a short answer"}]
    whole = llm.create_chat_completion(messages, **kw)["choices"][0]["message"]["content"]
    chunks = llm.create_chat_completion(messages, stream=True, **kw)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole


@pytest.mark.parametrize("lam", [-1.0, 0.5, 2.5])
def test_grammar_constrains_the_blend(ref_path, aligned_path, lam):
    llm = dera(ref_path, str(aligned_path))
    yes_no = LlamaGrammar.from_string('root ::= "yes" | "no"', verbose=False)
    for seed in range(4):
        out = llm.create_completion(PROMPT, max_tokens=8, temperature=1.0, seed=seed, lam=lam, grammar=yes_no)
        assert out["choices"][0]["text"] in ("yes", "no")


def test_stream_keeps_its_lam_while_other_defaults_change(ref_path, aligned_path):
    llm = dera(ref_path, str(aligned_path), lam=0.0)
    kw = dict(max_tokens=16, temperature=0.0)
    expected = llm.create_completion(PROMPT, lam=2.0, **kw)["choices"][0]["text"]
    chunks = llm.create_completion(PROMPT, stream=True, lam=2.0, **kw)
    llm.lam = -1.0  # changing the default mid-stream must not leak into the stream
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected


def test_several_aligned_models(ref_path, aligned_path, aligned2_path):
    lams = [0.7, 0.6]
    llm = dera(ref_path, [str(aligned_path), str(aligned2_path)], lam=lams)
    models = [R.plain(ref_path), R.plain(aligned_path), R.plain(aligned2_path)]
    prompt = prompt_tokens(llm)
    expected, _ = R.greedy(models, [1 - sum(lams), *lams], prompt, 10)
    assert R.generated(llm, prompt, len(expected), temp=0.0) == expected
    # Weight zero on the reference: it must not decode at all.
    llm.create_completion(PROMPT, max_tokens=4, temperature=0.0, lam=[0.5, 0.5])


def test_prefix_reuse_across_turns_and_lam_changes(ref_path, aligned_path, pair):
    """A growing chat decodes only new tokens, and stays exact when lam changes between turns."""
    llm = dera(ref_path, str(aligned_path))
    ctxs = [m.ctx.ctx for m in llm.runtime.contexts]
    decoded = lambda: [(lambda d: d.n_p_eval + d.n_eval)(llama_cpp.llama_perf_context(c)) for c in ctxs]
    history = [{"role": "user", "content": "hello, write about the sun"}]
    held: list[int] = []  # tokens every context holds after the previous turn
    for turn, lam in enumerate([1.5, 1.5, 0.5, 1.0, 2.0]):
        before = decoded()
        out = llm.create_chat_completion(history, max_tokens=6, temperature=0.0, lam=lam)
        answer = out["choices"][0]["message"]["content"]
        n_new = out["usage"]["completion_tokens"]
        # Independent: greedy on the blend over the whole rendered prompt.
        rendered = _render(llm, history)
        tokens, _ = R.greedy(pair, [1 - lam, lam], rendered, n_new)
        assert llm.detokenize(tokens).decode(errors="ignore").startswith(answer)
        if turn == 1:  # same lam, grown history: only the tokens after the shared prefix are decoded
            shared = next((i for i, (a, b) in enumerate(zip(held, rendered)) if a != b), min(len(held), len(rendered)))
            assert shared > len(rendered) // 2
            for after, was in zip(decoded(), before):
                assert after - was <= len(rendered) - shared + n_new
        held = rendered + tokens[:-1]
        history += [{"role": "assistant", "content": answer}, {"role": "user", "content": f"more {turn}"}]


def _render(llm, messages) -> list[int]:
    """The prompt tokens as llama-cpp-python's own Jinja2 chat formatter makes them."""
    formatter = llama_chat_format.Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"], eos_token="</s>", bos_token="<s>"
    )
    result = formatter(messages=messages)
    return llm.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True)


def test_small_batches_and_echoed_prompt_logprobs(ref_path, aligned_path, pair):
    """Prompts longer than n_batch decode in chunks; every echoed prompt row is the blend too."""
    lam = 1.7
    llm = dera(ref_path, str(aligned_path), lam=lam, n_batch=4, n_ubatch=4, logits_all=True)
    out = llm.create_completion(PROMPT, max_tokens=3, temperature=0.0, logprobs=1, echo=True)
    prompt = prompt_tokens(llm)
    for m in pair:
        m.reset()
    rows = R.blend(R.step_logits(pair, prompt), [1 - lam, lam])
    expected = [R.log_softmax(rows[i - 1])[t] for i, t in enumerate(prompt) if i > 0]
    got = out["choices"][0]["logprobs"]["token_logprobs"][: len(expected)]
    assert got[0] is None  # the OpenAI convention for the first echoed token
    assert got[1:] == pytest.approx(expected[1:], abs=R.LOGPROB_ATOL)


def test_pickle_round_trip(ref_path, aligned_path):
    import pickle

    llm = dera(ref_path, str(aligned_path), lam=0.4)
    clone = pickle.loads(pickle.dumps(llm))
    assert clone.lam == 0.4
    kw = dict(max_tokens=8, temperature=0.0)
    assert (
        clone.create_completion(PROMPT, **kw)["choices"][0]["text"]
        == llm.create_completion(PROMPT, **kw)["choices"][0]["text"]
    )


@pytest.mark.parametrize("lam", [1.5, [0.7, 0.6]])
def test_concurrent_and_sequential_decoding_give_the_same_logits(ref_path, aligned_path, aligned2_path, lam):
    """Decoding the contexts at the same time (each on its share of the threads) changes only the wall time."""
    aligned = str(aligned_path) if not isinstance(lam, list) else [str(aligned_path), str(aligned2_path)]
    runs = []
    for concurrent in (True, False):
        llm = dera(ref_path, aligned, lam=lam, logits_all=True, n_threads=2, concurrent=concurrent)
        out = llm.create_completion(PROMPT, max_tokens=8, temperature=0.0, logprobs=2, echo=True)
        runs.append((out["choices"][0]["text"], llm.scores[: llm.n_tokens].copy()))
    assert runs[0][0] == runs[1][0]
    assert np.array_equal(runs[0][1], runs[1][1])


def test_physical_cores_counts_cores_not_hyperthreads():
    from dera_gguf.runtime.threads import _cpuinfo_cores, physical_cores

    two_packages_ht = "".join(
        f"processor : {i}\nphysical id : {i // 4}\ncore id : {(i // 2) % 2}\n\n" for i in range(8)
    )
    assert _cpuinfo_cores(two_packages_ht) == 4  # 8 logical CPUs: 2 packages x 2 cores x 2 threads
    assert _cpuinfo_cores("processor : 0\n") == 0
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)


def test_a_stopped_call_raises_and_leaves_the_engine_exact(ref_path, aligned_path, pair):
    """DeRaLlama.stopping: the 6th decode of a call is refused with Stopped; the next call's greedy
    tokens are still the blend's (plain Llamas in numpy)."""
    llm = dera(ref_path, str(aligned_path), lam=1.5)
    asked = []
    with llm.stopping(lambda: len(asked.append(1) or asked) > 5):
        with pytest.raises(Stopped):
            llm.create_completion(PROMPT, max_tokens=50, temperature=0.0, logit_bias={llm.token_eos(): -100.0})
    assert len(asked) == 6
    prompt = prompt_tokens(llm)
    expected, _ = R.greedy(pair, [-0.5, 1.5], prompt, 8)
    assert R.generated(llm, prompt, len(expected)) == expected


def test_stopping_scopes_nest(ref_path, aligned_path):
    """Leaving an inner stopping() scope brings back the outer scope's check."""
    llm = dera(ref_path, str(aligned_path), lam=1.5)
    with llm.stopping(lambda: True):
        with llm.stopping(lambda: False):
            assert llm.create_completion(PROMPT, max_tokens=2, temperature=0.0)["choices"]
        with pytest.raises(Stopped):
            llm.create_completion(PROMPT, max_tokens=2, temperature=0.0)
    assert llm.create_completion(PROMPT, max_tokens=2, temperature=0.0)["choices"]


def test_a_lone_eval_at_lam_0_is_sampled_where_its_row_lies_and_the_llama_keeps_its_context(
    ref_path, aligned_path, pair
):
    """eval() then sample() by hand (llama-cpp-python's low-level way): at lam 0 the row lies in the
    reference's context; sample() draws it from there while the Llama's own context stays its own
    (a logits processor looks during the draw)."""
    llm = dera(ref_path, str(aligned_path), lam=0.0)
    prompt = prompt_tokens(llm)
    expected, _ = R.greedy(pair, [1.0, 0.0], prompt, 1)
    own, during = llm._ctx, []

    def look(ids, logits):
        during.append(llm._ctx)
        return logits

    llm.eval(prompt)
    token = llm.sample(temp=0.0, top_k=1, logits_processor=llama_cpp.LogitsProcessorList([look]))
    assert token == expected[0] and len(during) == 1 and during[0] is own and llm._ctx is own


def test_a_long_prompt_stops_between_its_batches_and_the_next_call_is_exact(ref_path, aligned_path, pair):
    """Stopped before the 4th batch of 8 prompt tokens: both contexts hold the 24 decoded (read from
    llama.cpp), and generating from the same prompt afterwards gives the blend's greedy tokens."""
    llm = dera(ref_path, str(aligned_path), lam=1.5, n_batch=8)
    prompt = prompt_tokens(llm) * 5
    assert len(prompt) > 32
    asked = []
    with llm.stopping(lambda: len(asked.append(1) or asked) > 3):
        with pytest.raises(Stopped):
            next(llm.generate(prompt, temp=0.0, top_k=1))
    assert [c.extent() for c in llm.runtime.contexts] == [24, 24]
    expected, _ = R.greedy(pair, [-0.5, 1.5], prompt, 6)
    assert R.generated(llm, prompt, len(expected)) == expected
