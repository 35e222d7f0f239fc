"""llama.cpp's own sampler chains, applied to blended logits rows we hold in numpy.

One chain per sequence, each with its own seed, so a sequence's sample does not
depend on which other sequences share its batch. Nothing here reimplements top-k or
top-p: the row is copied into a ``llama_token_data_array`` and the chain picks.
"""

from __future__ import annotations

import ctypes
import zlib

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals

from ..errors import DeRaError
from ..sampling import Sampling

RECORDED = ("temperature", "top_k", "top_p", "min_p", "max_tokens")  # the settings a run folder records


def check_sweep_sampling(params: Sampling) -> Sampling:
    """Settings a sweep's chains apply: no repeat penalty, and no seed of their own (each sequence's
    chain is seeded from the sweep's seed, so resumed and sharded runs draw the same)."""
    if not params.temperature >= 0 or not params.top_p > 0:
        raise DeRaError(
            f"a sweep samples at temperature >= 0 and top_p in (0, 1], got {params.temperature}, {params.top_p}"
        )
    if params.repeat_penalty != 1.0:
        raise DeRaError("a sweep samples without a repeat penalty (as the paper): leave repeat_penalty at 1")
    if params.seed is not None:
        raise DeRaError(
            "a sweep seeds every sequence from its own seed: give generate(seed=...), not Sampling(seed=...)"
        )
    return params


def recorded(params: Sampling) -> dict:
    """The sampling settings a run folder records (a resumed run must match them)."""
    return {name: getattr(params, name) for name in RECORDED}


def sequence_seed(seed: int, row_id: str, lam: float, sample: int) -> int:
    """A seed for one (row, lam, sample): stable across runs, resumes and batch layouts."""
    return zlib.crc32(f"{seed}|{row_id}|{lam!r}|{sample}".encode()) & 0xFFFFFFFF


def new_chain(params: Sampling, seed: int) -> internals.LlamaSampler:
    """top-k, top-p, min-p, temperature, then a seeded draw (or greedy at temperature 0)."""
    chain = internals.LlamaSampler()
    if params.temperature == 0:
        chain.add_greedy()
        return chain
    if params.top_k > 0:
        chain.add_top_k(params.top_k)
    if params.top_p < 1:
        chain.add_top_p(params.top_p, 1)
    if params.min_p > 0:
        chain.add_min_p(params.min_p, 1)
    chain.add_temp(params.temperature)
    chain.add_dist(seed)
    return chain


class RowSampler:
    """Reusable ``llama_token_data_array`` that a chain samples a numpy logits row from."""

    def __init__(self, n_vocab: int):
        self.n_vocab = n_vocab
        self.data = np.zeros(n_vocab, dtype=[("id", np.intc), ("logit", np.float32), ("p", np.float32)])
        self.array = llama_cpp.llama_token_data_array(
            data=self.data.ctypes.data_as(llama_cpp.llama_token_data_p), size=n_vocab, selected=-1, sorted=False
        )
        self.ids = np.arange(n_vocab, dtype=np.intc)

    def sample(self, chain: internals.LlamaSampler, logits: np.ndarray) -> int:
        """Apply ``chain`` to ``logits`` (one row), accept the token, return it."""
        self.data["id"] = self.ids
        self.data["logit"] = logits
        self.data["p"] = 0.0
        self.array.size, self.array.selected, self.array.sorted = self.n_vocab, -1, False
        llama_cpp.llama_sampler_apply(chain.sampler, ctypes.byref(self.array))
        token = int(self.array.data[self.array.selected].id)  # a sampler may swap the buffer
        llama_cpp.llama_sampler_accept(chain.sampler, token)
        return token
