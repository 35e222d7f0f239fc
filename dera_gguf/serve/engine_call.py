"""The engine's call for a one-answer request: what llama-cpp-python's server does before calling a Llama.

Bias (token ids or text), grammar and ``min_tokens`` become call arguments as in
llama-cpp-python's ``prepare_request_resources``; a grammar is parsed by llama.cpp first;
``echo`` on completions is answered by :mod:`.echo`.
"""

from __future__ import annotations

from typing import Any

import llama_cpp
import numpy as np
from llama_cpp.server.app import prepare_request_resources

from .. import checks
from ..blend import add_bias
from ..errors import DeRaError
from .echo import answer_with_echo
from .errors import ApiError
from .schema import ChatRequest, Request, check_logit_bias, given


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
    if kwargs.get("echo"):
        return answer_with_echo(llm, body, kwargs)
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
    biased = lambda input_ids, scores: add_bias(np.copy(scores), bias)
    kwargs["logits_processor"] = llama_cpp.LogitsProcessorList([*kwargs["logits_processor"], biased])
