"""A call's prompt as llama-cpp-python makes it: one home for its rules, for fronts that decode apart.

Several choices, dera-serve's slots and the tokenizer routes decode prompts outside
``Llama.create_completion``; to give the answer a one-answer call gives, they must see the
tokens that call would: a completion's BOS (or CLS) and EOS (or SEP) by the model's flags,
special tokens parsed; a chat's messages rendered by the very chat handler the call would use
(its template, its stop strings). These read llama-cpp-python's internals (``_model``,
``_chat_handlers``), as DeRaLlama's seams do; pyproject.toml pins the release line they are
tested on. A Jinja chat template is made into llama-cpp-python's formatter here too.
"""

from __future__ import annotations

from typing import Any, List, Sequence, Tuple

from llama_cpp import Llama, llama_chat_format
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from ..errors import DeRaError


def completion_tokens(llm: Llama, prompt: str) -> List[int]:
    """The tokens ``create_completion(prompt)`` decodes for a text prompt (no suffix)."""
    model = llm._model
    bos = model.token_cls() if model.token_cls() != -1 else llm.token_bos()
    tokens = [bos] if model.add_bos_token() and bos != -1 else []
    tokens += llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    sep = model.token_sep()
    if model.add_eos_token() or sep != -1:
        tokens.append(sep if sep != -1 else llm.token_eos())
    return tokens


class _Captured(Exception):
    def __init__(self, kwargs: dict):
        super().__init__("captured")
        self.kwargs = kwargs


class _Recorder:
    """The engine as a chat handler sees it, except that its completion call is recorded, not made."""

    def __init__(self, llm: Llama):
        self._llm = llm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def create_completion(self, **kwargs: Any):
        raise _Captured(kwargs)


def chat_tokens(llm: Llama, messages: list, stop: Sequence[str] = (), **context: Any) -> Tuple[List[int], List[str]]:
    """The prompt tokens and stop strings of ``create_chat_completion(messages, stop=stop, **context)``: the
    chat handler it would use renders them (its template, its own stop strings added). ``context``: what
    else the template sees (``tools``, ``tool_choice``, ``functions``, ``function_call``); a call the
    handler would constrain (a grammar: a tool it must call) is refused, as its answer is not free text."""
    handler = (
        llm.chat_handler
        or llm._chat_handlers.get(llm.chat_format)
        or llama_chat_format.get_chat_completion_handler(llm.chat_format)
    )
    try:
        handler(llama=_Recorder(llm), messages=messages, stop=list(stop), **context)
    except _Captured as call:
        if call.kwargs.get("grammar") is not None:
            raise DeRaError("the chat handler constrains this answer (a grammar, e.g. a tool it must call)") from None
        stops = call.kwargs.get("stop") or []
        prompt = call.kwargs["prompt"]
        tokens = list(prompt) if isinstance(prompt, list) else completion_tokens(llm, prompt)
        return tokens, [stops] if isinstance(stops, str) else list(stops)
    raise DeRaError("the chat handler answered without a completion call: its prompt cannot be read")


def jinja_formatter(template: str, model) -> Jinja2ChatFormatter:
    """llama-cpp-python's Jinja chat formatter on ``template``, with ``model``'s BOS and EOS texts (a
    ``llama_cpp._internals.LlamaModel``), stopping at its EOS token, as llama-cpp-python makes one."""
    text = lambda t: model.token_get_text(t) if t >= 0 else ""
    eos, bos = model.token_eos(), model.token_bos()
    return Jinja2ChatFormatter(template=template, eos_token=text(eos), bos_token=text(bos), stop_token_ids=[eos])
