"""The DeRa mixing math, pure numpy (paper eq. 9, Proposition 1, Appendix B).

A model aligned with KL strength beta, realigned to beta / lam, is approximated
token by token by ``softmax(lam * h_aligned + (1 - lam) * h_ref)``. With several
aligned models the weights are ``lam_i`` on aligned model i and ``1 - sum(lam)``
on the reference. Everything here works on float32 logits of shape
``(..., n_vocab)``.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np

from .errors import DeRaError

Lam = Union[float, Sequence[float]]


def as_lams(lam: Lam, n_aligned: int) -> tuple[float, ...]:
    """Check ``lam`` (a float, or one float per aligned model) and return it as a tuple."""
    if isinstance(lam, (int, float, np.floating, np.integer)) and not isinstance(lam, bool):
        lams = (float(lam),)
    elif isinstance(lam, (list, tuple, np.ndarray)):
        lams = tuple(lam)
    else:
        raise DeRaError(f"lam must be a float or a list of floats, got {lam!r}")
    if len(lams) != n_aligned:
        raise DeRaError(
            f"lam has {len(lams)} value(s) but there are {n_aligned} aligned model(s): "
            "give one lam per aligned model"
        )
    for value in lams:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise DeRaError(f"lam values must be numbers, got {value!r}")
        if not math.isfinite(float(value)):
            raise DeRaError(f"lam must be finite, got {value!r}")
    return tuple(float(v) for v in lams)


def mixing_weights(lam: Lam, n_aligned: int = 1) -> np.ndarray:
    """Weights ``[1 - sum(lam), lam_1, ..., lam_n]`` on ``[reference, aligned_1, ...]``.

    They always sum to one, so the blend is a (possibly extrapolated) geometric
    mixture of the models' distributions.
    """
    lams = as_lams(lam, n_aligned)
    return np.array((1.0 - math.fsum(lams),) + lams, dtype=np.float64)


def blend_logits(logits: Sequence[np.ndarray], weights: Sequence[float], out: np.ndarray | None = None) -> np.ndarray:
    """Return ``sum_i weights[i] * logits[i]`` in float32, written into ``out`` if given.

    ``out`` may be one of the inputs (the in-place blend the engine uses): that input is
    read first, before anything is written.
    """
    if len(logits) != len(weights) or not logits:
        raise DeRaError("blend_logits needs one weight per logits array")
    first = next((i for i, h in enumerate(logits) if h is out), 0)
    if out is None:
        out = np.empty_like(logits[first], dtype=np.float32)
    np.multiply(logits[first], np.float32(weights[first]), out=out)
    for i in range(len(logits)):
        if i != first and weights[i] != 0.0:
            out += np.float32(weights[i]) * logits[i]
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_divergence(logits_p: np.ndarray, logits_q: np.ndarray) -> np.ndarray:
    """KL(p || q) over the last axis, where p and q are given by their logits."""
    logp = log_softmax(logits_p)
    logq = log_softmax(logits_q)
    return (np.exp(logp) * (logp - logq)).sum(axis=-1)
