"""Which small model may draft for a pair: llama.cpp's compatibility rule for speculative decoding.

A drafter only proposes token ids; the pair verifies every one of them, so answers never depend on
the drafter (:mod:`dera_gguf.speculation.verify`). What its vocabulary must share with the pair's is what
makes its ids mean the pair's tokens, so that its drafts can pass. The rule is the one llama.cpp's
speculative decoding applies (``common_speculative_are_compatible`` in ``common/speculative.cpp``):

* the same kind of tokenizer (SentencePiece, BPE, ...);
* both add a BOS token to a prompt or neither does, and when they do, the same BOS id; the same for EOS;
* vocabulary sizes at most 128 tokens apart;
* the same text for every token id from 5 up to the smaller size.

So a model of the pair's family drafts for it although its chat tuning named another end-of-turn
token (Llama-3.2-1B-Instruct's EOS is ``<|eot_id|>``, Tulu 3's ``<|end_of_text|>``; neither adds an
EOS to a prompt), or its converter padded the vocabulary to another size, or its first few control
tokens are named otherwise. The pair's own two models must agree far more closely, token for token
(:func:`dera_gguf.checks.check_vocabularies`): their logits are blended. The ids one vocabulary has and
the other lacks are dealt with where drafts are made (:class:`dera_gguf.speculation.small_model.SmallDraft`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import llama_cpp

from .. import checks
from ..errors import DeRaError

MAX_SIZE_DIFFERENCE = 128  # llama.cpp's SPEC_VOCAB_MAX_SIZE_DIFFERENCE
FIRST_COMPARED = 5  # llama.cpp's SPEC_VOCAB_CHECK_START_TOKEN_ID: lower ids are control tokens named freely
_KINDS = {1: "SentencePiece (SPM)", 2: "BPE", 3: "WordPiece", 4: "Unigram", 5: "RWKV"}


@dataclass(frozen=True)
class VocabFacts:
    """What the rule compares of one model's vocabulary."""

    kind: int  # llama.cpp's vocabulary type
    n_tokens: int
    add_bos: bool
    bos: int
    add_eos: bool
    eos: int
    texts: tuple

    @classmethod
    def of(cls, path: str, role: str, verbose: bool = False) -> "VocabFacts":
        """The facts of the GGUF model at ``path`` (its vocabulary only is loaded, no weights)."""
        model = checks.load_vocab_only(path, role, verbose)
        try:
            vocab = model.vocab
            n = llama_cpp.llama_vocab_n_tokens(vocab)
            return cls(
                kind=int(llama_cpp.llama_vocab_type(vocab)),
                n_tokens=n,
                add_bos=bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
                bos=int(llama_cpp.llama_vocab_bos(vocab)),
                add_eos=bool(llama_cpp.llama_vocab_get_add_eos(vocab)),
                eos=int(llama_cpp.llama_vocab_eos(vocab)),
                texts=tuple(llama_cpp.llama_vocab_get_text(vocab, i).decode("utf-8", "replace") for i in range(n)),
            )
        finally:
            model.close()


def draft_vocab_problem(pair: VocabFacts, draft: VocabFacts) -> Optional[str]:
    """Why ``draft`` may not draft for ``pair`` by the rule, in words for an error message; None when it may."""
    if pair.kind != draft.kind:
        return f"its tokenizer is {_kind(draft.kind)}, the pair's {_kind(pair.kind)}"
    for name, pair_adds, pair_id, draft_adds, draft_id in (
        ("BOS", pair.add_bos, pair.bos, draft.add_bos, draft.bos),
        ("EOS", pair.add_eos, pair.eos, draft.add_eos, draft.eos),
    ):
        if pair_adds != draft_adds:
            it = "adds" if draft_adds else "does not add"
            return f"it {it} the {name} token to a prompt, and the pair {'does' if pair_adds else 'does not'}"
        if pair_adds and pair_id != draft_id:
            return f"its {name} token is id {draft_id}, the pair's is id {pair_id}"
    if abs(pair.n_tokens - draft.n_tokens) > MAX_SIZE_DIFFERENCE:
        return (
            f"its vocabulary has {draft.n_tokens} tokens and the pair's {pair.n_tokens}: "
            f"more than {MAX_SIZE_DIFFERENCE} apart"
        )
    for i in range(FIRST_COMPARED, min(pair.n_tokens, draft.n_tokens)):
        if pair.texts[i] != draft.texts[i]:
            return f"token {i} is {draft.texts[i]!r} in it and {pair.texts[i]!r} in the pair's"
    return None


def check_draft_vocabulary(reference: str, draft_path: str, verbose: bool = False) -> None:
    """Refuse, before any weights load, a drafter whose vocabulary fails the rule against the pair's
    (the reference's: the pair's models share one vocabulary token for token)."""
    problem = draft_vocab_problem(
        VocabFacts.of(reference, "reference model", verbose), VocabFacts.of(draft_path, "draft model", verbose)
    )
    if problem:
        raise DeRaError(
            f"the draft model {draft_path} cannot draft for the pair of {reference}: {problem}. A drafter must "
            "share the pair's tokenizer (llama.cpp's rule for speculative decoding): use a smaller model of the "
            "pair's family, or run without draft_model_path / --draft"
        )


def _kind(kind: int) -> str:
    return _KINDS.get(kind, f"of type {kind}")
