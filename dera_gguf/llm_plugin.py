"""An ``llm`` plugin (https://llm.datasette.io): every ready pair of models.toml as an ``llm`` model.

``llm -m smollm2-demo -o lam 1.5 "Explain rainbows"`` answers with
``DeRaLlama.from_pair("smollm2-demo").create_chat_completion`` at λ 1.5; ``llm chat`` keeps the
conversation in llm's own log and sends all of it each turn. A model's id is the pair's name
(alias ``dera/NAME``); a pair is listed when its files are on disk (``dera-pull NAME`` gets the
others). λ and the sampling settings are ``-o`` options, checked by llm's pydantic options before
anything loads; unset ones are the paper's settings (:class:`~dera_gguf.sampling.settings.Sampling`), as in
dera-chat. A pair is loaded once per process, on its first prompt, and kept for the next turns.

Registered through ``[project.entry-points.llm]`` in pyproject.toml; named ``llm_plugin`` so that
``import llm`` finds the llm package.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Dict, Iterator, List, Optional, Tuple, Union

import click
import llm
from llm.parts import ReasoningPart, TextPart
from pydantic import Field, ValidationInfo, field_validator

from dera_gguf import ContextFullError, DeRaError, DeRaLlama
from dera_gguf.blend import normalize_lam, parse_lams
from dera_gguf.pairs.registry import Pair, load_registry
from dera_gguf.sampling.settings import Sampling

ALIAS_PREFIX = "dera/"
# How a pair is loaded: dera-chat's defaults (a chat's whole history must fit n_ctx; all layers on a GPU if any).
N_CTX = 4096
LOAD_KWARGS = dict(n_gpu_layers=-1, verbose=False)
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "max_tokens", "seed")

# pair name -> (its files, template and n_ctx; the DeRaLlama loaded on them), kept for the whole process
_loaded: Dict[str, Tuple[tuple, DeRaLlama]] = {}
_warned = False


@llm.hookimpl
def register_models(register):
    """Register every pair whose files are all on disk; a broken models.toml is said once, not raised."""
    for pair in ready_pairs():
        register(DeRa(pair), aliases=[ALIAS_PREFIX + pair.name])


def ready_pairs() -> List[Pair]:
    """The pairs of models.toml (shipped, ``$DERA_HOME``, ``$DERA_MODELS``) whose files are present now."""
    global _warned
    try:
        registry = load_registry()
    except DeRaError as e:
        if not _warned:
            click.echo(f"dera-gguf: no DeRa models registered: {e}", err=True)
            _warned = True
        return []
    return [pair for pair in registry.pairs.values() if not pair.missing()]


class DeRaOptions(llm.Options):
    """λ and the sampling settings of one prompt; unset ones are the pair's λ and the paper's settings."""

    n_aligned: ClassVar[int] = 1  # the pair's aligned models: how many λ values it takes

    lam: Optional[Union[float, List[float]]] = Field(
        default=None,
        description="λ: 0 is the reference (SFT) model, 1 the aligned one, above 1 stronger alignment; a comma "
        "list (0.5,1) gives one per aligned model. Default: the pair's lam in models.toml, else 1.",
    )
    temperature: Optional[float] = Field(default=None, description="Sampling temperature (0: greedy). Default 0.7.")
    top_k: Optional[int] = Field(default=None, description="Top-k (0: off). Default 50.")
    top_p: Optional[float] = Field(default=None, description="Top-p, nucleus sampling. Default 0.95.")
    min_p: Optional[float] = Field(default=None, description="Min-p (0: off). Default 0.")
    repeat_penalty: Optional[float] = Field(default=None, description="Repeat penalty (1: off). Default 1.")
    max_tokens: Optional[int] = Field(default=None, description="Most tokens in an answer. Default 256.")
    seed: Optional[int] = Field(
        default=None, description="Sampling seed, for reproducible answers. Default: a fresh seed per answer."
    )
    n_ctx: Optional[int] = Field(
        default=None,
        ge=16,
        description=f"Context length in tokens: the whole conversation and the answer must fit. Default {N_CTX}; "
        "another value reloads the pair.",
    )

    @field_validator("lam", mode="before")
    @classmethod
    def check_lam(cls, value: Any) -> Any:
        """``"1.5"`` or ``"0.5,1"`` (as ``-o lam`` gives it) or numbers: one finite λ per aligned model."""
        if value is None:
            return None
        text = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
        lam = normalize_lam(parse_lams(text), cls.n_aligned)
        return list(lam) if isinstance(lam, tuple) else lam

    @field_validator(*SAMPLING_FIELDS)
    @classmethod
    def check_setting(cls, value: Any, info: ValidationInfo) -> Any:
        """A sampling value checked as dera-chat checks it (named, before anything loads)."""
        if value is not None:
            Sampling(**{info.field_name: value})
        return value

    def sampling(self) -> Sampling:
        """The settings given, the paper's for the others."""
        given = {name: getattr(self, name) for name in SAMPLING_FIELDS if getattr(self, name) is not None}
        return Sampling(**given)


