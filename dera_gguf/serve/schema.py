"""Request bodies of the two generation routes, and the DeRaLlama call each one makes.

The bodies are llama-cpp-python's own request types (so every field it serves keeps its
name, type and range check) with three changes:

* an unknown field is refused by name (llama-cpp-python's types drop it silently, so a
  misspelt ``temprature`` would quietly sample at the default);
* ``lam`` (a number, or a list with one per aligned model) and ``stream_options`` are added;
* the defaults are not theirs: a field the request leaves out gets the paper's sampling
  settings (:class:`~dera_gguf.sampling.Sampling`, as in dera-chat), not
  llama-cpp-python's (temperature 0.8, top-k 40, min-p 0.05, repeat penalty 1.1).
"""

from __future__ import annotations

import math
from typing import Any, List, Literal, Optional, Union

import llama_cpp
import numpy as np
from llama_cpp.server.app import prepare_request_resources
from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
from pydantic import BaseModel, ConfigDict, Field

from .. import checks
from ..engine import MODES
from ..errors import DeRaError
from ..sampling import Sampling
from .errors import ApiError

LAM_FIELD = Field(
    default=None,
    description="Realignment strength for this request (a number, or a list with one per aligned model); "
    "wins over a PAIR@LAM model alias and the pair's default.",
)

MODE_FIELD = Field(
    default=None,
    description="'blend' (DeRa) or 'weights' (LoRA pairs: the adapter at scale lam, one forward pass, an "
    "approximation); default: dera-serve --mode.",
)

# Fields the server itself acts on; every other field a request sets goes to the engine by name.
SERVER_FIELDS = {
    "model",
    "lam",
    "mode",
    "n",
    "best_of",
    "user",  # an end-user id for the client's own records; nothing to do with generation
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "seed",
    "prompt",
    # handled by llama-cpp-python's prepare_request_resources
    "logit_bias",
    "logit_bias_type",
    "grammar",
    "min_tokens",
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatRequest(CreateChatCompletionRequest):
    """``POST /v1/chat/completions``."""

    model_config = ConfigDict(extra="forbid")
    lam: Any = LAM_FIELD
    mode: Optional[Literal[MODES]] = MODE_FIELD
    stream_options: Optional[StreamOptions] = None
    max_completion_tokens: Optional[int] = Field(None, description="OpenAI's newer name for max_tokens.")


class CompletionRequest(CreateCompletionRequest):
    """``POST /v1/completions``; the prompt may also be token ids, as in OpenAI's API."""

    model_config = ConfigDict(extra="forbid")
    prompt: Union[str, List[int], List[str]] = Field(default="", description="The prompt (text or token ids).")
    lam: Any = LAM_FIELD
    mode: Optional[Literal[MODES]] = MODE_FIELD
    stream_options: Optional[StreamOptions] = None


Request = Union[ChatRequest, CompletionRequest]


def given(body: Request, name: str) -> Any:
    """The value the request set for ``name``; None when left out (or sent as null)."""
    return getattr(body, name) if name in body.model_fields_set else None


def call_kwargs(body: Request, sampling: Sampling, logits_all: bool) -> dict:
    """DeRaLlama keyword arguments: the paper's defaults, then every field the request set.

    ``sampling.max_tokens`` is both the default and the cap (dera-serve --max-tokens);
    a request without a seed draws a fresh one unless the server has a fixed seed.
    """
    _check_unsupported(body, logits_all)
    seed = given(body, "seed")
    kwargs = sampling.call_kwargs(sampling.next_seed() if seed is None else seed)
    kwargs["max_tokens"] = _max_tokens(body, sampling.max_tokens)
    for name in body.model_fields_set - SERVER_FIELDS:
        if getattr(body, name) is not None:
            kwargs[name] = getattr(body, name)
    if isinstance(body, CompletionRequest):
        kwargs["prompt"] = _one_prompt(body.prompt)
    elif not body.messages:
        raise ApiError(400, "messages is empty: give at least one message", "messages")
    return kwargs


def _max_tokens(body: Request, cap: int) -> int:
    asked = given(body, "max_completion_tokens") if isinstance(body, ChatRequest) else None
    asked = asked if asked is not None else given(body, "max_tokens")
    if asked is None:
        return cap
    if asked < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {asked}", "max_tokens")
    return min(asked, cap)


def _one_prompt(prompt: Union[str, List[int], List[str]]) -> Union[str, List[int]]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) > 1:
            raise ApiError(400, f"one prompt per request, got a list of {len(prompt)}", "prompt")
        return prompt[0]
    return prompt


