"""Several choices in one request: ``"lam": [0, 1, 1.5, 2]`` (one choice per λ) or ``"n": 4`` (samples).

``choices[i]`` is answered at ``lam[i]`` and says so (its ``"lam"`` field). The prompt is
decoded once per model and shared by one sequence per choice; every step decodes all
choices together, one batch per model (:func:`~dera_gguf.batch.together.decode_together`),
on contexts of the pair made for this the first time a request asks (on the pair's loaded
weights). What the choices decode is made as a one-answer call makes it (:mod:`.plan`). What a
batch cannot honour (echo, grammars, tools, text-keyed logit bias, mode ``weights``) is
refused with a 400 naming the field.
"""

from __future__ import annotations

from typing import Any, Callable

from ..batch.together import decode_together
from ..errors import Stopped
from .catalog import Asked, ServedPair
from .errors import ApiError
from .plan import plan
from .schema import Request, unbatchable


def check_several(asked: Asked, body: Request, kwargs: dict) -> None:
    """Refuse, naming it, what several choices cannot honour as asked."""
    name = unbatchable(body, kwargs, asked.mode)
    if name == "mode":
        message = "mode 'weights' runs one lam per context: several choices need mode 'blend' (or one request each)"
        raise ApiError(400, message, "mode")
    if name is not None:
        message = f"{name} is not supported with several choices (n > 1 or a lam list): send one request per answer"
        raise ApiError(400, message, name)


def runtime_of(pair: ServedPair, cap: int, max_tokens: int) -> Any:
    """The pair's contexts for several choices (``cap`` sequences of up to ``max_tokens`` new tokens after a
    prompt that fits the pair's context), made the first time (holding the pair's lock)."""
    if pair.choices is None:
        llm = pair.llm
        pair.choices = llm.sequences(cap, llm.context_size + (cap - 1) * max_tokens)
    return pair.choices


def run_choices(asked: Asked, body: Request, kwargs: dict, cap: int, max_tokens: int, stopped: Callable[[], bool]):
    """The answer to ``body`` (holding the pair's lock, on a worker thread): a dict, or for a stream a lazy
    iterator of chunks (its first ``next`` decodes the prompt and draws the first tokens). Every decode
    first asks ``stopped()``: true ends the call with :class:`Stopped`."""
    p = plan(asked, body, kwargs)

    def check() -> None:
        if stopped():
            raise Stopped("the call was stopped before its next decode")

    runtime = runtime_of(asked.pair, cap, max_tokens)
    steps = decode_together(runtime, p.prompt, p.choices, asked.pair.llm.is_eog, check)
    if not p.stream:
        for _ in steps:
            pass
        return p.shape.whole(p.choices, p.texts)
    return p.shape.stream(p.choices, p.texts, steps)  # lazy: the stream draws its first chunk while watched
