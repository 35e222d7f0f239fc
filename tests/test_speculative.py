"""Speculative DeRa (issue 15): drafted tokens verified by the blend leave its tokens and distribution as they were.

The reference is tests/reference.py (plain ``llama_cpp.Llama`` instances decoding one token at a
time, blended in float64 numpy). llama.cpp's logits depend slightly on the batch shape, and a
verification batch is another shape than one token, so the greedy tests first measure that
drift on the test models and require the reference's top-2 margins to be far larger than it:
only then must the tokens be equal, and are.
"""

from __future__ import annotations

import functools

import llama_cpp
import numpy as np
import pytest
import reference as R
from drafting_cases import clear_greedy_case, repeated_prompt, weights_of
from hypothesis import given
from hypothesis import strategies as st
from llama_cpp.llama_speculative import LlamaDraftModel, LlamaPromptLookupDecoding
from scipy import stats

from dera_gguf import DeRaError, DeRaLlama
from dera_gguf.speculation.verify import Gate, NgramIndex, NgramLookup, Pace

N_CTX = 256
KW = dict(n_ctx=N_CTX, verbose=False, n_gpu_layers=R.N_GPU_LAYERS)


def drafting(llm: DeRaLlama) -> DeRaLlama:
    """Draft at every step the gate allows, however the steps are timed: what a test sees must not
    depend on the machine's speed."""
    llm.draft_model.pace = Pace(timed=False)
    return llm


@pytest.fixture(scope="module")
def reference_models(ref_path, aligned_path):
    return [R.plain(ref_path, n_ctx=N_CTX), R.plain(aligned_path, n_ctx=N_CTX)]


@functools.lru_cache(maxsize=None)
def greedy_cases(models: tuple, lam: float) -> tuple:
    """clear_greedy_case per lam, computed once for all kinds of draft."""
    return clear_greedy_case(list(models), weights_of(lam))


SPECULATIVE = {
    "lookup": lambda: "lookup",
    "model": lambda: "model",
    "llama-cpp-python draft_model": lambda: LlamaPromptLookupDecoding(max_ngram_size=2, num_pred_tokens=4),
}


# lam 1 and 0: one model decodes, and prompt lookup still drafts for it ("model" has nothing to draft with).
CASES = [(kind, lam) for kind in SPECULATIVE for lam in (1.5, 0.5, -0.5)] + [("lookup", 1.0), ("lookup", 0.0)]


@pytest.mark.parametrize("kind,lam", CASES)
def test_speculative_greedy_tokens_are_the_blends(ref_path, aligned_path, reference_models, kind, lam):
    prompt, expected = greedy_cases(tuple(reference_models), lam)
    llm = drafting(DeRaLlama(str(ref_path), str(aligned_path), lam=lam, speculative=SPECULATIVE[kind](), **KW))
    assert R.generated(llm, prompt, len(expected)) == expected
    assert llm.speculation_stats.verifications > 0
    assert llm.speculation_stats.accepted > 0  # drafted rows were sampled, not only the last token's


def decoded(context) -> int:
    """Tokens llama.cpp has decoded in this context (its own counters)."""
    perf = llama_cpp.llama_perf_context(context.ctx.ctx)
    return perf.n_p_eval + perf.n_eval


@pytest.mark.parametrize("lam", [1.5, -0.5])
def test_model_drafts_are_not_decoded_again_in_the_drafting_context(ref_path, aligned_path, reference_models, lam):
    """speculative="model": verification reuses the rows the drafting model computed while drafting, so
    it decodes each token once, as the other model does (without the reuse: each drafted token twice)."""
    prompt, expected = greedy_cases(tuple(reference_models), lam)
    llm = drafting(DeRaLlama(str(ref_path), str(aligned_path), lam=lam, speculative="model", **KW))
    reference, aligned = llm.runtime.contexts
    drafter, other = (aligned, reference) if lam > 0.5 else (reference, aligned)
    assert R.generated(llm, prompt, len(expected)) == expected
    stats = llm.speculation_stats
    assert stats.verifications > 5 and stats.accepted > 0
    assert decoded(drafter) == decoded(other)


def test_tokens_sent_into_generate_are_verified_like_drafts(ref_path, aligned_path, reference_models):
    """llama-cpp-python's generate() decodes what send() gives after the sampled token and samples every
    row of it, keeping sent tokens while they are what it samples: greedy output is the blend's whatever
    is sent (plain llama-cpp-python without logits_all reads rows it never asked for and aborts)."""
    prompt, expected = greedy_cases(tuple(reference_models), 1.5)
    llm = DeRaLlama(str(ref_path), str(aligned_path), lam=1.5, n_batch=8, **KW)
    gen = llm.generate(prompt, temp=0.0, top_k=1)
    got = [next(gen)]
    got.append(gen.send(expected[1:4]))  # right guesses: they pass
    got += [next(gen), next(gen)]
    got.append(gen.send([expected[5], 7, 7, 7]))  # one right, then wrong ones: dropped
    while len(got) < 20:
        got.append(next(gen))
    assert got == expected[:20]
    with pytest.raises(DeRaError, match="send fewer tokens"):
        gen.send(list(expected[21:30]))  # 10 rows to sample, a batch holds 8


