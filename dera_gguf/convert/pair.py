"""Check that two GGUF files can be blended token by token (a valid DeRa pair).

DeRa mixes the two models' logits position by position, so both must map the
same ids to the same token strings and types, agree on BOS/EOS, and format
chats the same way. This reads only GGUF headers (memory-mapped), never weights.
"""

from __future__ import annotations

from pathlib import Path

import gguf

from ..errors import DeRaError

_SCALAR_KEYS = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template")
_ARRAY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type")


def _field(reader: gguf.GGUFReader, key: str):
    """A header value (list for arrays), or None when the key is absent."""
    f = reader.get_field(key)
    return None if f is None else f.contents()


def read_pair_fields(path: Path) -> dict[str, object]:
    """The header fields a DeRa pair must share."""
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as e:
        raise DeRaError(f"{path}: not a readable GGUF file ({e})") from e
    return {key: _field(reader, key) for key in _SCALAR_KEYS + _ARRAY_KEYS}


def _first_difference(a: list, b: list) -> str:
    """Describe where two token lists part ways."""
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} entries"
    i = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
    return f"first difference at id {i}: {a[i]!r} vs {b[i]!r}"


def check_pair(reference: Path, aligned: Path) -> None:
    """Raise DeRaError naming the first mismatch between a reference and an aligned GGUF."""
    ref, ali = read_pair_fields(reference), read_pair_fields(aligned)
    for key in _ARRAY_KEYS + _SCALAR_KEYS:
        if ref[key] != ali[key]:
            detail = (
                _first_difference(ref[key], ali[key])
                if key in _ARRAY_KEYS and ref[key] and ali[key]
                else (f"{ref[key]!r:.80} vs {ali[key]!r:.80}")
            )
            raise DeRaError(
                f"{reference} and {aligned} are not a valid DeRa pair: {key} differs ({detail}); "
                "both models must come from the same tokenizer and chat template"
            )
