"""Request bodies of the two generation routes, and the DeRaLlama call each one makes.

The bodies are llama-cpp-python's own request types (so every field it serves keeps its
name, type and range check) with three changes:

* an unknown field is refused by name (llama-cpp-python's types drop it silently, so a
  misspelt ``temprature`` would quietly sample at the default);
* ``lam`` (a number, or a list with one per aligned model) and ``stream_options`` are added;
* the defaults are not theirs: a field the request leaves out gets the paper's sampling
  settings (:class:`~dera_gguf.sampling.settings.Sampling`, as in dera-chat), not
  llama-cpp-python's (temperature 0.8, top-k 40, min-p 0.05, repeat penalty 1.1).
"""

from __future__ import annotations

import json
import math
from typing import Any, List, Literal, Optional, Union

import llama_cpp
from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from ..runtime.pair import MODES
from ..sampling.settings import Sampling
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


# What a batched answer (several choices, a slot) honours as asked among the call's arguments; the fields
# in NEUTRAL it honours only at their neutral values (else the answer takes the engine, or a 400).
BATCHED = {"temperature", "top_k", "top_p", "min_p", "repeat_penalty", "frequency_penalty", "presence_penalty"}
BATCHED |= {"max_tokens", "seed", "stop", "stream", "messages", "prompt", "mirostat_tau", "mirostat_eta"}
BATCHED |= {"logprobs", "top_logprobs", "tools", "functions"}
NEUTRAL = {"mirostat_mode": (None, 0), "min_tokens": (None, 0), "echo": (None, False), "best_of": (None, 1)}
NEUTRAL.update({name: (None,) for name in ("grammar", "suffix", "response_format")})
NEUTRAL["logit_bias_type"] = (None, "input_ids")  # (token ids; text keys are for one answer)
# Tools the template shows the model are free text to decode; a tool the model must call is a grammar.
NEUTRAL.update({name: (None, "auto", "none") for name in ("tool_choice", "function_call")})
TEMPLATE_CONTEXT = ("tools", "tool_choice", "functions", "function_call")  # what a chat template sees besides messages


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

    @field_validator("messages", mode="before")
    @classmethod
    def _text_messages(cls, messages: Any) -> Any:
        return [text_message(m, i) for i, m in enumerate(messages)] if isinstance(messages, list) else messages

    @field_validator("response_format", mode="before")
    @classmethod
    def _structured_outputs(cls, response_format: Any) -> Any:
        return json_object_format(response_format)


class CompletionRequest(CreateCompletionRequest):
    """``POST /v1/completions``; the prompt may also be token ids, as in OpenAI's API."""

    model_config = ConfigDict(extra="forbid")
    prompt: Union[str, List[int], List[str], List[List[int]]] = Field(
        default="", description="The prompt: text or token ids, or a list of them (one answer each)."
    )
    lam: Any = LAM_FIELD
    mode: Optional[Literal[MODES]] = MODE_FIELD
    stream_options: Optional[StreamOptions] = None


Request = Union[ChatRequest, CompletionRequest]

PART_JOIN = "\n"  # between the text parts of one message (as vLLM joins them)


def text_message(message: Any, index: int) -> Any:
    """A message whose content is text, as llama-cpp-python's chat templates take it.

    OpenAI's content may be a list of parts: text parts are joined (:data:`PART_JOIN`); a part
    of another kind (an image, audio, a file) is refused naming it, since these models read text
    only. A null content (an assistant turn that only called tools) is the empty text.
    """
    if not isinstance(message, dict):
        return message
    content = message.get("content")
    if content is None and "content" in message:
        return {**message, "content": ""}
    if not isinstance(content, list):
        return message
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = f"a part of type {kind!r}" if isinstance(kind, str) else "not a {'type': 'text', 'text': ...} part"
            raise PydanticCustomError(
                "content_part",
                "messages[{index}].content[{j}] is {what}: these models read text only; send text parts or a string",
                {"index": index, "j": j, "what": what},
            )
        texts.append(part["text"])
    return {**message, "content": PART_JOIN.join(texts)}


def json_object_format(response_format: Any) -> Any:
    """OpenAI's structured outputs (``{"type": "json_schema", "json_schema": {"schema": ...}}``) as
    llama-cpp-python's JSON mode with that schema (``{"type": "json_object", "schema": ...}``): its
    chat handlers turn the schema into a grammar. A schema that cannot become one is refused."""
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return response_format
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or set(spec) - {"name", "description", "schema", "strict"}:
        raise PydanticCustomError(
            "json_schema",
            "response_format.json_schema must be an object with name, schema and optionally description, strict",
        )
    schema = spec.get("schema")
    if schema is None:
        return {"type": "json_object"}
    check_json_schema(schema)
    return {"type": "json_object", "schema": schema}


def check_json_schema(schema: Any) -> None:
    """A JSON schema that llama-cpp-python's converter turns into a grammar llama.cpp parses."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # the converter raises what it meets (KeyError, ValueError, RecursionError, ...)
        raise PydanticCustomError(
            "json_schema",
            "response_format's schema cannot be turned into a grammar ({error}): check the schema",
            {"error": f"{type(e).__name__}: {e}"},
        ) from None


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


def unbatchable(body: "Request", kwargs: dict, mode: str) -> Optional[str]:
    """The first field of ``body`` (call arguments ``kwargs``, ``mode`` in effect) that a batched answer
    cannot honour as asked; None when it honours them all."""
    unknown = sorted(set(kwargs) - BATCHED - set(NEUTRAL))
    if unknown:
        return unknown[0]
    for name, allowed in NEUTRAL.items():
        if name in body.model_fields_set and getattr(body, name, None) not in allowed:
            return name
    return "mode" if mode != "blend" else None


def _max_tokens(body: Request, cap: int) -> int:
    asked = given(body, "max_completion_tokens") if isinstance(body, ChatRequest) else None
    asked = asked if asked is not None else given(body, "max_tokens")
    if asked is None:
        return cap
    if asked < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {asked}", "max_tokens")
    return min(asked, cap)


def _one_prompt(prompt: Union[str, List[int], List[str], List[List[int]]]) -> Union[str, List[int]]:
    """The prompt of a request with one (several are split before: :mod:`.prompts`); never empty."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) > 1:
            raise ApiError(400, f"one prompt per call, got a list of {len(prompt)}", "prompt")
        prompt = prompt[0]
    if not len(prompt):
        raise ApiError(400, "prompt is empty: give some text (or token ids) to continue", "prompt")
    return prompt


def _check_unsupported(body: Request, logits_all: bool) -> None:
    """Refuse what the engine would not do as asked, rather than do something else."""
    best_of = given(body, "best_of")  # (n > 1 is answered by .choices)
    if best_of not in (None, 1):
        raise ApiError(400, "best_of must be 1: dera-serve writes each answer it is asked for", "best_of")
    if given(body, "echo") and given(body, "stream"):
        raise ApiError(400, "echo is for whole answers: leave out stream (or echo)", "echo")
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