def test_logits_all_rows_of_a_speculative_call_are_the_blends(ref_path, aligned_path, reference_models):
    """With logits_all, every row of every verification batch lands in scores (the echo / logprobs path)."""
    lam = 1.5
    prompt = repeated_prompt(reference_models[0].n_vocab(), seed=1)
    llm = drafting(DeRaLlama(str(ref_path), str(aligned_path), lam=lam, speculative="model", logits_all=True, **KW))
    got = R.generated(llm, prompt, 24)
    assert llm.speculation_stats.accepted > 0
    for m in reference_models:
        m.reset()
    rows = R.step_logits(reference_models, prompt + got[:-1])
    expected = R.blend(rows, weights_of(lam))
    scores = np.array(llm.scores[: len(prompt) + len(got) - 1], dtype=np.float64)
    np.testing.assert_allclose(R.log_softmax(scores), R.log_softmax(expected), atol=R.backend_atol(1e-3))


class FixedDraft(LlamaDraftModel):
    """Always drafts the same tokens: the most deterministic draft there is."""

    def __init__(self, tokens):
        self.tokens = np.array(tokens, dtype=np.intc)

    def __call__(self, input_ids, /, **kwargs):
        return self.tokens


def test_sampled_tokens_at_verified_rows_follow_the_blend(ref_path, aligned_path, reference_models):
    """The second sampled token comes from a verification row; its frequencies over many seeds must fit
    the blend's distribution of the second token, sum over t1 of p(t1) p(t2 | t1), from plain Llamas."""
    lam, n_draws = 1.5, 800
    prompt = repeated_prompt(reference_models[0].n_vocab(), seed=2)[:12]
    w = weights_of(lam)
    for m in reference_models:
        m.reset()
    p1 = np.exp(R.log_softmax(R.blend([r[-1] for r in R.step_logits(reference_models, prompt)], w)))
    marginal = np.zeros_like(p1)
    for t1 in np.flatnonzero(p1 > 1e-6):
        for m in reference_models:
            m.reset()
        rows = [r[-1] for r in R.step_logits(reference_models, prompt + [int(t1)])]
        marginal += p1[t1] * np.exp(R.log_softmax(R.blend(rows, w)))
    likely = int(np.argmax(marginal))
    llm = drafting(DeRaLlama(str(ref_path), str(aligned_path), lam=lam, speculative=FixedDraft([likely, likely]), **KW))
    counts = np.zeros_like(marginal)
    for seed in range(n_draws):
        llm.set_seed(seed)
        tokens = llm.generate(prompt, temp=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
        next(tokens)
        counts[next(tokens)] += 1
        tokens.close()
    assert llm.speculation_stats.verifications >= n_draws  # every second token came from a verification row
    assert counts[likely] > 0  # and the drafted token passed at times
    big = marginal * n_draws >= 5  # chi-square cells: the tail pooled into one
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(marginal[big], marginal[~big].sum()) * n_draws
    assert stats.chisquare(observed, expected / expected.sum() * observed.sum()).pvalue > 1e-3


@given(st.lists(st.integers(0, 3), min_size=2, max_size=30), st.integers(1, 6), st.integers(1, 3))
def test_lookup_drafts_follow_the_latest_longest_earlier_ngram(ids, n, min_ngram):
    """Brute force: for n-gram sizes 4 down to min_ngram, the latest earlier occurrence of the text's last n-gram;
    a one-token match drafts at most 2 tokens. Both the scan (NgramLookup) and the index grown token by token."""
    expected = []
    for size in range(min(4, len(ids) - 1), min_ngram - 1, -1):
        starts = [j for j in range(len(ids) - size) if ids[j : j + size] == ids[-size:]]
        if starts:
            expected = ids[starts[-1] + size : starts[-1] + size + (n if size > 1 else min(n, 2))]
            break
    assert NgramLookup(min_ngram=min_ngram, max_ngram=4)(np.array(ids), n).tolist() == expected
    grown = NgramIndex(ids[:1], min_ngram=min_ngram, max_ngram=4)  # the same, kept up to date token by token
    for token in ids[1:]:
        grown = grown.fork()
        grown.extend([token])
    assert grown(n).tolist() == expected


@given(st.lists(st.integers(0, 2), min_size=2, max_size=60))
def test_a_lookup_drafts_kind_is_how_far_its_match_reaches_back(ids):
    """Brute force: m tokens matched (m < 4), or for a 4-token match at the latest earlier occurrence, 4, 8 or 16
    by whether the text's last 8 or 16 tokens also stand before that occurrence."""
    kind = None
    for size in range(min(4, len(ids) - 1), 0, -1):
        starts = [j + size for j in range(len(ids) - size) if ids[j : j + size] == ids[-size:]]
        if starts:
            end = starts[-1]
            reach = [k for k in (16, 8) if end - k >= 0 and ids[end - k : end] == ids[-k:]]
            kind = f"lookup-{size if size < 4 else max(reach, default=4)}"
            break
    assert NgramLookup().propose(np.array(ids), 4)[1] == kind


@given(st.lists(st.tuples(st.lists(st.integers(0, 3), min_size=2, max_size=20), st.booleans()), min_size=1, max_size=6))
def test_one_lookup_asked_about_many_texts_answers_as_a_new_one_would(steps):
    """NgramLookup keeps an index of the last text and grows it while texts extend it: texts that extend the
    previous one (True) and texts that do not, asked of one lookup, must draft as a fresh lookup for each does."""
    lookup, text = NgramLookup(), []
    for tokens, extends in steps:
        text = text + tokens if extends else tokens
        assert lookup.propose(np.array(text), 4)[0].tolist() == NgramLookup().propose(np.array(text), 4)[0].tolist()
        assert lookup.propose(np.array(text), 4)[1] == NgramLookup().propose(np.array(text), 4)[1]


def test_gate_pauses_after_failed_drafts_and_grows_after_passed_ones():
    gate = Gate(max_draft=8, first_draft=4, patience=2, pause=8)
    assert gate.allows(10) == 4
    gate.record(10, drafted=4, accepted=4)
    assert gate.allows(15) == 8  # a draft that passed whole doubles
    gate.record(15, drafted=8, accepted=2)
    assert gate.allows(18) == 3  # one more than passed
    gate.record(18, drafted=3, accepted=0)
    gate.record(19, drafted=1, accepted=0)  # patience 2: drafting pauses for 8 tokens
    assert [gate.allows(p) for p in (19, 26, 27)] == [0, 0, 1]
    gate.record(27, drafted=1, accepted=0)
    gate.record(28, drafted=1, accepted=0)  # failing again: the pause doubles
    assert [gate.allows(p) for p in (43, 44)] == [0, 1]


def test_open_text_costs_few_verifications(ref_path, aligned_path):
    """Drafts that keep failing pause drafting: far fewer verifications than tokens."""

    class WrongDraft(LlamaDraftModel):
        def __call__(self, input_ids, /, **kwargs):
            return np.array([0, 0, 0], dtype=np.intc)  # token 0 is never sampled greedily here

    llm = DeRaLlama(str(ref_path), str(aligned_path), lam=1.5, speculative=WrongDraft(), **KW)
    n = 0
    for _ in llm.generate([1, 5, 6, 7], temp=0.0, top_k=1):
        n += 1
        if n == 120:
            break
    s = llm.speculation_stats
    assert s.accepted == 0 and s.verifications < n / 8


def test_a_call_between_generate_steps_leaves_the_generations_drafts_its_own(ref_path, aligned_path):
    """A completion at another lam between two steps of generate() (calls nest): the generation's next
    draft is still timed under its own realignment (at lam 1 only the aligned model decodes) and follows
    its own text, not the completion's (issue 30: nothing about a call kept on the engine)."""
    llm = DeRaLlama(str(ref_path), str(aligned_path), lam=1.0, speculative="lookup", **KW)
    speculation = llm.draft_model
    key, trail = speculation.key, speculation.trail
    seen = []  # (cost key, trail) at each draft
    speculation.key = lambda: seen.append((key(), trail())) or seen[-1][0]
    steps = llm.generate(repeated_prompt(llm.n_vocab()), temp=0.0, top_k=1)
    next(steps), next(steps)  # the second step drafts
    outer = seen[-1]
    llm.create_completion("hello world", max_tokens=4, temperature=0.0, lam=0.5)
    inner, resumed = seen[-1], len(seen)
    next(steps)
    after = seen[resumed]  # the generation's first draft after the completion
    steps.close()
    assert outer[0] != inner[0] and after[0] == outer[0]
    assert outer[1] is not None and inner[1] is not outer[1] and after[1] is outer[1]


@pytest.mark.parametrize("bad", ["lookahead", 3, True])
def test_an_unknown_speculative_value_is_refused(ref_path, aligned_path, bad):
    with pytest.raises(DeRaError, match="speculative must be one of lookup, model"):
        DeRaLlama(str(ref_path), str(aligned_path), speculative=bad, **KW)


def test_draft_model_keyword_is_llama_cpp_pythons_name_for_it(ref_path, aligned_path):
    draft = LlamaPromptLookupDecoding()
    llm = DeRaLlama(str(ref_path), str(aligned_path), lam=1.5, draft_model=draft, **KW)
    assert llm.speculation_stats is not None
    assert not llm._logits_all  # llama-cpp-python would keep every row of every decode
