"""dera_gguf.batch.together: several answers to one prompt decoded together, against plain Llamas blended in numpy.

The answers run on a DeRaLlama's loaded weights and context settings (as dera-serve runs
them); the expected tokens come from separate plain ``llama_cpp.Llama`` instances, one per
model, blended in numpy (tests/reference.py), on prompts whose top-2 margins are far
above llama.cpp's measured batch-shape drift (tests/drafting_cases.py).
"""

from __future__ import annotations

import llama_cpp
import pytest
import reference as R
from drafting_cases import clear_greedy_cases, weights_of

from dera_gguf import DeRaLlama
from dera_gguf.batch.sequence import Sequence as Choice
from dera_gguf.batch.together import decode_together
from dera_gguf.blend import mixing_weights
from dera_gguf.errors import ContextFullError
from dera_gguf.runtime.pair import PairRuntime
from dera_gguf.sampling.chains import new_chain
from dera_gguf.sampling.settings import Sampling

LAMS = [0.0, 0.5, 1.0, 1.5, -0.5]


@pytest.fixture(scope="module")
def llm(ref_path, aligned_path):
    engine = DeRaLlama(str(ref_path), str(aligned_path), n_ctx=256, n_threads=1, verbose=False)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def plain_pair(ref_path, aligned_path):
    return tuple(R.plain(p, n_threads=1, n_threads_batch=1) for p in (ref_path, aligned_path))


def runtime_of(llm, n_seq: int, n_ctx: int = 512):
    return PairRuntime.for_sequences(llm.runtime.models, llm.context_params, n_ctx, n_seq, llm.runtime.threads)


def decode_choices(runtime, prompt, choices, max_tokens, is_eog):
    """Several choices of one prompt, each of up to ``max_tokens`` tokens."""
    for choice in choices:
        choice.max_tokens = max_tokens
    return decode_together(runtime, prompt, choices, is_eog)


def is_eog(llm):
    return lambda t: bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, t))


def until_eog(llm, tokens):
    ends = [i for i, t in enumerate(tokens) if is_eog(llm)(t)]
    return tokens[: ends[0]] if ends else tokens


def test_greedy_choices_are_each_lams_blend(llm, plain_pair):
    n = 24
    prompt, expected = clear_greedy_cases(list(plain_pair), [weights_of(lam) for lam in LAMS], n)
    greedy = Sampling(temperature=0.0)
    choices = [Choice(mixing_weights(lam), new_chain(greedy, 0)) for lam in LAMS]
    runtime = runtime_of(llm, len(LAMS))
    try:
        steps = list(decode_choices(runtime, prompt, choices, n, is_eog(llm)))
    finally:
        runtime.close()
    assert len({tuple(t) for t in expected}) > 2  # the lams answer differently: a mix-up shows
    for choice, tokens in zip(choices, expected):
        assert choice.tokens == until_eog(llm, tokens)
        assert choice.finish == ("length" if len(choice.tokens) == n else "stop")
    assert steps[0] == list(range(len(LAMS)))  # every choice moves at the first step


def test_sampled_choices_are_llama_cpp_pythons_chains_on_the_blend(llm, plain_pair):
    """T = 0.7 with top-k and top-p: choice i draws what llama-cpp-python's own chain, seeded alike,
    draws from the numpy blend at its lam, one sequence at a time."""
    n, settings = 16, Sampling(temperature=0.7, top_k=50, top_p=0.95)
    chain_args = dict(temp=0.7, top_k=50, top_p=0.95, min_p=0.0, typical_p=1.0, repeat_penalty=1.0)
    prompt, _ = clear_greedy_cases(list(plain_pair), [weights_of(1.0)], 4)
    jobs = [(lam, 100 + i) for i, lam in enumerate([0.5, 1.5, 1.5])]
    choices = [Choice(mixing_weights(lam), new_chain(settings, seed)) for lam, seed in jobs]
    runtime = runtime_of(llm, len(jobs))
    try:
        list(decode_choices(runtime, prompt, choices, n, is_eog(llm)))
    finally:
        runtime.close()
    for (lam, seed), choice in zip(jobs, choices):
        assert choice.tokens == R.sampled(plain_pair, weights_of(lam), prompt, n, seed, is_eog(llm), **chain_args)
    assert choices[1].tokens != choices[2].tokens  # one lam, two seeds: two samples


def test_a_choice_stopped_by_its_caller_leaves_the_batch(llm):
    greedy = Sampling(temperature=0.0)
    choices = [Choice(mixing_weights(lam), new_chain(greedy, 0)) for lam in (0.5, 1.5)]
    runtime = runtime_of(llm, 2)
    try:
        moved = []
        for step in decode_choices(runtime, [1, 5, 6, 7], choices, 8, lambda t: False):
            moved.append(step)
            choices[0].finish = choices[0].finish or "stop"  # as a stop string found after its first token
    finally:
        runtime.close()
    assert len(choices[0].tokens) == 1 and len(choices[1].tokens) == 8
    assert moved[0] == [0, 1] and all(step == [1] for step in moved[1:])


def test_answers_that_cannot_fit_the_cache_are_refused_before_decoding(llm):
    runtime = runtime_of(llm, 4, n_ctx=256)
    try:
        choices = [Choice(mixing_weights(1.0), new_chain(Sampling(temperature=0.0), 0)) for _ in range(4)]
        with pytest.raises(ContextFullError, match="KV cells"):
            next(decode_choices(runtime, [1] * 10, choices, 100, lambda t: False))
    finally:
        runtime.close()
