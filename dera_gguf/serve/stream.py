"""Server-sent events for ``stream: true``, holding the pair's engine (or a slot) from the first chunk to the last.

The engine is taken before the call starts and given back when the stream ends, fails,
or the client goes away, whichever comes first (a slot's answer is cancelled then):
:class:`EventStream` owns that, and
:class:`EventResponse` closes it however its response ends (Starlette cancels a response
whose client disconnected, which would skip code after the generator's last ``yield``).

Everything that can be checked is checked before the first byte: the call is made and
its first chunk drawn (prompt evaluated, first token sampled) before the response
starts, so bad input is a JSON error with a 4xx status, not a broken stream. A failure
after that arrives as an SSE event ``data: {"error": {...}}``, which the ``openai``
client raises as an ``APIError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from functools import partial
from typing import Any, Awaitable, Callable, Iterator, Optional

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .errors import ApiError, as_api_error
from .schema import TokenCount
from .wire import dumps

log = logging.getLogger("dera_gguf.serve")

END = object()  # after a stream's last chunk
SHUTTING_DOWN = ApiError(
    503, "dera-serve is shutting down: the answer ends here", code="server_shutting_down", kind="server_error"
)


def event(data: Any) -> bytes:
    """One SSE event: ``data: <json>`` and a blank line."""
    text = data if isinstance(data, str) else dumps(data)
    return f"data: {text}\n\n".encode("utf-8")


class EventStream:
    """A started stream: ``pull()`` awaits its next chunk (``END`` after the last), ``release()`` gives
    back what it holds (the engine's lock, or its slot) once, however it ends (:meth:`close`)."""

    def __init__(
        self,
        pull: Callable[[], Awaitable[Any]],
        first: Any,
        release: Callable[[], None],
        count: Optional[TokenCount],
        stopping: Callable[[], bool],
    ) -> None:
        self.pull, self.first, self.release = pull, first, release
        self.count, self.stopping = count, stopping
        self.closed = False

    async def events(self):
        """The chunks as SSE events, then the usage chunk if asked, then ``[DONE]``."""
        chunk, last = self.first, None
        while chunk is not END:
            yield event(chunk)
            last = chunk
            if self.stopping():
                yield event(SHUTTING_DOWN.body())
                return
            try:
                chunk = await self.pull()
            except Exception as e:  # the engine failed mid-answer: tell the client, keep serving
                error = SHUTTING_DOWN if self.stopping() else as_api_error(e)
                log.warning("stream ended by an error: %s", error.message)
                yield event(error.body())
                return
        if self.count is not None and last is not None:
            yield event(_usage_chunk(last, self.count))
        yield event("[DONE]")

    def close(self) -> None:
        """Give back what the stream holds; idempotent."""
        if not self.closed:
            self.closed = True
            self.release()


class EventResponse(StreamingResponse):
    """A ``text/event-stream`` response that closes its :class:`EventStream` however it ends."""

    def __init__(self, stream: EventStream) -> None:
        self.stream = stream
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(stream.events(), media_type="text/event-stream", headers=headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.close()


async def start_stream(
    lock: asyncio.Lock,
    call: Callable[[], Iterator[dict]],
    count: Optional[TokenCount],
    stopping: Callable[[], bool],
    watch: Callable = contextlib.nullcontext,
) -> EventResponse:
    """Take the engine, make the call and draw its first chunk (inside ``watch()``, an async context
    entered once the engine is held); errors so far raise (a JSON answer). The engine is held
    until the stream ends: its generator is closed (at a token boundary), then the lock released."""
    await lock.acquire()
    chunks = None

    def release() -> None:
        try:
            if chunks is not None and hasattr(chunks, "close"):
                chunks.close()
        finally:
            lock.release()

    try:
        async with watch():
            chunks = await anyio.to_thread.run_sync(call)
            first = await anyio.to_thread.run_sync(next, chunks, END)
    except BaseException:
        release()
        raise
    pull = partial(anyio.to_thread.run_sync, next, chunks, END)
    return EventResponse(EventStream(pull, first, release, count, stopping))


def _usage_chunk(last: dict, count: TokenCount) -> dict:
    """OpenAI's closing chunk for ``stream_options.include_usage``: no choices, the token counts."""
    finish = next((c.get("finish_reason") for c in last.get("choices", []) if c.get("finish_reason")), None)
    keep = ("id", "object", "created", "model")
    return {**{k: last[k] for k in keep if k in last}, "choices": [], "usage": count.usage(finish)}
