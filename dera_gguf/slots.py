"""Continuous batching: answers that come and go, decoded together on one pair's contexts.

Each running answer is a sequence (a *slot*) in every context of the pair. One thread
steps them all: each step is one llama.cpp batch per model holding the next token of
every running answer, and each answer's rows are blended at its own weights and sampled
by its own seeded chain (a :class:`~dera_gguf.choices.Choice`), so an answer does not
depend on what runs beside it, up to llama.cpp's batch-shape rounding.

A new answer's prompt joins between steps, a chunk at a time in the same batch as the
running answers' tokens, so a long prompt holds them up for one chunk per step, never
for the whole prompt. An answer that finishes or is cancelled leaves at the next step.
A slot keeps what its last answer left in the KV cache; a new answer takes the free slot
holding the longest prefix of its prompt (at least half of it), so a client's next turn in
a conversation decodes only what is new; a conversation pushed out of its slot waits in a
prompt cache to be restored. A model weighted 0 in an answer's blend (λ 0 or 1) never
decodes it. What a slot holds is read from llama.cpp (its positions, per model); only
the token at each position is remembered here, written as it is decoded.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Sequence

import llama_cpp
import numpy as np
from llama_cpp.llama_cache import LlamaRAMCache

from .blend import blend_logits
from .choices import Choice, add_bias, emit, logprobs_of
from .contexts import common_prefix
from .engine import PairRuntime
from .errors import ContextFullError, DeRaError, Stopped
from .samplers import RowSampler
from .sequences import Run, batch_of, models_of, rows_by_seq
from .state import PairState

log = logging.getLogger("dera_gguf.slots")

SLOT_KEY = -1  # first "token" of the slots' keys in a shared prompt cache: no prompt of the engine starts so


@dataclass(eq=False)
class Job:
    """One answer to decode on a slot.

    ``on_step(job)`` runs on the slots' thread after each token drawn (or the finish); it may
    set ``choice.finish`` (a stop string found). ``on_end(job, error)`` runs once, when the
    answer is over: ``error`` None when it finished, else why not (:class:`Stopped` when it
    was cancelled or the slots closed). ``cancelled()`` is asked before every step.
    """

    prompt: Sequence[int]
    choice: Choice
    max_tokens: int
    on_step: Callable[["Job"], None]
    on_end: Callable[["Job", Optional[BaseException]], None]
    cancelled: Callable[[], bool] = lambda: False
    pending: List[int] = field(default_factory=list)  # prompt tokens still to decode, once admitted
    reused: int = 0  # prompt tokens the slot already held


class Slots:
    """``runtime``'s sequences as slots, stepped by a thread of their own until :meth:`close`.

    Args:
        runtime: the pair's contexts, one sequence per slot (:func:`~dera_gguf.choices.choice_runtime`);
            closed with the slots.
        n_ctx: the positions one slot may hold (a prompt and its answer).
        is_eog: whether a token ends the text.
        chunk: the most prompt tokens decoded in one step (beside the running answers' tokens).
        cache: a prompt cache shared with the pair's engine (a :class:`~dera_gguf.state.SharedRAMCache`:
            one byte budget), or None: what a slot held is kept there when the slot is given to another
            conversation, and a prompt that no slot holds is looked up there. The slots' states are
            kept apart from the engine's (under keys starting with ``SLOT_KEY``): llama.cpp's state of
            a sequence in a cache of several KV streams does not load into a context of one, nor the
            other way round.
        owner: the pair's ``(fingerprint, name)`` (:func:`~dera_gguf.state.pair_owner`), with ``cache``.
    """

    def __init__(
        self,
        runtime: PairRuntime,
        n_ctx: int,
        is_eog: Callable[[int], bool],
        chunk: int = 256,
        cache: Optional[LlamaRAMCache] = None,
        owner: tuple = ("", ""),
    ):
        self.runtime, self.n_ctx, self.is_eog = runtime, n_ctx, is_eog
        self.cache, self.owner = cache, owner
        self.n_slots = int(llama_cpp.llama_n_seq_max(runtime.contexts[0].ctx.ctx))
        self.chunk = max(1, min(chunk, runtime.n_batch - self.n_slots))
        n_models = len(runtime.contexts)
        self.written = np.zeros((n_models, self.n_slots, n_ctx), dtype=np.intc)  # token at each position
        self.running: Dict[int, Job] = {}
        self.left = [-1] * self.n_slots  # when each slot's last answer ended (in steps; -1: never used)
        self.steps = 0
        self.waiting: Deque[Job] = collections.deque()
        self.sampler = RowSampler(runtime.n_vocab)
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="dera-slots", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------ callers

    def submit(self, job: Job) -> None:
        """Queue ``job``; it starts at the next step with a free slot (in arrival order)."""
        if len(job.prompt) + job.max_tokens > self.n_ctx:
            raise ContextFullError(
                f"a prompt of {len(job.prompt)} tokens and an answer of up to {job.max_tokens} need "
                f"{len(job.prompt) + job.max_tokens} positions; a slot holds {self.n_ctx} (n_ctx)"
            )
        if not job.prompt:
            raise DeRaError("the prompt is empty: give some text to continue")
        with self.cond:
            if self.closed:
                raise Stopped("the slots are closed")
            self.waiting.append(job)
            self.cond.notify()

    def held(self, slot: int, model: int = 0) -> np.ndarray:
        """The tokens slot ``slot`` holds in model ``model``'s KV cache (its length read from llama.cpp)."""
        return self.written[model, slot, : self.runtime.contexts[model].extent(slot)]

    def close(self) -> None:
        """Stop the thread (running and waiting answers end with :class:`Stopped`), free the contexts."""
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join()
        self.runtime.close()

    # ------------------------------------------------------------ the thread

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not (self.closed or self.waiting or self.running):
                    self.cond.wait()
                if self.closed:
                    break
                self._admit()
            if not self.running:
                continue
            try:
                self._step()
            except Exception as e:  # a failed decode ends every running answer; the slots start clean
                for slot in list(self.running):
                    self._end(slot, e)
                self.runtime.clear()
        stopped = Stopped("the server is stopping")
        for slot in list(self.running):
            self._end(slot, stopped)
        for job in self.waiting:
            _tell(job, stopped)
        self.waiting.clear()

    def _admit(self) -> None:
        """Seat waiting jobs in free slots: each where the longest prefix of its prompt is held."""
        for job in [j for j in self.waiting if j.cancelled()]:
            self.waiting.remove(job)
            _tell(job, Stopped("cancelled before it started"))
        free = [s for s in range(self.n_slots) if s not in self.running]
        while self.waiting and free:
            job = self.waiting.popleft()
            prompt = np.asarray(job.prompt, dtype=np.intc)
            try:
                slot, keep = self._seat(free, prompt, models_of(job.choice.weights))
                for m in models_of(job.choice.weights):
                    self.runtime.contexts[m].drop_from(slot, keep)
            except Exception as e:  # (llama.cpp refused a state): this answer fails, the slots go on
                _tell(job, e)
                continue
            free.remove(slot)
            job.pending, job.reused = [int(t) for t in prompt[keep:]], keep
            self.running[slot] = job

    def _seat(self, free: List[int], prompt: np.ndarray, models: List[int]) -> tuple:
        """The free slot for ``prompt`` and how much of what it holds to keep.

        A slot holding at least half of the prompt (as its prefix) is reused, the one holding most
        (a conversation's next turn, a prompt asked again); otherwise the slot left longest ago (or
        never used) is emptied, so that a new conversation does not evict a recent one for a few
        shared tokens.
        """
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
        held = [self.held(slot, m).copy() for m in range(len(self.runtime.contexts))]
        key = max(held, key=len)
        if self.cache is not None and len(key):
            sequences = [context.save(slot, tokens) for context, tokens in zip(self.runtime.contexts, held)]
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
        for m, saved in enumerate(state.sequences):
            self.written[m, slot, : len(saved.tokens)] = saved.tokens
        return shared

    def _step(self) -> None:
        """One batch per model: a token of every answer that is drawing, prompt chunks for those joining."""
        for slot, job in list(self.running.items()):
            if job.cancelled():
                self._end(slot, Stopped("cancelled"))
        runs: List[List[Run]] = [[] for _ in self.runtime.contexts]  # each model's part of the step
        drawing = [s for s, j in self.running.items() if not j.pending]
        budget = max(self.chunk - len(drawing), 1)
        for slot, job in sorted(self.running.items()):  # ascending: llama.cpp keeps such a batch whole
            models = models_of(job.choice.weights)
            start = self.runtime.contexts[models[0]].extent(slot)
            if job.pending:
                tokens, last = job.pending[:budget], len(job.pending) <= budget
                del job.pending[: len(tokens)]  # (a failed decode ends the job anyway)
                budget -= len(tokens)
                if not tokens:
                    continue
            else:
                tokens, last = [job.choice.tokens[-1]], True
            for m in models:  # a model weighted 0 in the answer's blend never decodes it
                runs[m].append(Run(slot, start, tokens, last))
        rows = self.runtime.decode_each([batch_of(model_runs) for model_runs in runs])
        self.steps += 1
        for m, model_runs in enumerate(runs):
            for run in model_runs:
                self.written[m, run.seq, run.start : run.start + len(run.tokens)] = run.tokens
        self._draw(rows, runs)

    def _draw(self, rows: List[Optional[np.ndarray]], runs: List[List[Run]]) -> None:
        """Blend each drawing answer's rows at its weights, sample them with its chain, in slot order."""
        for slot, by_model in sorted(rows_by_seq(runs, rows).items()):
            job = self.running[slot]
            row = blend_logits(list(by_model.values()), [job.choice.weights[m] for m in by_model])
            scores = logprobs_of(job.choice, row)
            if job.choice.bias:
                add_bias(row, job.choice.bias)
            emit(job.choice, self.sampler.sample(job.choice.chain, row), job.max_tokens, self.is_eog, scores)
            job.on_step(job)
            if job.choice.finish is not None:
                self._end(slot, None)

    def _end(self, slot: int, error: Optional[BaseException]) -> None:
        job = self.running.pop(slot)
        self.left[slot] = self.steps
        _tell(job, error)


def _tell(job: Job, error: Optional[BaseException]) -> None:
    """``job.on_end``; a failing callback is logged, never allowed to stop the slots' thread."""
    try:
        job.on_end(job, error)
    except Exception:
        log.exception("an answer's end callback failed")
