"""Continuous batching: answers that come and go, decoded together on one pair's contexts.

Each running answer is a :class:`~dera_gguf.batch.sequence.Sequence` in a slot (a sequence id
in every context of the pair). One thread loops: the scheduler seats waiting answers in free
slots (:mod:`~dera_gguf.batch.scheduler`: which slot, what of the prompt it keeps, the prompt
cache), then the generator steps every running answer once
(:class:`~dera_gguf.batch.generator.BatchGenerator`: a new prompt joins a chunk at a time
beside the running answers' tokens, each answer drawn at its own weights by its own chain),
then each answer hears of its step and, once over, of its end. An answer cancelled by its
caller leaves at the next step. A model weighted 0 in an answer's blend (λ 0 or 1) never
decodes it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import llama_cpp
from llama_cpp.llama_cache import LlamaRAMCache

from ..errors import Stopped
from ..runtime.pair import PairRuntime
from .generator import BatchGenerator
from .scheduler import SlotScheduler
from .sequence import Sequence

log = logging.getLogger("dera_gguf.slots")


@dataclass(eq=False)
class Job:
    """One answer for the slots: its sequence (prompt, budget, weights, chain...) and its caller's hooks.

    ``on_step(job)`` runs on the slots' thread after each token drawn (or the finish); it may set
    ``sequence.finish``. ``on_end(job, error)`` runs once, when the answer is over: ``error`` None when
    it finished, else why not (:class:`Stopped` when it was cancelled or the slots closed).
    ``cancelled()`` is asked before every step. ``reused``: the prompt tokens its slot already held.
    """

    sequence: Sequence
    on_step: Callable[["Job"], None]
    on_end: Callable[["Job", Optional[BaseException]], None]
    cancelled: Callable[[], bool] = lambda: False
    reused: int = 0


class Slots:
    """``runtime``'s sequences as slots, stepped by a thread of their own until :meth:`close`.

    Args:
        runtime: the pair's contexts, one sequence per slot (:func:`~dera_gguf.runtime.pair.open_sequences`);
            closed with the slots.
        n_ctx: the positions one slot may hold (a prompt and its answer).
        is_eog: whether a token ends the text.
        chunk: the most prompt tokens decoded in one step (beside the running answers' tokens).
        cache, owner: the prompt cache shared with the pair's engine, and the pair's owner
            (:class:`~dera_gguf.batch.scheduler.SlotScheduler`).
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
        self.runtime, self.n_ctx = runtime, n_ctx
        n_slots = int(llama_cpp.llama_n_seq_max(runtime.contexts[0].ctx.ctx))
        self.scheduler = SlotScheduler(runtime, n_ctx, n_slots, cache, owner)
        self.generator = BatchGenerator(runtime, is_eog, max(1, min(chunk, runtime.n_batch - n_slots)))
        self.jobs = {}  # slot -> the job running there
        self.steps = 0
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="dera-slots", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------ callers

    def fits(self, sequence: Sequence) -> bool:
        """Whether a slot can hold ``sequence`` (its prompt and its longest answer)."""
        return self.scheduler.fits(sequence)

    def submit(self, job: Job) -> None:
        """Queue ``job``; it starts at the next step with a free slot (in arrival order)."""
        self.scheduler.check(job.sequence)
        with self.cond:
            if self.closed:
                raise Stopped("the slots are closed")
            self.scheduler.waiting.append(job)
            self.cond.notify()

    def held(self, slot: int, model: int = 0):
        """The tokens slot ``slot`` holds in model ``model``'s KV cache."""
        return self.scheduler.held(slot, model)

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
                while not (self.closed or self.scheduler.waiting or self.jobs):
                    self.cond.wait()
                if self.closed:
                    break
                self._admit()
            if not self.jobs:
                continue
            try:
                self._step()
            except Exception as e:  # a failed decode ends every running answer; the slots start clean
                for slot in list(self.jobs):
                    self._end(slot, e)
                self.runtime.clear()
        stopped = Stopped("the server is stopping")
        for slot in list(self.jobs):
            self._end(slot, stopped)
        for job in self.scheduler.waiting:
            _tell(job, stopped)
        self.scheduler.waiting.clear()

    def _admit(self) -> None:
        waiting = self.scheduler.waiting
        for job in [j for j in waiting if j.cancelled()]:
            waiting.remove(job)
            _tell(job, Stopped("cancelled before it started"))
        for job, slot, keep in self.scheduler.admit(lambda s: s in self.jobs, _tell):
            self.generator.join(job.sequence, slot, keep)
            self.jobs[slot], job.reused = job, keep

    def _step(self) -> None:
        for slot, job in list(self.jobs.items()):
            if job.cancelled():
                self._end(slot, Stopped("cancelled"))
        moved = self.generator.step()
        self.steps += 1
        for seq in moved:
            job = self.jobs[seq.slot]
            job.on_step(job)
            if seq.finish is not None:
                self._end(seq.slot, None)

    def _end(self, slot: int, error: Optional[BaseException]) -> None:
        job = self.jobs.pop(slot)
        if slot in self.generator.running:
            self.generator.leave(slot)
        self.scheduler.left[slot] = self.steps
        _tell(job, error)


def _tell(job: Job, error: Optional[BaseException]) -> None:
    """``job.on_end``; a failing callback is logged, never allowed to stop the slots' thread."""
    try:
        job.on_end(job, error)
    except Exception:
        log.exception("an answer's end callback failed")
