"""The lockstep contexts: every model decodes the same tokens, logits are blended.

Each :class:`Member` is one llama.cpp context (a model, or the reference model with
a LoRA adapter) plus the tokens its KV cache holds. A :class:`Lockstep` group keeps
the members on one logical token sequence:

* only members whose weight is non-zero decode (at lam 0 or 1 a step costs one
  model); a member left behind catches up in one batch the next time it is needed;
* before decoding, each member drops the part of its KV cache that disagrees with
  the logical sequence (prefix reuse: a chat growing turn by turn re-evaluates
  nothing it already holds);
* after a batch, the blended logits are written into the logits buffer of the
  first active member, so llama.cpp's own sampler chain samples the blend.
"""

from __future__ import annotations

import ctypes
from typing import Optional, Sequence

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals

from .blend import blend_logits


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    n = min(len(a), len(b))
    mismatch = np.flatnonzero(a[:n] != b[:n])
    return int(mismatch[0]) if mismatch.size else n


class Member:
    """One llama.cpp context and the token sequence its KV cache holds."""

    def __init__(self, name: str, ctx: internals.LlamaContext, batch: internals.LlamaBatch, n_ctx: int, n_vocab: int):
        self.name = name
        self.ctx = ctx
        self.batch = batch
        self.n_vocab = n_vocab
        self.ids = np.zeros(n_ctx, dtype=np.intc)
        self.n_past = 0

    def sync_prefix(self, tokens: np.ndarray) -> None:
        """Forget cached tokens that are not a prefix of ``tokens`` (the logical sequence)."""
        keep = common_prefix(self.ids[: self.n_past], tokens)
        # Always trim from ``keep``: llama-cpp-python may have trimmed this cache itself.
        if not self.ctx.kv_cache_seq_rm(-1, keep, -1):
            self.ctx.kv_cache_clear()  # recurrent caches cannot drop a suffix
            keep = 0
        self.n_past = keep

    def decode(self, tokens: Sequence[int], logits_all: bool) -> None:
        """Decode ``tokens`` (at most n_batch) after what the cache holds."""
        self.batch.set_batch(batch=tokens, n_past=self.n_past, logits_all=logits_all)
        self.ctx.decode(self.batch)
        self.ids[self.n_past : self.n_past + len(tokens)] = tokens
        self.n_past += len(tokens)

    def catch_up(self, tokens: np.ndarray, n_batch: int) -> None:
        """Decode the part of ``tokens`` this member has not seen yet (no logits kept)."""
        for start in range(self.n_past, len(tokens), n_batch):
            self.decode(tokens[start : start + n_batch], logits_all=False)

    def logits(self, n_rows: int) -> np.ndarray:
        """The last ``n_rows`` output rows of the latest decode, as a writable view."""
        if n_rows == 1:
            ptr = llama_cpp.llama_get_logits_ith(self.ctx.ctx, -1)
            return np.ctypeslib.as_array(ptr, shape=(1, self.n_vocab))
        ptr = llama_cpp.llama_get_logits(self.ctx.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_rows, self.n_vocab))


class Lockstep:
    """Members decoded in lockstep; ``members[0]`` is the reference model."""

    def __init__(self, members: Sequence[Member], n_batch: int):
        self.members = list(members)
        self.n_batch = n_batch
        self.target: Optional[Member] = None  # member whose logits buffer holds the blend

    def eval(self, prefix: np.ndarray, tokens: Sequence[int], weights: Sequence[float],
             scores: Optional[np.ndarray] = None) -> Member:
        """Decode ``tokens`` after ``prefix`` in every member with a non-zero weight.

        Writes the blended logits of the last token (of every token when ``scores``,
        the ``(len(tokens), n_vocab)`` destination rows, is given) into the logits
        buffer of the first active member, and returns that member.
        """
        active = [(m, w) for m, w in zip(self.members, weights) if w != 0.0]
        for member, _ in active:
            member.sync_prefix(prefix)
            member.catch_up(prefix, self.n_batch)
        logits_all = scores is not None
        for start in range(0, len(tokens), self.n_batch):
            chunk = list(tokens[start : start + self.n_batch])
            for member, _ in active:
                member.decode(chunk, logits_all)
            if logits_all or start + self.n_batch >= len(tokens):
                rows = self._blend_rows(active, len(chunk) if logits_all else 1)
                if logits_all:
                    scores[start : start + len(chunk)] = rows
        self.target = active[0][0]
        return self.target

    @staticmethod
    def _blend_rows(active, n_rows: int) -> np.ndarray:
        """Blend the newest output rows of the active members in place; return the rows."""
        rows = [member.logits(n_rows) for member, _ in active]
        if len(active) == 1:  # weight 1 on one model: leave llama.cpp's logits untouched
            return rows[0]
        return blend_logits(rows, [w for _, w in active], out=rows[0])


def new_member(name: str, model: internals.LlamaModel, context_params, n_batch: int,
               verbose: bool, adapter: Optional["llama_cpp.llama_adapter_lora_p"] = None,
               scale: float = 1.0) -> Member:
    """A fresh context on ``model`` (optionally with a LoRA adapter) as a lockstep member."""
    ctx = internals.LlamaContext(model=model, params=context_params, verbose=verbose)
    if adapter is not None:
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        scales = (ctypes.c_float * 1)(scale)
        if llama_cpp.llama_set_adapters_lora(ctx.ctx, adapters, 1, scales):
            raise RuntimeError(f"llama.cpp refused the LoRA adapter for {name}")
    batch = internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=verbose)
    return Member(name, ctx, batch, ctx.n_ctx(), model.n_vocab())
