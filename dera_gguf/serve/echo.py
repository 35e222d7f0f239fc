"""``echo: true`` on ``/v1/completions``: the answer after its prompt, with the prompt's log-probs.

lm-evaluation-harness scores a continuation so: it sends context + continuation with
``echo``, ``logprobs`` and ``max_tokens: 1`` and sums the log-probs of the tokens after the
context. Here the prompt's log-probs are those of the blend at the request's λ: every prompt
row the engine decoded is blended (``logits_all``), row ``i`` predicting token ``i + 1``.

The shape is llama-cpp-python's server's (OpenAI's legacy one): ``tokens``, ``text_offset``
(characters into the echoed text), ``token_logprobs`` and ``top_logprobs`` per token, the
first token's two null. A text prompt is echoed without the BOS the model adds (as
llama-cpp-python does); a token-id prompt is echoed token for token as it was sent, so a
client that counts its context in tokens finds the continuation where it put it.
llama-cpp-python's own echo is not used: it shifts the log-probs by one position on a
prompt without BOS and fails on a token-id prompt.

An answer that ends at once (its first token ends the text) still lists that token, last,
as OpenAI's and vLLM's echo do: lm-eval drops the last entry as the generated one, and
llama-cpp-python, which lists no such token, makes it drop the continuation's last token
instead. Which end-of-text token was drawn is not returned by llama-cpp-python: the most
likely one under the blend and the request's token-id ``logit_bias`` is listed (the one a
greedy answer draws).
"""

from __future__ import annotations

import weakref
from typing import Any, List, Optional

import llama_cpp
import numpy as np
from llama_cpp import Llama

from .plan import prompt_and_stops
from .schema import Request, given


def answer_with_echo(llm: Any, body: Request, kwargs: dict) -> dict:
    """The completion for ``kwargs`` (with ``echo``), its text and log-probs starting with the prompt's."""
    prompt = kwargs["prompt"]
    tokens, _ = prompt_and_stops(llm, body, kwargs)
    answer = llm.create_completion(**{**kwargs, "prompt": list(tokens), "echo": False})
    shown = tokens[1:] if isinstance(prompt, str) and tokens[:1] == [llm.token_bos()] else list(tokens)
    choice = answer["choices"][0]
    echoed = prompt if isinstance(prompt, str) else _text(llm, shown)
    choice["text"] = echoed + choice["text"]
    k = kwargs.get("logprobs")
    if k is not None:
        first = len(tokens) - len(shown)  # the first shown token's place in the prompt
        rows = Llama.logits_to_logprobs(np.asarray(llm.scores[first : len(tokens)]))
        head = prompt_logprobs(llm, shown, rows, int(k))
        tail = choice["logprobs"]
        if not (tail and tail.get("tokens")) and choice["finish_reason"] == "stop" and len(_eog_tokens(llm)):
            tail = ended_at_once(llm, shown, rows[-1], int(k), len(choice["text"]), _id_bias(body))
        choice["logprobs"] = _joined(head, tail, len(_text(llm, shown)))
    return answer


def prompt_logprobs(llm: Any, shown: List[int], rows: np.ndarray, k: int) -> dict:
    """The log-probs of ``shown[1:]`` under ``rows`` (row ``i`` predicts ``shown[i + 1]``), the first null."""
    out = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
    for i, token in enumerate(shown):
        before = shown[:i]
        out["tokens"].append(_piece(llm, token, before))
        out["text_offset"].append(len(_text(llm, before)))
        if i == 0:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        row = rows[i - 1]
        out["token_logprobs"].append(float(row[token]))
        top = {_piece(llm, int(j), before): float(row[j]) for j in np.argsort(-row, kind="stable")[:k]}
        top[out["tokens"][-1]] = float(row[token])
        out["top_logprobs"].append(top)
    return out


def ended_at_once(llm: Any, shown: List[int], row: np.ndarray, k: int, offset: int, bias: dict) -> dict:
    """The entry of an end-of-text token drawn first (``row``: the log-probs after the prompt)."""
    eog = _eog_tokens(llm)
    token = int(eog[np.argmax([row[t] + bias.get(int(t), 0.0) for t in eog])])
    top = {_piece(llm, int(j), shown): float(row[j]) for j in np.argsort(-row, kind="stable")[:k]}
    text = llm.detokenize([token], special=True).decode("utf-8", errors="ignore")
    top[text] = float(row[token])
    return {"tokens": [text], "text_offset": [offset], "token_logprobs": [float(row[token])], "top_logprobs": [top]}


_EOG: "weakref.WeakKeyDictionary[Any, np.ndarray]" = weakref.WeakKeyDictionary()


def _eog_tokens(llm: Any) -> np.ndarray:
    """The vocabulary's end-of-generation tokens (read once per engine)."""
    if llm not in _EOG:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        _EOG[llm] = np.array([t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)], dtype=np.intp)
    return _EOG[llm]


def _id_bias(body: Request) -> dict:
    """The request's logit bias by token id (a bias keyed by text is not looked at here)."""
    bias = given(body, "logit_bias") or {}
    if given(body, "logit_bias_type") == "tokens":
        return {}
    return {int(k): float(v) for k, v in bias.items()}


def _joined(head: dict, tail: Optional[dict], offset: int) -> dict:
    """The prompt's log-probs, then the answer's with their text offsets moved after the echoed prompt."""
    if not tail or not tail.get("tokens"):
        return head
    base = tail["text_offset"][0]
    return {
        "tokens": head["tokens"] + list(tail["tokens"]),
        "text_offset": head["text_offset"] + [offset + o - base for o in tail["text_offset"]],
        "token_logprobs": head["token_logprobs"] + list(tail["token_logprobs"]),
        "top_logprobs": head["top_logprobs"] + list(tail["top_logprobs"]),
    }


def _piece(llm: Any, token: int, before: List[int]) -> str:
    return llm.detokenize([token], prev_tokens=before).decode("utf-8", errors="ignore")


def _text(llm: Any, tokens: List[int]) -> str:
    return llm.detokenize(tokens).decode("utf-8", errors="ignore")