def options_for(n_aligned: int) -> type:
    """The options class of a pair with ``n_aligned`` aligned models (λ takes that many values)."""
    return type("Options", (DeRaOptions,), {"n_aligned": n_aligned, "__module__": __name__})


class DeRa(llm.Model):
    """One pair of models.toml as an llm model: answers are ``DeRaLlama.create_chat_completion``'s."""

    can_stream = True

    def __init__(self, pair: Pair):
        self.pair = pair
        self.model_id = pair.name
        self.Options = options_for(len(pair.aligned))

    def llama(self, n_ctx: Optional[int] = None) -> DeRaLlama:
        """The pair's DeRaLlama (``n_ctx`` None: 4096), made as ``DeRaLlama.from_pair`` makes it
        (:meth:`~dera_gguf.pairs.registry.Pair.engine_args`: the pair's λ, chat template and drafter), loaded on
        first use and kept for the rest of the process; other arguments (another ``n_ctx``, changed
        files) replace it."""
        args = self.pair.engine_args(n_ctx=n_ctx or N_CTX, **LOAD_KWARGS)
        key = (args.reference, tuple(args.aligned), args.lam, tuple(sorted(args.llama_kwargs.items())))
        if _loaded.get(self.pair.name, (None,))[0] != key:
            _loaded.pop(self.pair.name, None)  # free the old one before loading
            engine = DeRaLlama(args.reference, args.aligned, lam=args.lam, **args.llama_kwargs)
            for note in engine.pair_files.notes:
                click.echo(note, err=True)
            _loaded[self.pair.name] = (key, engine)
        return _loaded[self.pair.name][1]

    def execute(self, prompt, stream, response, conversation) -> Iterator[str]:
        options = prompt.options
        sampling = options.sampling()
        seed = sampling.next_seed()
        messages = chat_messages(prompt)
        engine = self.llama(options.n_ctx)
        lam = engine.lam if options.lam is None else options.lam  # unset: the pair's λ, the engine's default
        kwargs = dict(sampling.call_kwargs(seed), lam=lam)
        record = {"lam": list(lam) if isinstance(lam, (list, tuple)) else lam, "seed": seed}
        try:
            yield from self._answer(engine, messages, kwargs, record, stream, response)
        except ContextFullError as e:
            raise ContextFullError(f"{e} (llm: a larger -o n_ctx, or a new conversation)") from None

    def _answer(self, engine, messages, kwargs, record, stream, response) -> Iterator[str]:
        if stream:
            finish = None
            for chunk in engine.create_chat_completion(messages, stream=True, **kwargs):
                choice = chunk["choices"][0]
                finish = choice.get("finish_reason") or finish
                text = choice["delta"].get("content")
                if text:
                    yield text
            response.response_json = {**record, "finish_reason": finish}
        else:
            out = engine.create_chat_completion(messages, **kwargs)
            choice, usage = out["choices"][0], out["usage"]
            response.response_json = {**record, "finish_reason": choice["finish_reason"]}
            response.set_usage(input=usage["prompt_tokens"], output=usage["completion_tokens"])
            yield choice["message"]["content"] or ""


def chat_messages(prompt) -> List[dict]:
    """The whole conversation as chat messages: llm's own chain for this turn (``prompt.messages``).

    llm builds it from its log: the earlier turns of ``llm chat`` in this process, or those read back
    for ``llm -c`` / ``--cid``, then this prompt; a system prompt given with the first turn stays first.
    Hidden reasoning is not sent back; tool calls and attachments (of a conversation begun with
    another model) are refused by name.
    """
    messages = []
    for message in prompt.messages:
        texts = []
        for part in message.parts:
            if isinstance(part, TextPart):
                texts.append(part.text)
            elif not isinstance(part, ReasoningPart):
                kind = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", type(part).__name__.removesuffix("Part")).lower()
                raise DeRaError(
                    f"the conversation holds a {kind} ({message.role} message): DeRa pairs answer text only; "
                    "start a new conversation"
                )
        messages.append({"role": message.role, "content": "".join(texts)})
    return messages