def _check_unsupported(body: Request, logits_all: bool) -> None:
    """Refuse what the engine would not do as asked, rather than do something else."""
    best_of = given(body, "best_of")  # (n > 1 is answered by .choices)
    if best_of not in (None, 1):
        raise ApiError(400, "best_of must be 1: dera-serve writes each answer it is asked for", "best_of")
    logprobs = given(body, "logprobs")  # a count for completions (0 asks too), a flag for chats
    if logprobs is not None and logprobs is not False and not logits_all:
        raise ApiError(
            400,
            "logprobs need the logits of every position: start dera-serve with --logprobs",
            "logprobs",
            "logprobs_off",
        )


def check_logit_bias(body: Request, n_vocab: int) -> None:
    """Token ids must lie in the vocabulary and biases be finite (llama.cpp would index out of range)."""
    bias = given(body, "logit_bias") or {}
    for key, value in bias.items():
        if not math.isfinite(value):
            raise ApiError(400, f"logit_bias[{key!r}] must be a finite number, got {value}", "logit_bias")
        if body.logit_bias_type != "tokens" and not (key.lstrip("-").isdigit() and 0 <= int(key) < n_vocab):
            raise ApiError(
                400,
                f"logit_bias key {key!r} is not a token id in [0, {n_vocab}) (or set logit_bias_type)",
                "logit_bias",
            )


def check_grammar(body: Request, llm: Any) -> None:
    """Parse a GBNF grammar with llama.cpp's own parser first: it returns NULL for a bad one,
    which llama-cpp-python 0.3.36 adds to the sampler chain anyway (a segfault)."""
    grammar = given(body, "grammar")
    if grammar is None:
        return
    try:
        checks.check_grammar(grammar, llama_cpp.llama_model_get_vocab(llm.model))
    except DeRaError as e:
        raise ApiError(400, f"grammar: {e}", "grammar") from None


def engine_call(llm: Any, body: Request, kwargs: dict) -> Any:
    """The DeRaLlama call for ``body`` (on a worker thread, holding the pair's engine).

    llama-cpp-python's ``prepare_request_resources`` turns logit_bias (ids or, with
    ``logit_bias_type="tokens"``, text), grammar and min_tokens into call arguments.
    """
    check_logit_bias(body, llm.n_vocab())
    check_grammar(body, llm)
    prepare_request_resources(body, lambda _model: llm, None, kwargs)
    _bias_as_processor(kwargs)
    if isinstance(body, ChatRequest):
        return llm.create_chat_completion(**kwargs)
    return llm.create_completion(**kwargs)


def _bias_as_processor(kwargs: dict) -> None:
    """Apply ``logit_bias`` as the last logits processor when there are others.

    llama-cpp-python 0.3.36 drops both when a call has the two
    (``logits_processor = logits_processor.extend(...)``, which is None), so a request
    with logit_bias and min_tokens or stream usage would sample unbiased. The processor
    is llama-cpp-python's own arithmetic (bias added to the logit), in the same place.
    """
    if kwargs.get("logit_bias") is None or not kwargs.get("logits_processor"):
        return
    bias = {int(k): float(v) for k, v in kwargs.pop("logit_bias").items()}
    ids, values = np.fromiter(bias, dtype=np.intp), np.fromiter(bias.values(), dtype=np.float64)

    def add_bias(input_ids, scores):
        biased = np.copy(scores)
        biased[ids] = scores[ids] + values  # in float64, then stored as float32, as llama-cpp-python does
        return biased

    kwargs["logits_processor"] = llama_cpp.LogitsProcessorList([*kwargs["logits_processor"], add_bias])


class TokenCount:
    """A logits processor that counts what a streamed answer's ``usage`` reports.

    llama-cpp-python puts usage only on whole answers; for a stream asked with
    ``stream_options.include_usage`` this counts the prompt (the tokens before the first
    sampling step) and the sampling steps. The step that drew the end-of-text token is
    not a completion token (as in llama-cpp-python's own count); an answer cut by a
    stop string counts one token less than llama-cpp-python would.
    """

    def __init__(self) -> None:
        self.prompt: Optional[int] = None
        self.steps = 0

    def __call__(self, input_ids, logits):
        if self.prompt is None:
            self.prompt = len(input_ids)
        self.steps += 1
        return logits

    def usage(self, finish_reason: Optional[str]) -> dict:
        prompt = self.prompt or 0
        completion = max(self.steps - (1 if finish_reason == "stop" else 0), 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def counted(kwargs: dict) -> TokenCount:
    """Add a :class:`TokenCount` to the call's logits processors and return it."""
    count = TokenCount()
    kwargs["logits_processor"] = llama_cpp.LogitsProcessorList([count])
    return count
