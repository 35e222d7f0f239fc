"""Who runs where: the waiting queue, the slot each new sequence takes, and what of its prompt the slot keeps.

A slot keeps what its last sequence left in the KV cache. A new sequence takes the free slot
holding the longest prefix of its prompt when that is at least half of it (llama-server's
rule), so a client's next turn decodes only what is new; otherwise the slot left longest ago
is emptied (what it held goes to the prompt cache first) and the cache is asked for the
longest prefix of the prompt it keeps. What a slot holds is read from the contexts (their
extents from llama.cpp, the tokens as decoded). Execution is apart
(:class:`~dera_gguf.batch.generator.BatchGenerator`), as vLLM keeps its scheduler apart from
its executor.
"""

from __future__ import annotations

import collections
from typing import Callable, Deque, List, Optional, Tuple

import numpy as np
from llama_cpp.llama_cache import LlamaRAMCache

from ..errors import ContextFullError, DeRaError
from ..runtime.contexts import common_prefix
from ..runtime.pair import PairRuntime
from ..runtime.states import PairState
from .sequence import Sequence

SLOT_KEY = -1  # first "token" of the slots' keys in a shared prompt cache: no prompt of the engine starts so


class SlotScheduler:
    """The queue of ``runtime``'s slots (one sequence each) and where each waiting sequence goes.

    Args:
        runtime: the pair's contexts, one sequence per slot.
        n_ctx: the positions one slot may hold (a prompt and its answer).
        cache: a prompt cache shared with the pair's engine (a :class:`~dera_gguf.runtime.states.SharedRAMCache`), or
            None. The slots' states are kept apart from the engine's (keys starting with ``SLOT_KEY``):
            llama.cpp's state of a sequence in a cache of several KV streams does not load into a context
            of one, nor the other way round.
        owner: the pair's ``(fingerprint, name)`` (:func:`~dera_gguf.runtime.states.pair_owner`), with ``cache``.
    """

    def __init__(self, runtime: PairRuntime, n_ctx: int, n_slots: int, cache: Optional[LlamaRAMCache], owner: tuple):
        self.runtime, self.n_ctx, self.n_slots = runtime, n_ctx, n_slots
        self.cache, self.owner = cache, owner
        self.waiting: Deque = collections.deque()
        self.left = [-1] * n_slots  # when each slot's last sequence ended (in steps; -1: never used)

    def fits(self, seq: Sequence) -> bool:
        """Whether a slot holds ``seq``'s prompt and its longest answer."""
        return len(seq.prompt) + seq.max_tokens <= self.n_ctx

    def check(self, seq: Sequence) -> None:
        """Refuse a sequence no slot can hold."""
        if not self.fits(seq):
            raise ContextFullError(
                f"a prompt of {len(seq.prompt)} tokens and an answer of up to {seq.max_tokens} need "
                f"{len(seq.prompt) + seq.max_tokens} positions; a slot holds {self.n_ctx} (n_ctx)"
            )
        if not len(seq.prompt):
            raise DeRaError("the prompt is empty: give some text to continue")

    def held(self, slot: int, model: int = 0) -> np.ndarray:
        """The tokens ``slot`` holds in model ``model``'s KV cache."""
        return self.runtime.contexts[model].held(slot)

    def admit(
        self, busy: Callable[[int], bool], failed: Callable[[object, BaseException], None]
    ) -> List[Tuple[object, int, int]]:
        """``(job, slot, keep)`` for each waiting job that starts now, in arrival order, while slots are free;
        ``job.sequence`` is what runs. A job whose seating fails is handed to ``failed``."""
        started = []
        free = [s for s in range(self.n_slots) if not busy(s)]
        while self.waiting and free:
            job = self.waiting.popleft()
            seq = job.sequence
            prompt = np.asarray(seq.prompt, dtype=np.intc)
            try:
                slot, keep = self._seat(free, prompt, seq.models())
                for m in seq.models():
                    self.runtime.contexts[m].drop_from(slot, keep)
            except Exception as e:  # (llama.cpp refused a state): this job fails, the others go on
                failed(job, e)
                continue
            free.remove(slot)
            started.append((job, slot, keep))
        return started

    def _seat(self, free: List[int], prompt: np.ndarray, models: List[int]) -> tuple:
        """The free slot for ``prompt`` and how much of what it holds to keep (see the module docstring)."""
        shared = {s: min(common_prefix(self.held(s, m), prompt) for m in models) for s in free}
        reusable = [s for s in free if shared[s] and 2 * shared[s] >= len(prompt)]
        if not reusable:  # a few shared tokens save little: emptied (kept in the cache), or what the cache holds
            slot = min(free, key=lambda s: self.left[s])
            self._evict(slot)
            return slot, min(self._recall(slot, prompt, models), len(prompt) - 1)
        slot = max(reusable, key=lambda s: shared[s])
        return slot, min(shared[slot], len(prompt) - 1)  # the last prompt token is decoded again for its row

    def _evict(self, slot: int) -> None:
        """Empty ``slot``, keeping what it held in the prompt cache first: a state as the engine saves one,
        each model's sequence with its own tokens (a model weighted 0 in the last answer lacks it)."""
        held = [self.held(slot, m) for m in range(len(self.runtime.contexts))]
        key = max(held, key=len).copy()
        if self.cache is not None and len(key):
            sequences = [context.save(slot) for context in self.runtime.contexts]
            empty = np.zeros((0, self.runtime.n_vocab), dtype=np.single)
            self.cache[[SLOT_KEY, *key.tolist()]] = PairState(key, empty, len(key), 0, sequences, *self.owner)
        for context in self.runtime.contexts:
            context.drop_from(slot, 0)

    def _recall(self, slot: int, prompt: np.ndarray, models: List[int]) -> int:
        """Restore into the empty ``slot`` the cached state holding the longest prefix of ``prompt``, if the
        ``models`` hold at least half of it there; returns the prompt tokens they hold (0: none restored)."""
        key = [SLOT_KEY, *prompt.tolist()]
        if self.cache is None or key not in self.cache:
            return 0
        state = self.cache[key]
        if not isinstance(state, PairState) or state.owner != self.owner[0] or state.n_tokens > self.n_ctx:
            return 0
        lengths = [len(saved.tokens) for saved in state.sequences]
        shared = min(common_prefix(state.sequences[m].tokens, prompt) for m in models)
        if 2 * shared < len(prompt):
            return 0
        try:
            for context, saved in zip(self.runtime.contexts, state.sequences):
                context.restore(saved, slot)
        except DeRaError:
            lengths = []
        if [context.extent(slot) for context in self.runtime.contexts] != lengths:
            for context in self.runtime.contexts:  # (saved under other adapter scales: weights mode)
                context.drop_from(slot, 0)
            return 0
        return shared
