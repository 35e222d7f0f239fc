"""The DeRa math in one place, pure numpy (paper eq. 9, Proposition 1, Appendix B).

A model aligned with KL strength beta, realigned to beta / lam, is approximated
token by token by ``softmax(lam * h_aligned + (1 - lam) * h_ref)``. With several
aligned models the weights are ``lam_i`` on aligned model i and ``1 - sum(lam)``
on the reference. Everything here works on float32 logits of shape
``(..., n_vocab)``: the blend, log-softmax, KL, and the per-token statistics of a
whole λ sweep from one pair of logits; and λ itself: checked, as mixing weights, as text.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence, Union

import numpy as np

from .errors import DeRaError

Lam = Union[float, Sequence[float]]

SWEEP_BLOCK_ROWS = 8  # 8 rows x 49k vocab x 4 bytes x 3 arrays fit a typical L2 cache


# ------------------------------------------------------------------ lam


MAX_LAM = 1e4  # |lam| above it: the blended float32 logits lose all precision (1e308 made them inf)


def as_lams(lam: Lam, n_aligned: int) -> tuple[float, ...]:
    """Check ``lam`` (a float, or one float per aligned model) and return it as a tuple."""
    if _is_number(lam):
        lams = (float(lam),)
    elif isinstance(lam, (list, tuple, np.ndarray)):
        lams = tuple(lam)
    else:
        raise DeRaError(f"lam must be a float or a list of floats, got {lam!r}")
    if len(lams) != n_aligned:
        raise DeRaError(
            f"lam has {len(lams)} value(s) but there are {n_aligned} aligned model(s): give one lam per aligned model"
        )
    for value in lams:
        if not _is_number(value):
            raise DeRaError(f"lam values must be numbers, got {value!r}")
        if not math.isfinite(float(value)) or abs(float(value)) > MAX_LAM:
            raise DeRaError(
                f"lam must be a finite number within ±{MAX_LAM:g}, got {value!r} (far out, the blend is only "
                "the argmax of the models' logit difference, and at extremes its float32 logits overflow)"
            )
    return tuple(float(v) for v in lams)


def normalize_lam(lam: Lam, n_aligned: int) -> Union[float, tuple]:
    """``lam`` checked, as a float for one aligned model or a tuple with one value per aligned model."""
    lams = as_lams(lam, n_aligned)
    return lams[0] if n_aligned == 1 else lams


def mixing_weights(lam: Lam, n_aligned: int = 1) -> np.ndarray:
    """Weights ``[1 - sum(lam), lam_1, ..., lam_n]`` on ``[reference, aligned_1, ...]``.

    They always sum to one, so the blend is a (possibly extrapolated) geometric
    mixture of the models' distributions.
    """
    lams = as_lams(lam, n_aligned)
    return np.array((1.0 - math.fsum(lams),) + lams, dtype=np.float64)


def parse_lams(text: str) -> List[float]:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]`` (command lines, ``PAIR@λ`` ids); every value must be a finite number."""
    values = []
    for part in str(text).split(","):
        try:
            value = float(part)
        except ValueError:
            raise DeRaError(f"lam {part.strip()!r} is not a number (give e.g. 0.5 or 0,0.5,1)") from None
        if not math.isfinite(value):
            raise DeRaError(f"lam must be finite, got {part.strip()}")
        values.append(value)
    return values


def format_lam(lam: Lam) -> str:
    """``1.5`` or ``0.5,1`` (several aligned models), as :func:`parse_lams` reads it back."""
    values = lam if isinstance(lam, (list, tuple)) else [lam]
    return ",".join(f"{float(v):g}" for v in values)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)


# ---------------------------------------------------------------- blend


