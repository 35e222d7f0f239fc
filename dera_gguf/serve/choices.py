"""Several choices in one request: ``"lam": [0, 1, 1.5, 2]`` (one choice per λ) or ``"n": 4`` (samples).

``choices[i]`` is answered at ``lam[i]`` and says so (its ``"lam"`` field). The prompt is
decoded once per model and shared by one sequence per choice; every step decodes all
choices together, one batch per model (:mod:`dera_gguf.choices`), on contexts of the
pair made for this the first time a request asks (:class:`ChoiceEngine`, on the pair's
loaded weights). The prompt (chat template included), stop strings, ``max_tokens``,
``finish_reason`` and the text are made as a one-answer request makes them, so with
greedy decoding each choice is the answer a request at its λ alone would get (up to
llama.cpp's batch-shape rounding).

Seeds: with a λ list every choice draws with the request's ``seed`` (a choice is that
request at its λ, and the λ are compared on the same random numbers); ``n`` samples of
one λ draw with ``seed``, ``seed + 1``, ... Log-probs are each choice's own (:mod:`.logprobs`). What a
choice cannot honour (echo, grammars, tools, text-keyed logit bias) is refused with a 400 naming the field.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional

import llama_cpp
from llama_cpp import llama_chat_format

from .. import checks
from ..batch.sequence import Sequence
from ..batch.together import decode_together
from ..blend import Lam, mixing_weights
from ..engine import PairRuntime
from ..errors import ContextFullError, DeRaError, Stopped
from ..samplers import new_chain
from ..sampling import Sampling
from .catalog import Catalog, ServedPair
from .errors import ApiError
from .logprobs import LogprobShape, pieces_of
from .schema import ChatRequest, Request, call_kwargs, check_logit_bias, given
from .text import ChoiceText

# what call_kwargs may hand on that a choice honours; fields that must keep their neutral value
HONOURED = {"temperature", "top_k", "top_p", "min_p", "repeat_penalty", "frequency_penalty", "presence_penalty"}
HONOURED |= {"max_tokens", "seed", "stop", "stream", "messages", "prompt", "mirostat_tau", "mirostat_eta"}
HONOURED |= {"logprobs", "top_logprobs"}
NEUTRAL = {"mirostat_mode": (None, 0), "min_tokens": (None, 0), "echo": (None, False)}
NEUTRAL.update({name: (None,) for name in ("grammar", "suffix")})
NEUTRAL["logit_bias_type"] = (None, "input_ids")  # (token ids; text keys are for one answer)
NEUTRAL.update({name: (None,) for name in ("functions", "function_call", "tools", "tool_choice", "response_format")})
NEUTRAL["best_of"] = (None, 1)


@dataclass
class Several:
    """What a request with several choices asks: the pair, the model id to echo, each choice's λ."""

    pair: ServedPair
    model: str
    lams: List[Lam]
    lam_list: bool  # one λ per choice (one seed for all); else n samples of one λ (seed, seed + 1, ...)


def several(catalog: Catalog, body: Request, cap: int, mode: str) -> Optional[Several]:
    """The choices ``body`` asks for, checked; None for one answer at one λ (the one-answer path)."""
    pair, _ = catalog.find(body.model)
    listed = catalog.lam_list(pair, given(body, "lam"))
    n = given(body, "n")
    if listed is None and n in (None, 1):
        return None
    if n is not None and n < 1:
        raise ApiError(400, f"n must be at least 1, got {n}", "n")
    if listed is not None and n is not None and n != len(listed):
        raise ApiError(
            400, f"lam has {len(listed)} values but n is {n}: give one lam per choice, or leave n out", "lam"
        )
    lams = listed if listed is not None else [catalog.resolve(body.model, given(body, "lam")).lam] * n
    if len(lams) > cap:
        raise ApiError(
            400,
            f"n must be at most {cap} (the choices one request may ask for: dera-serve --max-choices), got {len(lams)}",
            "n",
        )
    for name, allowed in NEUTRAL.items():
        if name in body.model_fields_set and getattr(body, name, None) not in allowed:
            raise ApiError(
                400,
                f"{name} is not supported with several choices (n > 1 or a lam list): send one request per answer",
                name,
            )
    if (given(body, "mode") or mode) != "blend":
        raise ApiError(
            400,
            "mode 'weights' runs one lam per context: several choices need mode 'blend' (or one request each)",
            "mode",
        )
    return Several(pair, body.model or pair.name, lams, listed is not None)


class ChoiceEngine:
    """The pair's contexts for several sequences (``n_seq``, each of up to ``max_tokens`` new tokens
    after a prompt that fits the pair's n_ctx), on the DeRaLlama's loaded weights and settings."""

    def __init__(self, llm: Any, n_seq: int, max_tokens: int):
        self.llm = llm
        n_ctx = llm._n_ctx + (n_seq - 1) * max_tokens
        self.runtime = PairRuntime.for_sequences(
            llm.runtime.models, llm.context_params, n_ctx, n_seq, llm.runtime.threads
        )
        self._stop: Callable[[], bool] = lambda: False

    @contextlib.contextmanager
    def stopping(self, when: Callable[[], bool]):
        """Within it every decode first asks ``when()``; true ends the call with Stopped (as DeRaLlama's)."""
        self._stop = when
        try:
            yield self
        finally:
            self._stop = lambda: False

    def check_stop(self) -> None:
        if self._stop():
            raise Stopped("the call was stopped before its next decode")

    def close(self) -> None:
        self.runtime.close()


