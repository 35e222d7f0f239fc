"""The OpenAI-compatible app: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

A small FastAPI app of its own rather than llama-cpp-python's ``create_app``: that app
keeps one model proxy, one settings object and one pair of locks in module globals,
loads models itself (``logits_all=True``, optional ``set_cache``, both wrong for a
DeRaLlama), streams by calling ``llama_cpp.Llama`` methods unbound (which would skip
DeRaLlama's ``lam=``), and answers 500 for most bad input. What fits is reused: its
request types and ``prepare_request_resources`` (:mod:`.schema`), its ``/v1/models``
shape (:mod:`.catalog`).

A request that a slot can answer goes to the pair's slots (``--parallel``, :mod:`.slots`),
where it runs beside the others. Any other request is served by the pair's engine, one
at a time (an ``asyncio.Lock`` per pair, in arrival order); the call runs on a worker
thread with the request's own ``lam=``, so no λ leaks between requests, and a waiting
request never cuts a running stream. A call stops at its next decode once its client
has gone or the server is stopping (:func:`_watching`; a stream that has started is
closed by :mod:`.stream`), so it does not hold the engine for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

from ..errors import Stopped
from ..sampling.settings import Sampling
from .catalog import Asked, Catalog
from .choices import check_several, run_choices
from .engine_call import engine_call
from .errors import ApiError, install_handlers
from .parallel import fits_a_slot, submit
from .plan import plan
from .prompts import merge_answers, several_prompts
from .schema import ChatRequest, CompletionRequest, call_kwargs, counted, given
from .stream import SHUTTING_DOWN, EventResponse, EventStream, start_stream
from .tokenizer import install_tokenizer_routes
from .wire import Answer


@dataclass
class ServeSettings:
    """How requests are answered: defaults (the paper's; ``max_tokens`` is also the cap), key, engines."""

    sampling: Sampling = field(default_factory=Sampling)
    api_key: Optional[str] = None
    logits_all: bool = False  # the engines keep every position's logits (needed for logprobs)
    mode: str = "blend"  # a request's "mode" wins
    stopping: Callable[[], bool] = lambda: False  # true once the server shuts down: streams end early
    max_choices: int = 8  # the most choices (n, or lam list) one request may ask for


def create_app(catalog: Catalog, settings: Optional[ServeSettings] = None) -> FastAPI:
    """The app serving ``catalog``'s pairs; it closes their engines when the server stops."""
    settings = settings or ServeSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        catalog.close()

    app = FastAPI(title="dera-serve", summary="DeRa-realigned GGUF models, OpenAI-compatible", lifespan=lifespan)
    app.state.known_fields = {
        "/v1/chat/completions": list(ChatRequest.model_fields),
        "/v1/completions": list(CompletionRequest.model_fields),
    }
    install_handlers(app)
    auth = [Depends(_api_key_check(settings.api_key))]

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        return catalog.listing()

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def model(model_id: str) -> dict:
        catalog.find(model_id)
        return {"id": model_id, "object": "model", "created": catalog.created, "owned_by": "dera-gguf"}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatRequest, request: Request):
        return _response(await _answer(catalog, settings, body, request))

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        prompts = several_prompts(body)
        if prompts is None:
            return _response(await _answer(catalog, settings, body, request))
        answers = await asyncio.gather(
            *(_answer(catalog, settings, body.model_copy(update={"prompt": p}), request) for p in prompts)
        )
        gone = next((a for a in answers if isinstance(a, Response)), None)
        return gone or Answer(merge_answers(answers))

    install_tokenizer_routes(app, catalog, auth)
    return app


def _response(answer) -> Response:
    """A whole answer (a dict) as JSON; a stream or an empty answer as it is."""
    return Answer(answer) if isinstance(answer, dict) else answer