def blend_logits(logits: Sequence[np.ndarray], weights: Sequence, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Return ``sum_i weights[i] * logits[i]`` in float32, written into ``out`` if given.

    A weight is a number, or a vector with one weight per row (rows of ``logits[i]``
    blended each at its own lam). ``out`` may be one of the inputs (the in-place blend
    the engine uses): that input is read first, before anything is written.
    """
    if len(logits) != len(weights) or not logits:
        raise DeRaError("blend_logits needs one weight per logits array")
    first = next((i for i, h in enumerate(logits) if h is out), 0)
    if out is None:
        out = np.empty(np.shape(logits[first]), dtype=np.float32)
    np.multiply(logits[first], _as_factor(weights[first]), out=out)
    for i in range(len(logits)):
        if i != first and np.any(np.asarray(weights[i]) != 0.0):
            out += _as_factor(weights[i]) * logits[i]
    return out


def add_bias(row: np.ndarray, bias: dict) -> np.ndarray:
    """Add ``bias`` (``{token: added logit}``) to a logits row in place and return it: each sum in float64,
    stored in the row's dtype, as llama-cpp-python's ``logit_bias`` does."""
    if bias:
        ids = np.fromiter(bias, dtype=np.intp, count=len(bias))
        row[ids] = row[ids] + np.fromiter(bias.values(), dtype=np.float64, count=len(bias))
    return row


def _as_factor(weight) -> np.ndarray:
    """A float32 scalar, or a per-row column that broadcasts over the vocabulary."""
    w = np.asarray(weight, dtype=np.float32)
    return w if w.ndim == 0 else w[:, None]


# ------------------------------------------------------- distributions


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def logsumexp(z: np.ndarray) -> np.ndarray:
    """logsumexp over the last axis (float64 result); ``z`` is left untouched."""
    m = z.max(axis=-1, keepdims=True)
    return m[..., 0].astype(np.float64) + np.log(np.exp(z - m).sum(axis=-1, dtype=np.float64))


def kl_divergence(logits_p: np.ndarray, logits_q: np.ndarray) -> np.ndarray:
    """KL(p || q) over the last axis, p and q given by their logits: ``E_p[zp - zq] - lse(zp) + lse(zq)``.

    One exp pass over the vocabulary (float32 values, float64 sums); clipped at 0.
    """
    zp = np.asarray(logits_p, dtype=np.float32)
    zq = np.asarray(logits_q, dtype=np.float32)
    m = zp.max(axis=-1, keepdims=True)
    e = np.exp(zp - m)
    s = e.sum(axis=-1, dtype=np.float64)
    lse_p = m[..., 0].astype(np.float64) + np.log(s)
    mean_diff = np.einsum("...v,...v->...", e, zp - zq, dtype=np.float64) / s
    return np.maximum(mean_diff - lse_p + logsumexp(zq), 0.0)


# ---------------------------------------------------------------- sweep


def sweep_stats(
    h_ref: np.ndarray, h_aligned: np.ndarray, lams: Sequence[float], tokens: Optional[np.ndarray] = None
) -> tuple[np.ndarray, np.ndarray]:
    """Log-probs of ``tokens`` and KL(p_λ ‖ π_ref) for every λ, shape (len(lams), n_rows) each.

    ``h_ref``, ``h_aligned``: (n_rows, n_vocab) logits; row i predicts ``tokens[i]``.
    With ``d = h_aligned - h_ref`` the blend is ``z_λ = h_ref + λ d`` and

        log p_λ(t)      = z_λ[t] - lse(z_λ)
        KL(p_λ ‖ π_ref) = λ E_{p_λ}[d] - lse(z_λ) + lse(h_ref)

    so each λ costs a few passes over the vocabulary and no extra forward pass. Rows
    are processed in small blocks that stay in the CPU cache while every λ is evaluated,
    the blocks in parallel threads (numpy releases the GIL), in float32 with BLAS dot
    products: once the forward pass runs on a GPU, this is the cost of a sweep.
    Without ``tokens`` the log-prob array is all NaN.
    """
    for lam in lams:
        as_lams(lam, 1)  # the same checks as every other blend
    h_ref = np.asarray(h_ref, dtype=np.float32)
    d = np.asarray(h_aligned, dtype=np.float32) - h_ref
    n_rows = h_ref.shape[0]
    logp = np.full((len(lams), n_rows), np.nan)
    kl = np.empty((len(lams), n_rows))

    def block(start: int) -> None:
        rows = slice(start, start + SWEEP_BLOCK_ROWS)
        picked = None if tokens is None else np.asarray(tokens)[rows]
        logp[:, rows], kl[:, rows] = _sweep_block(h_ref[rows], d[rows], lams, picked)

    starts = range(0, n_rows, SWEEP_BLOCK_ROWS)
    if len(starts) > 1 and _POOL_SIZE > 1:
        list(_pool().map(block, starts))
    else:
        for start in starts:
            block(start)
    return logp, kl


def _sweep_block(r: np.ndarray, d: np.ndarray, lams: Sequence[float], tokens: Optional[np.ndarray]):
    """:func:`sweep_stats` for one block of rows."""
    z = r.copy()
    lse_ref, _ = _exp_in_place(z)  # the same float32 path as every lam: KL at lam 0 is exactly 0
    idx = np.arange(r.shape[0])
    logp = np.full((len(lams), r.shape[0]), np.nan)
    kl = np.empty((len(lams), r.shape[0]))
    for j, lam in enumerate(lams):
        np.multiply(d, np.float32(lam), out=z)
        z += r
        if tokens is not None:
            picked = z[idx, tokens].astype(np.float64)
        lse, total = _exp_in_place(z)
        mean_d = np.matmul(z[:, None, :], d[:, :, None])[:, 0, 0] / total  # E_p[d], a BLAS dot per row
        kl[j] = np.maximum(lam * mean_d - lse + lse_ref, 0.0)
        if tokens is not None:
            logp[j] = picked - lse
    return logp, kl


def _exp_in_place(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Overwrite ``z`` with ``exp(z - max)`` per row; return (logsumexp, sum of those exps) per row."""
    m = z.max(axis=-1, keepdims=True)
    z -= m
    np.exp(z, out=z)
    total = z.sum(axis=-1).astype(np.float64)  # numpy's pairwise float32 sum: ~1e-7 relative
    return m[:, 0].astype(np.float64) + np.log(total), total


_POOL_SIZE = min(os.cpu_count() or 1, 8)
_POOL: Optional[ThreadPoolExecutor] = None


def _pool() -> ThreadPoolExecutor:
    """Threads for sweep blocks, made on first use and kept (daemon threads: nothing to shut down)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=_POOL_SIZE, thread_name_prefix="dera-sweep")
    return _POOL
