"""Which drafter may draft for a pair (issue 32): llama.cpp's rule, and exact answers where vocabularies differ.

The rule (dera_gguf/draft_vocab.py) is llama.cpp's ``common_speculative_are_compatible``: same tokenizer
kind, same BOS/EOS where a prompt gets them, sizes at most 128 apart, the same texts from token 5 on.
Each case below builds a drafter whose vocabulary differs from the pair's in one known way, so the
expected verdict and the words naming it follow from the construction. Where a drafter is accepted
although its vocabulary differs, answers must still be the blend of plain models decoding one token
at a time (tests/reference.py): a text holding a token the drafter lacks is not drafted for, and a
draft stops before a token the pair lacks.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as R
from drafting_cases import clear_greedy_case, weights_of
from test_drafter import KW, N_CTX, decoded, drafter_of, drafting
from tiny_models import TinyVocab, tiny_vocab, write_tiny_llama

from dera_gguf import DeRaError, DeRaLlama

N_PAIR = len(TinyVocab.default().tokens)  # the fixtures' pair (tests/conftest.py) has the default vocabulary


def vocab_with(extra: int = 0, fewer: int = 0, **changes) -> TinyVocab:
    """The pair's vocabulary with ``extra`` tokens appended, its last ``fewer`` dropped, attributes changed."""
    vocab = TinyVocab.default(n_vocab=N_PAIR + extra)
    keep = len(vocab.tokens) - fewer
    vocab.tokens, vocab.scores, vocab.types = vocab.tokens[:keep], vocab.scores[:keep], vocab.types[:keep]
    for key, value in changes.items():
        setattr(vocab, key, value)
    return vocab


def renamed(index: int) -> TinyVocab:
    vocab = tiny_vocab()
    vocab.tokens[index] = "\u2581renamed"
    return vocab


REFUSED = {
    "another tokenizer kind": (dict(tokenizer="gpt2"), "its tokenizer is BPE, the pair's SentencePiece (SPM)"),
    "another BOS": (dict(vocab=tiny_vocab(bos=3)), "its BOS token is id 3, the pair's is id 1"),
    "adds EOS": (dict(add_eos=True), "it adds the EOS token to a prompt, and the pair does not"),
    "129 tokens more": (dict(vocab=vocab_with(extra=129)), f"{N_PAIR + 129} tokens and the pair's {N_PAIR}"),
    "token 300 renamed": (dict(vocab=renamed(300)), "token 300 is '\u2581renamed' in it"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_drafter_that_fails_llama_cpp_rule_is_refused_by_name(ref_path, aligned_path, models_dir, case):
    how, words = REFUSED[case]
    path = write_tiny_llama(models_dir / f"refused-{case.replace(' ', '-')}.gguf", seed=5, **how)
    with pytest.raises(DeRaError) as refused:
        DeRaLlama(str(ref_path), str(aligned_path), draft_model_path=str(path), **KW)
    message = str(refused.value)
    assert words in message and f"the draft model {path} cannot draft" in message and "--draft" in message


@pytest.fixture(scope="module")
def reference_models(ref_path, aligned_path):
    return [R.plain(ref_path, n_ctx=N_CTX), R.plain(aligned_path, n_ctx=N_CTX)]


ACCEPTED = {
    "another EOS": dict(vocab=tiny_vocab(eos=3)),  # neither adds EOS to a prompt: an end-of-turn token of its own
    "token 3 renamed": dict(vocab=renamed(3)),  # below token 5: control tokens are named freely
    "128 tokens more": dict(vocab=vocab_with(extra=128)),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_drafters_llama_cpp_accepts_draft_and_answers_stay_the_blend(
    ref_path, aligned_path, models_dir, reference_models, case
):
    lam = 1.5
    prompt, expected = clear_greedy_case(reference_models, weights_of(lam))
    path = write_tiny_llama(models_dir / f"accepted-{case.replace(' ', '-')}.gguf", seed=6, **ACCEPTED[case])
    llm = drafting(DeRaLlama(str(ref_path), str(aligned_path), lam=lam, draft_model_path=str(path), **KW))
    assert R.generated(llm, prompt, len(expected)) == expected
    assert llm.speculation_stats.drafted > 0


def test_a_drafter_with_more_tokens_stops_its_drafts_before_them(ref_path, aligned_path, models_dir, reference_models):
    """Its greedy tokens reach ids the pair lacks (checked on a plain copy of it): the drafts end there."""
    lam = 1.5
    prompt, expected = clear_greedy_case(reference_models, weights_of(lam))
    path = write_tiny_llama(models_dir / "drafter-more.gguf", seed=8, vocab=vocab_with(extra=100))
    plain = R.plain(path)
    rows = R.step_logits([plain], prompt + expected)[0][len(prompt) - 1 :]
    assert (np.argmax(rows, axis=-1) >= N_PAIR).any(), "the case needs a drafter that proposes tokens past the pair's"
    llm = drafting(DeRaLlama(str(ref_path), str(aligned_path), lam=lam, draft_model_path=str(path), **KW))
    assert R.generated(llm, prompt, len(expected)) == expected
    assert llm.speculation_stats.drafted > 0


@pytest.mark.parametrize("beyond_text", [True, False])
def test_a_drafter_with_fewer_tokens_drafts_only_for_text_it_can_read(
    ref_path, aligned_path, models_dir, reference_models, beyond_text
):
    """Its vocabulary ends past every id of the text (it drafts), or before one of the prompt's (it never
    reads the text: nothing decoded, nothing drafted); answers are the blend either way."""
    lam = 1.5
    prompt, expected = clear_greedy_case(reference_models, weights_of(lam))
    top = max(prompt + expected) + 1 if beyond_text else max(prompt)  # the drafter's size
    assert 0 < N_PAIR - top <= 128
    path = write_tiny_llama(models_dir / f"drafter-{top}.gguf", seed=9, vocab=vocab_with(fewer=N_PAIR - top))
    llm = drafting(DeRaLlama(str(ref_path), str(aligned_path), lam=lam, draft_model_path=str(path), **KW))
    at_start = decoded(drafter_of(llm))
    assert R.generated(llm, prompt, len(expected)) == expected
    if beyond_text:
        assert llm.speculation_stats.drafted > 0
    else:
        assert llm.speculation_stats.drafted == 0 and decoded(drafter_of(llm)) == at_start
