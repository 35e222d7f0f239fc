"""Sequences that start together on one prompt: several choices of a request, the λ of a sweep's row.

The prompt is decoded once per model (in the models any sequence decodes) and its KV cells
shared; then every step draws one token (or a verified draft) for each live sequence, all
in one batch per model (:class:`~dera_gguf.batch.generator.BatchGenerator`).
"""

from __future__ import annotations

from typing import Callable, Iterator, List
from typing import Sequence as Tokens

from ..errors import ContextFullError
from ..runtime.pair import PairRuntime
from .generator import BatchGenerator
from .sequence import Sequence


def room(runtime: PairRuntime) -> int:
    """KV cells the runtime's contexts hold (llama.cpp may round n_ctx up)."""
    return runtime.contexts[0].n_positions


def decode_together(
    runtime: PairRuntime,
    prompt: Tokens[int],
    seqs: List[Sequence],
    is_eog: Callable[[int], bool],
    before_decode: Callable[[], None] = lambda: None,
) -> Iterator[List[int]]:
    """Generate every sequence on ``prompt`` (sequence i in slot i); after each step, yield the indices
    of the sequences that moved (a token appended, or finished). ``before_decode()`` runs before
    every step (it may raise to stop). A sequence whose caller set its ``finish`` between steps leaves."""
    need = len(prompt) + sum(seq.max_tokens for seq in seqs)
    if need > room(runtime):
        longest = max(seq.max_tokens for seq in seqs)
        raise ContextFullError(
            f"{len(seqs)} answers of up to {longest} tokens after a prompt of {len(prompt)} need "
            f"{need} KV cells; the pair's several-answer contexts hold {room(runtime)}: ask for fewer tokens or answers"
        )
    generator = BatchGenerator(runtime, is_eog)
    before_decode()
    generator.start_shared(prompt, seqs)
    live = lambda: any(seq.finish is None for seq in generator.running.values())
    while live():
        moved = generator.step()
        yield [seq.slot for seq in moved]
        if live():
            before_decode()
