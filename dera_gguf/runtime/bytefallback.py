"""Text that llama.cpp can tokenize, checked before it tries.

A SentencePiece vocabulary (``tokenizer.ggml.model = llama``) spells a character it has no
token for as byte tokens ``<0x00>`` ... ``<0xFF>``. A vocabulary that lacks some of them (no
byte fallback for those bytes) makes llama.cpp throw from ``llama_vocab::byte_to_token``,
which ends the whole process: a character it cannot spell must be refused in Python first.
Vocabularies with all 256 byte tokens (nearly every real model) and byte-level BPE ones
need no check; the rule here refuses a character that is not itself a token and has a byte
with no token (it may refuse one that a merge would have covered: never one that crashes).
"""

from __future__ import annotations

from typing import FrozenSet, Optional

import llama_cpp

from ..errors import DeRaError

SPACE = "\u2581"  # how a SentencePiece vocabulary writes a space


class ByteFallback:
    """What a SentencePiece vocabulary cannot spell: the bytes with no ``<0xXX>`` token, and its token texts."""

    def __init__(self, missing: FrozenSet[int], pieces: FrozenSet[str]):
        self.missing, self.pieces = missing, pieces

    @classmethod
    def of(cls, model, metadata: dict) -> Optional["ByteFallback"]:
        """The rule for a loaded ``llama_model`` (None when every text tokenizes)."""
        if metadata.get("tokenizer.ggml.model", "llama") != "llama":
            return None
        vocab = llama_cpp.llama_model_get_vocab(model)
        texts = [llama_cpp.llama_vocab_get_text(vocab, t) or b"" for t in range(llama_cpp.llama_vocab_n_tokens(vocab))]
        present = {int(t[3:5], 16) for t in texts if len(t) == 6 and t.startswith(b"<0x") and t.endswith(b">")}
        missing = frozenset(range(256)) - present
        if not missing:
            return None
        return cls(missing, frozenset(t.decode("utf-8", errors="ignore") for t in texts))

    def check(self, text: bytes) -> None:
        """Refuse ``text`` when one of its characters would need a byte token the vocabulary lacks."""
        for i, char in enumerate(text.decode("utf-8", errors="surrogateescape")):
            if char.replace(" ", SPACE) in self.pieces:
                continue
            raw = char.encode("utf-8", errors="surrogateescape")
            lacking = [b for b in raw if b in self.missing]
            if lacking:
                raise DeRaError(
                    f"character {char!r} (at {i}) cannot be tokenized: the model's vocabulary has no token for it "
                    f"and none for its byte 0x{lacking[0]:02X} (no byte fallback): leave it out or replace it"
                )
