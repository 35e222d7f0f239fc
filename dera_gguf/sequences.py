"""Several sequences on one pair's contexts: a prompt decoded once and shared, then runs appended.

Every context of a :class:`~dera_gguf.engine.PairRuntime` holds the same sequences at the
same positions (one llama.cpp batch per model and step). A prompt is evaluated once in
sequence 0 and its KV cells are shared with the other sequences (``llama_memory_seq_cp``
on a unified KV cache, not recomputed); each step then decodes the tokens of every live
sequence together. dera-eval's sweeps and dera-serve's several choices per request both
decode so.
"""

from __future__ import annotations

from typing import List, NamedTuple, Sequence

import numpy as np

from .engine import PairRuntime


class Run(NamedTuple):
    """Tokens appended to one sequence in a batch: ``tokens`` at positions ``start``, ``start + 1``, ..."""

    seq: int
    start: int
    tokens: Sequence[int]


def prefill(runtime: PairRuntime, prompt: Sequence[int], n_seq: int) -> np.ndarray:
    """Empty the contexts, evaluate ``prompt`` in sequence 0 (in batches of ``runtime.n_batch``),
    and share it with sequences 1..n_seq-1.

    Returns the logits after the prompt, shape (n_models, n_vocab): the first step's row
    for every sequence.
    """
    runtime.clear()
    n = len(prompt)
    last = None
    for start in range(0, n, runtime.n_batch):
        chunk = list(prompt[start : start + runtime.n_batch])
        pos = range(start, start + len(chunk))
        rows = runtime.decode(chunk, pos, [0] * len(chunk), [p == n - 1 for p in pos])
        if rows.shape[1]:
            last = rows[:, 0]
    for seq in range(1, n_seq):
        runtime.share_sequence(0, seq)
    return last


def advance(runtime: PairRuntime, runs: Sequence[Run]) -> np.ndarray:
    """Append each run to its sequence, in one batch per model; the rows of every token in run order,
    shape (n_models, n_tokens, n_vocab)."""
    tokens: List[int] = []
    positions: List[int] = []
    seq_ids: List[int] = []
    for seq, start, run in runs:
        tokens += [int(t) for t in run]
        positions += range(start, start + len(run))
        seq_ids += [seq] * len(run)
    return runtime.decode(tokens, positions, seq_ids, [True] * len(tokens))
