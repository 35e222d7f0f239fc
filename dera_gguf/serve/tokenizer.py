"""The pair's tokenizer over HTTP, in the shapes clients ask for it.

* vLLM's ``POST /tokenize`` (a prompt, or chat messages rendered by the pair's template),
  ``POST /detokenize`` and ``GET /tokenizer_info``: lm-evaluation-harness's
  ``tokenizer_backend=remote`` reads them to count tokens, split contexts and find EOS;
* llama-cpp-python's server's ``POST /extras/tokenize``, ``/extras/tokenize/count`` and
  ``/extras/detokenize``.

The two models of a pair share one vocabulary (checked when the pair is loaded), so the
engine's tokenizer is the pair's. ``model`` picks the pair (``PAIR@λ`` ids too); tokenizing
needs no lock: it reads the vocabulary only.
"""

from __future__ import annotations

from typing import Any, List, Optional

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .catalog import Catalog
from .errors import ApiError
from .schema import text_message


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None


class TokenizeRequest(_Body):
    """vLLM's: a ``prompt`` (``add_special_tokens``: the BOS the model adds) or chat ``messages``."""

    prompt: Optional[str] = None
    messages: Optional[List[dict]] = None
    add_special_tokens: Optional[bool] = None
    add_generation_prompt: bool = Field(True, description="Ignored: the pair's chat template always adds it.")
    return_token_strs: bool = False

    @field_validator("messages", mode="before")
    @classmethod
    def _text_messages(cls, messages: Any) -> Any:
        return [text_message(m, i) for i, m in enumerate(messages)] if isinstance(messages, list) else messages


class DetokenizeRequest(_Body):
    tokens: List[int]


class ExtrasTokenizeRequest(_Body):
    input: str
    add_bos: bool = True  # (llama-cpp-python's server adds the BOS the model adds)


def install_tokenizer_routes(app: FastAPI, catalog: Catalog, auth: list) -> None:
    """Add the tokenizer routes to ``app`` (behind the same API key as the rest)."""

    def engine(model: Optional[str]) -> Any:
        return catalog.find(model)[0].llm

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(body: TokenizeRequest) -> dict:
        llm = engine(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give either prompt (a text) or messages (a chat) to tokenize", "prompt")
        if body.messages is not None:
            tokens = list(llm.chat_prompt(body.messages)[0])
        else:
            bos = body.add_special_tokens is not False  # vLLM's default: True
            tokens = text_tokens(llm, body.prompt, bos)
        out = {"count": len(tokens), "max_model_len": llm.n_ctx(), "tokens": tokens}
        if body.return_token_strs:
            out["token_strs"] = [piece(llm, t) for t in tokens]
        return out

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(body: DetokenizeRequest) -> dict:
        return {"prompt": text_of(engine(body.model), body.tokens)}

    @app.get("/tokenizer_info", dependencies=auth)
    async def tokenizer_info(model: Optional[str] = None) -> dict:
        llm = engine(model)
        special = lambda t: piece(llm, t) if t is not None and t >= 0 else None
        return {
            "tokenizer_class": "llama.cpp:" + str(llm.metadata.get("tokenizer.ggml.model", "unknown")),
            "bos_token": special(llm.token_bos()),
            "eos_token": special(llm.token_eos()),
            "pad_token": special(_int(llm.metadata.get("tokenizer.ggml.padding_token_id"))),
            "add_bos_token": str(llm.metadata.get("tokenizer.ggml.add_bos_token", "true")).lower() == "true",
            "chat_template": getattr(llm, "chat_template", None),
            "model_max_length": llm.n_ctx(),
            "vocab_size": llm.n_vocab(),
        }

    @app.post("/extras/tokenize", dependencies=auth)
    async def extras_tokenize(body: ExtrasTokenizeRequest) -> dict:
        return {"tokens": text_tokens(engine(body.model), body.input, body.add_bos)}

    @app.post("/extras/tokenize/count", dependencies=auth)
    async def extras_count(body: ExtrasTokenizeRequest) -> dict:
        return {"count": len(text_tokens(engine(body.model), body.input, body.add_bos))}

    @app.post("/extras/detokenize", dependencies=auth)
    async def extras_detokenize(body: DetokenizeRequest) -> dict:
        return {"text": text_of(engine(body.model), body.tokens)}


def text_tokens(llm: Any, text: str, add_bos: bool) -> List[int]:
    """``text`` as token ids; special-token texts (``<|im_end|>``) become their tokens."""
    return list(llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))


def text_of(llm: Any, tokens: List[int]) -> str:
    """The text of ``tokens`` (ids checked first: llama.cpp would read out of range)."""
    n_vocab = llm.n_vocab()
    bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is not in the vocabulary [0, {n_vocab})", "tokens")
    return llm.detokenize(tokens, special=True).decode("utf-8", errors="replace")


def piece(llm: Any, token: int) -> str:
    """One token's text, special tokens written out."""
    return llm.detokenize([token], special=True).decode("utf-8", errors="replace")


def _int(value: Any) -> Optional[int]:
    return int(value) if value is not None else None