def engine_of(pair: ServedPair, cap: int, max_tokens: int) -> ChoiceEngine:
    """The pair's ChoiceEngine, made the first time (holding the pair's lock)."""
    if pair.choices is None:
        pair.choices = ChoiceEngine(pair.llm, cap, max_tokens)
    return pair.choices


def prompt_and_stops(llm: Any, body: Request, kwargs: dict) -> tuple:
    """The prompt tokens and stop strings of a one-answer call with ``kwargs``, made as it makes them."""
    stop = kwargs.get("stop") or []
    stop = [stop] if isinstance(stop, str) else list(stop)
    if isinstance(body, ChatRequest):
        return chat_prompt(llm, kwargs["messages"], stop)
    prompt = kwargs["prompt"]
    if isinstance(prompt, list):
        checks.check_prompt(prompt, llm.n_vocab(), llm._n_ctx, llm.tokenize)
        return list(prompt), stop
    if not prompt:
        raise ApiError(400, "prompt is empty: give some text to continue", "prompt")
    bos = llm._model.token_cls() if llm._model.token_cls() != -1 else llm.token_bos()
    tokens = [bos] if llm._model.add_bos_token() and bos != -1 else []
    tokens += llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    sep = llm._model.token_sep()
    if llm._model.add_eos_token() or sep != -1:
        tokens.append(sep if sep != -1 else llm.token_eos())
    return tokens, stop


class _Captured(Exception):
    def __init__(self, kwargs: dict):
        super().__init__("captured")
        self.kwargs = kwargs


class _Recorder:
    """The engine as a chat handler sees it, except that its completion call is recorded, not made."""

    def __init__(self, llm: Any):
        self._llm = llm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def create_completion(self, **kwargs: Any):
        raise _Captured(kwargs)


def chat_prompt(llm: Any, messages: list, stop: List[str]) -> tuple:
    """The prompt tokens and stop strings of ``messages``, rendered by the chat handler a one-answer chat uses
    (its template, its stop strings)."""
    handler = (
        llm.chat_handler
        or llm._chat_handlers.get(llm.chat_format)
        or llama_chat_format.get_chat_completion_handler(llm.chat_format)
    )
    try:
        handler(llama=_Recorder(llm), messages=messages, stop=stop)
    except _Captured as call:
        stops = call.kwargs.get("stop") or []
        return list(call.kwargs["prompt"]), [stops] if isinstance(stops, str) else list(stops)
    raise DeRaError("the chat handler answered without a completion call: several choices cannot use it")


@dataclass
class Plan:
    """What decoding a request's choices takes, made as a one-answer call makes it: the prompt (chat
    template included), the choices (weights, seeded chains, bias), the answer's length, and its
    text and shapes."""

    prompt: List[int]
    choices: List[Sequence]
    max_tokens: int
    texts: List[ChoiceText]
    shape: "Shape"
    stream: bool


def plan(several: Several, body: Request, kwargs: dict) -> Plan:
    """The choices of ``body`` (its call arguments ``kwargs``), checked; a 400 names what they cannot honour."""
    llm = several.pair.llm
    unknown = sorted(set(kwargs) - HONOURED - set(NEUTRAL))
    if unknown:
        raise ApiError(
            400, f"{unknown[0]} is not supported with several choices: send one request per answer", unknown[0]
        )
    check_logit_bias(body, llm.n_vocab())
    bias = {int(k): float(v) for k, v in (given(body, "logit_bias") or {}).items()}
    prompt, stop = prompt_and_stops(llm, body, kwargs)
    if len(prompt) >= llm._n_ctx:
        raise ContextFullError(f"the prompt is {len(prompt)} tokens; the context holds {llm._n_ctx} (n_ctx)")
    settings = Sampling(**{k: kwargs[k] for k in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty")})
    extra = dict(
        frequency_penalty=kwargs.get("frequency_penalty") or 0.0,
        presence_penalty=kwargs.get("presence_penalty") or 0.0,
        n_vocab=llm.n_vocab(),
        penalty_last_n=llm.last_n_tokens_size,
    )
    seed, n_aligned = int(kwargs["seed"]), len(llm.pair_files.aligned)
    keep = kept_logprobs(body, kwargs)
    max_tokens = min(kwargs["max_tokens"], llm._n_ctx - len(prompt))
    choices, texts = [], []
    for i, lam in enumerate(several.lams):
        chain_seed = seed if several.lam_list else (seed + i) % 2**32
        chain = new_chain(settings, chain_seed, **extra)
        text = ChoiceText(lambda t: llm.detokenize(t, prev_tokens=prompt), stop)
        rule = lambda seq, text=text: text.update(seq.tokens) == "stop"  # a stop string found ends it here
        weights = mixing_weights(lam, n_aligned)
        choices.append(Sequence(weights, chain, max_tokens, bias, keep, rule, prompt=prompt))
        texts.append(text)
    shape = Shape(several, body, len(prompt), given(body, "stream_options") if kwargs.get("stream") else None)
    if keep is not None:
        shape.logprobs = _logprob_shape(llm, body, kwargs, prompt)
    return Plan(prompt, choices, max_tokens, texts, shape, bool(kwargs.get("stream")))


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


def is_eog_of(llm: Any) -> Callable[[int], bool]:
    """Whether a token ends the text, by the model's vocabulary."""
    return lambda t: bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, t))


