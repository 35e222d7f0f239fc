"""Sequences that run together: several choices of a request, the λ of a sweep's row, their next turns.

The prompt is decoded once per model (in the models any sequence decodes) and its KV cells
shared; then every step draws one token (or a verified draft) for each live sequence, all
in one batch per model (:class:`~dera_gguf.batch.generator.BatchGenerator`). A conversation's
next turn (:func:`continue_in_slots`) gives each sequence a prompt of its own in the slot that holds
its history: the slot keeps the longest prefix of the new prompt it holds and decodes the rest.
"""

from __future__ import annotations

from typing import Callable, Iterator, List
from typing import Sequence as Tokens

import numpy as np

from ..errors import ContextFullError, DeRaError
from ..runtime.contexts import common_prefix
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
    yield from run(generator, before_decode)


def held_prefix(runtime: PairRuntime, seq: Sequence, slot: int) -> int:
    """How many first tokens of ``seq.prompt`` ``slot`` holds in every model ``seq`` decodes in (read from the
    contexts), short of the prompt's last token, which is decoded again for its row."""
    prompt = np.asarray(seq.prompt, dtype=np.intc)
    held = min(common_prefix(runtime.contexts[m].held(slot), prompt) for m in seq.models())
    return min(held, len(prompt) - 1)


def continue_in_slots(
    runtime: PairRuntime,
    seqs: List[Sequence],
    is_eog: Callable[[int], bool],
    before_decode: Callable[[], None] = lambda: None,
) -> Iterator[List[int]]:
    """Generate every sequence on its own prompt in its own slot (``seq.slot``), which keeps the longest
    prefix of that prompt it holds (:func:`held_prefix`: a conversation's earlier turns) and drops the rest;
    the sequences then decode the rest of their prompts and draw, all in one batch per model and step.
    Yields as :func:`decode_together`; each sequence's ``reused`` is what of its prompt its slot held."""
    generator = BatchGenerator(runtime, is_eog)
    for seq in seqs:
        if not len(seq.prompt):
            raise DeRaError("a sequence to continue needs a prompt of one token at least")
        keep = held_prefix(runtime, seq, seq.slot)
        runtime.drop_from(seq.slot, keep)
        generator.join(seq, seq.slot, keep)
    before_decode()
    yield from run(generator, before_decode)


def run(generator: BatchGenerator, before_decode: Callable[[], None]) -> Iterator[List[int]]:
    """Step ``generator`` until none of its sequences runs; yield the slots that moved after each step."""
    live = lambda: any(seq.finish is None for seq in generator.running.values())
    while live():
        moved = generator.step()
        yield [seq.slot for seq in moved]
        if live():
            before_decode()