async def _answer(catalog: Catalog, settings: ServeSettings, body, request: Request):
    """One request: what it asks (model, λ, fields) checked once, then the call on the pair's slots or
    engine. A whole answer is a dict; a stream (or the empty answer to a client that left) a Response."""
    mode = given(body, "mode") or settings.mode
    asked = catalog.ask(body.model, given(body, "lam"), given(body, "n"), mode, settings.max_choices)
    kwargs = call_kwargs(body, settings.sampling, settings.logits_all)
    if asked.several:
        check_several(asked, body, kwargs)
        return await _answer_several(settings, asked, body, kwargs, request)
    if asked.pair.slots is not None and fits_a_slot(body, kwargs, mode):
        answer = await _answer_on_slots(settings, asked, body, kwargs, request)
        if answer is not None:
            return answer
    kwargs.update(lam=asked.lam, model=asked.model, mode=mode)
    options = given(body, "stream_options")
    count = counted(kwargs) if body.stream and options is not None and options.include_usage else None
    llm = asked.pair.llm
    call = partial(engine_call, llm, body, kwargs)
    watch = partial(_watching, request, llm, settings.stopping)
    return await _locked(asked.pair, body.stream, call, count, settings.stopping, watch)


async def _locked(pair, stream: bool, call, count, stopping: Callable[[], bool], watch):
    """``call`` on a worker thread holding the pair's engine (its lock), watched; a stream is watched up to
    its first chunk (then a disconnect closes the stream itself)."""
    try:
        if stream:
            return await start_stream(pair.lock, call, count, stopping, watch)
        async with pair.lock, watch():
            return await anyio.to_thread.run_sync(call)
    except Stopped:
        if stopping():
            raise SHUTTING_DOWN from None
        return Response(status_code=499)  # (nginx's "client closed request": nobody receives it)


async def _answer_several(settings: ServeSettings, asked: Asked, body, kwargs: dict, request: Request):
    """A request with several choices (:mod:`.choices`): the same lock, watch and streaming as one answer."""
    gone = threading.Event()
    stopped = lambda: gone.is_set() or settings.stopping()
    cap, max_tokens = settings.max_choices, settings.sampling.max_tokens
    call = partial(run_choices, asked, body, kwargs, cap, max_tokens, stopped)
    watch = partial(_client_watch, request, gone)
    return await _locked(asked.pair, body.stream, call, None, settings.stopping, watch)


async def _answer_on_slots(settings: ServeSettings, asked: Asked, body, kwargs: dict, request: Request):
    """A request on the pair's slots (:mod:`.slots`), beside the others; None when it does not fit a slot.
    Its client going away, its stream ending, or the server stopping ends the answer at the next step."""
    p = plan(asked, body, kwargs)
    async with _client_watch(request) as gone:
        feed = submit(asked.pair.slots, p, lambda: gone.is_set() or settings.stopping())
        if feed is None:
            return None
        try:
            first = await feed.get()
        except Stopped:
            if settings.stopping():
                raise SHUTTING_DOWN from None
            return Response(status_code=499)
        except BaseException:
            gone.set()
            raise
    if not body.stream:
        return first
    return EventResponse(EventStream(feed.get, first, gone.set, None, settings.stopping))


@contextlib.asynccontextmanager
async def _client_watch(request: Request, gone: Optional[threading.Event] = None):
    """An event (``gone``, or a new one) set once the client has disconnected, while inside."""
    gone = gone if gone is not None else threading.Event()
    watcher = asyncio.create_task(_watch_client(request, gone))
    try:
        yield gone
    finally:
        watcher.cancel()


@contextlib.asynccontextmanager
async def _watching(request: Request, llm, stopping: Callable[[], bool]):
    """While inside (holding the pair's engine), the engine's call stops before its next decode
    once the client has disconnected (nobody would read the answer) or the server is stopping."""
    async with _client_watch(request) as gone:
        with llm.stopping(lambda: gone.is_set() or stopping()):
            yield


async def _watch_client(request: Request, gone: threading.Event) -> None:
    while not await request.is_disconnected():
        await anyio.sleep(0.1)
    gone.set()


def _api_key_check(api_key: Optional[str]):
    """A dependency that wants ``Authorization: Bearer <api_key>`` (nothing when no key is set)."""

    async def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(
                401,
                "invalid or missing API key: send the header 'Authorization: Bearer KEY' (the key of dera-serve "
                "--api-key; the openai client's api_key)",
                code="invalid_api_key",
            )

    return check
