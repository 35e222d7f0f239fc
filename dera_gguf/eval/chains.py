"""A sweep's sampling: the settings it allows and records, and each sequence's seed.

The chains themselves are llama.cpp's, applied to blended rows (:mod:`dera_gguf.sampling.chains`,
shared with dera-serve).
"""

from __future__ import annotations

import zlib

from ..errors import DeRaError
from ..sampling.chains import RowSampler, new_chain
from ..sampling.settings import Sampling

__all__ = ["RowSampler", "check_sweep_sampling", "new_chain", "recorded", "sequence_seed"]

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
