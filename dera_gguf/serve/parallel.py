"""dera-serve --parallel N: one-answer requests decoded together on a pair's slots.

Every request that a slot can answer as asked is one answer on the pair's
:class:`~dera_gguf.batch.slots.Slots` (N sequences in contexts of their own, on the pair's loaded
weights, sharing one more n_ctx of KV cache): it joins the running answers between steps,
decodes in their batch at its own λ with its own seeded chain, and leaves when it ends or
its client goes away. A request a slot cannot answer as asked (echo, grammars, tools,
text-keyed logit bias, mode ``weights``, several choices), or whose prompt and answer do
not fit a slot's n_ctx / N positions, takes the one-at-a-time path on the pair's engine,
as without ``--parallel``.

The prompt, stop strings, ``max_tokens`` and text are made as a one-answer call makes
them (:func:`~dera_gguf.serve.plan.plan`), so a greedy answer is the one the engine
gives alone, up to llama.cpp's batch-shape rounding. The slots' thread hands each chunk
to the request's event loop through an :class:`asyncio.Queue`.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Optional

from ..batch.slots import Job, Slots
from ..runtime.states import SharedRAMCache
from .plan import Plan
from .schema import Request, unbatchable
from .stream import END

PROMPT_CHUNK = 128  # prompt tokens a joining request decodes per step beside the running answers


def pair_slots(llm: Any, n_slots: int) -> Slots:
    """``n_slots`` slots on the DeRaLlama's weights and settings, sharing one more n_ctx of KV cache:
    each slot holds n_ctx / n_slots positions, laid out as in a context of its own. The engine's
    prompt cache, when it is a :class:`~dera_gguf.runtime.states.SharedRAMCache`, is the slots' too."""
    runtime = llm.sequences(n_slots, llm.context_size, unified=False)
    cache = llm.cache if isinstance(llm.cache, SharedRAMCache) else None  # (one the slots may use beside it)
    return Slots(runtime, llm.context_size // n_slots, llm.is_eog, PROMPT_CHUNK, cache, llm.state_owner)


def fits_a_slot(body: Request, kwargs: dict, mode: str) -> bool:
    """Whether a slot answers ``body`` (call arguments ``kwargs``) as asked; else it takes the engine's path."""
    return unbatchable(body, kwargs, mode) is None


class Feed:
    """Chunks from the slots' thread to the request's event loop; an exception ends the feed."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop has closed: nobody is listening
            pass

    async def get(self) -> Any:
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


def submit(slots: Slots, p: Plan, cancelled: Callable[[], bool]) -> Optional[Feed]:
    """Queue the one answer ``p`` plans on ``slots``; None when it does not fit a slot (the engine answers
    it). Its feed gives the stream's chunks then END, or for a whole answer the answer."""
    (answer,) = p.choices
    if not slots.fits(answer):
        return None
    feed = Feed()
    slots.submit(Job(answer, _on_step(p, feed), _on_end(p, feed), cancelled))
    return feed


def _on_step(p: Plan, feed: Feed) -> Callable[[Job], None]:
    first = True  # (a chat stream's first chunks carry the role)

    def step(job: Job) -> None:  # on the slots' thread, between steps
        nonlocal first
        if p.stream:
            for chunk in p.shape.step(p.choices, p.texts, [0], first):
                feed.put(chunk)
            first = False

    return step


def _on_end(p: Plan, feed: Feed) -> Callable[[Job, Optional[BaseException]], None]:
    def end(job: Job, error: Optional[BaseException]) -> None:
        if error is not None:
            feed.put(error)
        elif not p.stream:
            feed.put(p.shape.whole(p.choices, p.texts))
        else:
            if p.shape.usage_chunk:
                feed.put(p.shape.usage(p.choices))
            feed.put(END)

    return end
