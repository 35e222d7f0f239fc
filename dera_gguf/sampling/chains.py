"""llama.cpp's own sampler chains, applied to blended logits rows held in numpy.

One chain per sequence, each with its own seed, so a sequence's sample does not depend
on which other sequences share its batch (dera-eval's sweeps, dera-serve's choices).
Nothing here reimplements top-k or top-p: the row is copied into a
``llama_token_data_array`` and the chain picks. The chain is built in the order
llama-cpp-python builds its own (penalties, top-k, typical, top-p, min-p, temperature,
a seeded draw), so a row sampled here draws what ``Llama.sample`` would from it.
"""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals

from .settings import Sampling


def new_chain(
    params: Sampling,
    seed: int,
    typical_p: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    n_vocab: int = 0,
    penalty_last_n: int = 64,
) -> internals.LlamaSampler:
    """Penalties (if any), then greedy at temperature 0, else top-k, typical, top-p, min-p, temperature and
    a draw seeded with ``seed``. Steps at their neutral value are left out (llama.cpp skips them anyway).

    The penalties are added with the arguments llama-cpp-python 0.3.36 gives them (``n_vocab``,
    ``penalty_last_n`` = its ``last_n_tokens_size``), through the same binding, so they act as there.
    """
    chain = internals.LlamaSampler()
    if params.repeat_penalty != 1.0 or frequency_penalty != 0.0 or presence_penalty != 0.0:
        chain.add_penalties(
            n_vocab=n_vocab,
            penalty_last_n=penalty_last_n,
            penalty_repeat=params.repeat_penalty,
            penalty_freq=frequency_penalty,
            penalty_present=presence_penalty,
        )
    if params.temperature == 0:
        chain.add_greedy()
        return chain
    if params.top_k > 0:
        chain.add_top_k(params.top_k)
    if typical_p < 1:
        chain.add_typical(typical_p, 1)
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