def run_choices(several: Several, body: Request, defaults: Sampling, cap: int, logits_all: bool) -> Any:
    """The answer to ``body`` (holding the pair's lock, on a worker thread): a dict, or for a stream a lazy
    iterator of chunks (its first ``next`` decodes the prompt and draws the first tokens)."""
    p = plan(several, body, call_kwargs(body, defaults, logits_all))
    engine = engine_of(several.pair, cap, defaults.max_tokens)
    llm = several.pair.llm
    steps = decode_together(engine.runtime, p.prompt, p.choices, is_eog_of(llm), engine.check_stop)
    if not p.stream:
        for _ in steps:
            pass
        return p.shape.whole(p.choices, p.texts)
    return p.shape.stream(p.choices, p.texts, steps)  # lazy: the stream draws its first chunk while watched


class Shape:
    """OpenAI's shapes of an answer with several choices (chat or text completion, whole or streamed)."""

    def __init__(self, several: Several, body: Request, n_prompt: int, options: Any):
        self.chat = isinstance(body, ChatRequest)
        self.lams, self.model, self.n_prompt = several.lams, several.model, n_prompt
        self.usage_chunk = bool(options is not None and options.include_usage)
        self.logprobs: Optional[LogprobShape] = None  # set when the choices keep log-probs
        self.reported: dict = {}  # per choice: tokens whose log-probs a stream has sent
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _usage(self, choices: List[Sequence]) -> dict:
        completion = sum(len(c.tokens) for c in choices)
        return {
            "prompt_tokens": self.n_prompt,
            "completion_tokens": completion,
            "total_tokens": self.n_prompt + completion,
        }

    def _logprobs(self, i: int, choice: Sequence, chunk: bool) -> Optional[dict]:
        """The choice's log-probs: all of them, or for a chunk those its stream has not sent yet."""
        if self.logprobs is None:
            return None
        start = self.reported.get(i, 0) if chunk else 0
        self.reported[i] = len(choice.scored)
        return self.logprobs.of(choice, start)

    def _choice(self, i: int, text: str, finish: Optional[str], chunk: bool, first: bool = False) -> dict:
        if not self.chat:
            body = {"text": text}
        elif chunk and first:
            body = {"delta": {"role": "assistant"}}
        elif chunk:
            body = {"delta": {"content": text} if text else {}}
        else:
            body = {"message": {"role": "assistant", "content": text}}
        return {"index": i, **body, "logprobs": None, "finish_reason": finish, "lam": self.lams[i]}

    def whole(self, choices: List[Sequence], texts: List[ChoiceText]) -> dict:
        rows = [
            dict(self._choice(i, t.text, c.finish, False), logprobs=self._logprobs(i, c, False))
            for i, (c, t) in enumerate(zip(choices, texts))
        ]
        return {**self._head(False), "choices": rows, "usage": self._usage(choices)}

    def stream(self, choices: List[Sequence], texts: List[ChoiceText], steps: Iterator[List[int]]) -> Iterator[dict]:
        """A chunk per choice and step that has news (for chats a first chunk per choice with the role)."""
        first = True
        for moved in steps:
            yield from self.step(choices, texts, moved, first)
            first = False
        if self.usage_chunk:
            yield self.usage(choices)

    def step(self, choices: List[Sequence], texts: List[ChoiceText], moved: List[int], first: bool) -> List[dict]:
        """The chunks of one step (``moved``: the choices that drew; texts updated)."""
        chunks = []
        if first and self.chat:
            chunks += [
                {**self._head(True), "choices": [self._choice(i, "", None, True, first=True)]}
                for i in range(len(choices))
            ]
        for i in moved:
            finish = choices[i].finish
            text = texts[i].delta(final=finish is not None)
            if text or finish is not None:
                row = dict(self._choice(i, text, finish, True), logprobs=self._logprobs(i, choices[i], True))
                chunks.append({**self._head(True), "choices": [row]})
        return chunks

    def usage(self, choices: List[Sequence]) -> dict:
        """The closing chunk of ``stream_options.include_usage``."""
        return {**self._head(True), "choices": [], "usage": self._usage(choices)}
