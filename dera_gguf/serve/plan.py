"""What a request decoded in a batch takes (several choices, or one answer on a slot), made as a
one-answer call on the engine makes it.

The prompt (chat template included) and stop strings come from the engine's own rules
(:meth:`~dera_gguf.DeRaLlama.prompt_tokens`, :meth:`~dera_gguf.DeRaLlama.chat_prompt`); each choice
is a :class:`~dera_gguf.batch.sequence.Sequence` with the request's sampling settings in a seeded
llama.cpp chain, its bias, its log-prob count, the stop rule of its text, and the answer's length,
so with greedy decoding each choice is the answer the engine gives alone at its λ (up to
llama.cpp's batch-shape rounding). Seeds: with a λ list every choice draws with the request's
``seed`` (a choice is that request at its λ, and the λ are compared on the same random numbers);
``n`` samples of one λ draw with ``seed``, ``seed + 1``, ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

from .. import checks
from ..batch.sequence import Sequence
from ..batch.text import ChoiceText
from ..blend import mixing_weights
from ..errors import ContextFullError
from ..sampling.chains import new_chain
from ..sampling.settings import Sampling
from .catalog import Asked
from .errors import ApiError
from .logprobs import LogprobShape, pieces_of
from .schema import TEMPLATE_CONTEXT, ChatRequest, Request, check_logit_bias, given
from .shapes import Shape


@dataclass
class Plan:
    """A request's prompt, its choices and their texts, the answer's length and its shapes."""

    prompt: List[int]
    choices: List[Sequence]
    max_tokens: int
    texts: List[ChoiceText]
    shape: Shape
    stream: bool


def plan(asked: Asked, body: Request, kwargs: dict) -> Plan:
    """The choices of ``body`` (its call arguments ``kwargs``, its λ in ``asked``)."""
    llm = asked.pair.llm
    check_logit_bias(body, llm.n_vocab())
    bias = {int(k): float(v) for k, v in (given(body, "logit_bias") or {}).items()}
    prompt, stop = prompt_and_stops(llm, body, kwargs)
    if len(prompt) >= llm.context_size:
        raise ContextFullError(f"the prompt is {len(prompt)} tokens; the context holds {llm.context_size} (n_ctx)")
    settings = Sampling(**{k: kwargs[k] for k in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty")})
    extra = dict(
        frequency_penalty=kwargs.get("frequency_penalty") or 0.0,
        presence_penalty=kwargs.get("presence_penalty") or 0.0,
        n_vocab=llm.n_vocab(),
        penalty_last_n=llm.last_n_tokens_size,
    )
    seed, n_aligned = int(kwargs["seed"]), len(llm.pair_files.aligned)
    keep = kept_logprobs(body, kwargs)
    max_tokens = min(kwargs["max_tokens"], llm.context_size - len(prompt))
    choices, texts = [], []
    for i, lam in enumerate(asked.lams):
        chain = new_chain(settings, seed if asked.lam_list else (seed + i) % 2**32, **extra)
        text = ChoiceText(lambda t: llm.detokenize(t, prev_tokens=prompt), stop)
        rule = lambda seq, text=text: text.update(seq.tokens) == "stop"  # a stop string found ends it here
        choices.append(Sequence(mixing_weights(lam, n_aligned), chain, max_tokens, bias, keep, rule, prompt=prompt))
        texts.append(text)
    shape = Shape(asked, body, len(prompt), given(body, "stream_options") if kwargs.get("stream") else None)
    if keep is not None:
        shape.logprobs = _logprob_shape(llm, body, kwargs, prompt)
    return Plan(prompt, choices, max_tokens, texts, shape, bool(kwargs.get("stream")))


def prompt_and_stops(llm: Any, body: Request, kwargs: dict) -> tuple:
    """The prompt tokens and stop strings of a one-answer call with ``kwargs``, made as it makes them."""
    stop = kwargs.get("stop") or []
    stop = [stop] if isinstance(stop, str) else list(stop)
    if isinstance(body, ChatRequest):
        context = {k: kwargs[k] for k in TEMPLATE_CONTEXT if kwargs.get(k) is not None}
        return llm.chat_prompt(kwargs["messages"], stop, **context)
    prompt = kwargs["prompt"]
    if isinstance(prompt, list):
        checks.check_prompt(prompt, llm.n_vocab(), llm.context_size, llm.tokenize)
        return list(prompt), stop
    if not prompt:
        raise ApiError(400, "prompt is empty: give some text to continue", "prompt")
    return llm.prompt_tokens(prompt), stop


def kept_logprobs(body: Request, kwargs: dict) -> Optional[int]:
    """How many top log-probs each token keeps (None: none), as a one-answer call reads the request:
    a count for completions; for chats ``top_logprobs`` when ``logprobs`` is true (llama-cpp-python's rule)."""
    if isinstance(body, ChatRequest):
        return kwargs.get("top_logprobs") if kwargs.get("logprobs") else None
    return kwargs.get("logprobs")


def _logprob_shape(llm: Any, body: Request, kwargs: dict, prompt: List[int]) -> LogprobShape:
    text_of = lambda tokens: llm.detokenize(list(tokens)).decode("utf-8", errors="ignore")
    written = kwargs.get("prompt")
    base = len(written) if isinstance(written, str) else len(text_of(prompt))
    return LogprobShape(isinstance(body, ChatRequest), pieces_of(llm, prompt), text_of, base)
