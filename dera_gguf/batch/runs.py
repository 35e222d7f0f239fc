"""Several sequences on one pair's contexts: runs of tokens appended in one batch per model.

Every context of a :class:`~dera_gguf.runtime.pair.PairRuntime` holds its sequences at the same
positions. A prompt shared by several sequences is evaluated once in sequence 0 and its KV
cells are shared with the others (``llama_memory_seq_cp`` on a unified KV cache, not
recomputed); each step then appends a run of tokens to every live sequence, all in one batch.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np

from ..runtime.pair import Batch, PairRuntime


class Run(NamedTuple):
    """Tokens appended to one sequence in a batch: ``tokens`` at positions ``start``, ``start + 1``, ...

    ``rows``: how many of the last tokens' rows are wanted (1: the last token's; 0: none, a prompt
    chunk with more to come; more: a token and the draft after it, each row verified).
    """

    seq: int
    start: int
    tokens: Sequence[int]
    rows: int = 1


def models_of(weights: Sequence[float]) -> List[int]:
    """The models a blend weighs: a sequence blended at weight 0 on a model need never be decoded there."""
    return [m for m, w in enumerate(weights) if w != 0.0]


def batch_of(runs: Sequence[Run]) -> Optional[Batch]:
    """One batch appending ``runs``, with the rows each run wants; None if empty."""
    if not runs:
        return None
    tokens = [int(t) for run in runs for t in run.tokens]
    positions = [p for run in runs for p in range(run.start, run.start + len(run.tokens))]
    seqs = [run.seq for run in runs for _ in run.tokens]
    outputs = [i >= len(run.tokens) - run.rows for run in runs for i in range(len(run.tokens))]
    return Batch(tokens, positions, seqs, outputs)


def rows_by_seq(runs: Sequence[Sequence[Run]], rows: Sequence[Optional[np.ndarray]]) -> Dict[int, Dict]:
    """Each sequence's output rows of a step that decoded ``runs[m]`` in model m:
    ``{seq: {model: rows}}``, ``rows`` of shape (run.rows, n_vocab)."""
    out: Dict[int, Dict[int, np.ndarray]] = {}
    for m, model_runs in enumerate(runs):
        at = 0
        for run in model_runs:
            if run.rows:
                out.setdefault(run.seq, {})[m] = rows[m][at : at + run.rows]
                at += run.rows
    return out


def prefill(
    runtime: PairRuntime, prompt: Sequence[int], n_seq: int, models: Optional[Sequence[int]] = None
) -> np.ndarray:
    """Empty the contexts, evaluate ``prompt`` in sequence 0 (in batches of ``runtime.n_batch``),
    and share it with sequences 1..n_seq-1. Only ``models`` (default: all) decode it.

    Returns the logits after the prompt, shape (n_models, n_vocab): the first step's row
    for every sequence (zeros for a model that did not decode it).
    """
    runtime.clear()
    n = len(prompt)
    used = range(len(runtime.contexts)) if models is None else models
    last = np.zeros((len(runtime.contexts), runtime.n_vocab), dtype=np.float32)
    for start in range(0, n, runtime.n_batch):
        run = Run(0, start, list(prompt[start : start + runtime.n_batch]), int(start + runtime.n_batch >= n))
        rows = runtime.decode_each([batch_of([run]) if m in used else None for m in range(len(runtime.contexts))])
        for m in used:
            if rows[m] is not None:
                last[m] = rows[m][0]
    for seq in range(1, n_seq):
        runtime.share_sequence(0, seq)
    return last


def advance(runtime: PairRuntime, runs: Sequence[Run]) -> np.ndarray:
    """Append each run to its sequence, in one batch per model; the rows of every token in run order,
    shape (n_models, n_tokens, n_vocab)."""
    batch = batch_of([run._replace(rows=len(run.tokens)) for run in runs])
    return runtime.decode(batch.tokens, batch.positions, batch.seqs, [True] * len(batch.tokens))
