"""Per-token log-probs and KL(p_λ ‖ π_ref) for many λ from one pair of logits, in numpy.

With ``d = h_aligned - h_ref`` the blend of :func:`dera_gguf.blend.blend_logits` is
``z_λ = h_ref + λ d`` and

    log p_λ(t)        = z_λ[t] - logsumexp(z_λ)
    KL(p_λ ‖ π_ref)   = λ E_{p_λ}[d] - logsumexp(z_λ) + logsumexp(h_ref)

so each λ costs a few passes over the vocabulary and no extra forward pass. Rows are
processed in small blocks that stay in the CPU cache while every λ is evaluated.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..blend import mixing_weights

BLOCK_ROWS = 8  # 8 rows x 49k vocab x 4 bytes x 3 arrays fit a typical L2 cache


def logsumexp_rows(z: np.ndarray) -> np.ndarray:
    """logsumexp over the last axis (float64 result); ``z`` is left untouched."""
    m = z.max(axis=-1, keepdims=True)
    return (m[..., 0].astype(np.float64) + np.log(np.exp(z - m).sum(axis=-1, dtype=np.float64)))


def sweep_token_stats(h_ref: np.ndarray, h_aligned: np.ndarray, lams: Sequence[float],
                      tokens: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """Log-probs of ``tokens`` and KL to the reference, shape (len(lams), n_rows) each.

    ``h_ref``, ``h_aligned``: (n_rows, n_vocab) logits; row i predicts ``tokens[i]``.
    Without ``tokens`` the log-prob array is all NaN.
    """
    for lam in lams:
        mixing_weights(lam)  # the same checks as every other blend
    h_ref = np.asarray(h_ref, dtype=np.float32)
    d = np.asarray(h_aligned, dtype=np.float32) - h_ref
    n_rows = h_ref.shape[0]
    logp = np.full((len(lams), n_rows), np.nan)
    kl = np.empty((len(lams), n_rows))
    for start in range(0, n_rows, BLOCK_ROWS):
        rows = slice(start, start + BLOCK_ROWS)
        r, db = h_ref[rows], d[rows]
        lse_ref = logsumexp_rows(r)
        z = np.empty_like(r)
        idx = np.arange(r.shape[0])
        for j, lam in enumerate(lams):
            np.multiply(db, np.float32(lam), out=z)
            z += r
            if tokens is not None:
                picked = z[idx, tokens[rows]].astype(np.float64)
            m = z.max(axis=-1, keepdims=True)
            z -= m
            np.exp(z, out=z)
            s = z.sum(axis=-1, dtype=np.float64)
            lse = m[:, 0].astype(np.float64) + np.log(s)
            mean_d = np.einsum("tv,tv->t", z, db, dtype=np.float64) / s
            kl[j, rows] = np.maximum(lam * mean_d - lse + lse_ref, 0.0)
            if tokens is not None:
                logp[j, rows] = picked - lse
    return logp, kl


def kl_rows(z: np.ndarray, h_ref: np.ndarray) -> np.ndarray:
    """KL(softmax(z) ‖ softmax(h_ref)) per row: ``E_p[z - h_ref] - lse(z) + lse(h_ref)``."""
    z = np.asarray(z, dtype=np.float32)
    diff = z - h_ref
    m = z.max(axis=-1, keepdims=True)
    e = np.exp(z - m)
    s = e.sum(axis=-1, dtype=np.float64)
    lse = m[:, 0].astype(np.float64) + np.log(s)
    mean_diff = np.einsum("tv,tv->t", e, diff, dtype=np.float64) / s
    return np.maximum(mean_diff - lse + logsumexp_rows(h_ref), 0.0)
