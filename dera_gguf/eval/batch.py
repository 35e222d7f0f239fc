"""Several sequences decoded in lockstep in the reference and the aligned context.

Every context holds the same sequences at the same positions (one llama.cpp batch per
model and step). For generation the prompt is evaluated once in sequence 0 and shared
with the other sequences (:mod:`dera_gguf.batch.runs`, which dera-serve uses too); each
step then decodes one token per live sequence. For scoring, sequence 0
holds one text at a time; the texts of one row (chosen and rejected share their prompt)
reuse the cached prefix, and each row starts from an empty cache, so a row's numbers do
not depend on which rows came before it (on a GPU, kernels differ with batch shape).
"""

from __future__ import annotations

from typing import List, Sequence

import numpy as np

from ..batch.runs import Run, advance, prefill
from ..runtime.pair import PairRuntime
from .models import EvalPair


class ParallelSequences:
    """The pair's runtime (reference first), decoding the same tokens for up to ``n_seq`` sequences."""

    def __init__(self, pair: EvalPair, n_seq: int = 1, n_extra: int = 0):
        self.pair = pair
        self.runtime: PairRuntime = pair.runtime(n_seq, n_extra)
        self.contexts = self.runtime.contexts
        self.threads = self.runtime.threads  # the two contexts at the same time on a CPU
        self.n_vocab = pair.n_vocab
        self.n_batch = self.runtime.n_batch

    def close(self) -> None:
        self.runtime.close()

    def __enter__(self) -> "ParallelSequences":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def clear(self) -> None:
        self.runtime.clear()

    # --------------------------------------------------------- generation

    def prefill(self, prompt: Sequence[int], n_seq: int) -> np.ndarray:
        """Evaluate ``prompt`` once in sequence 0, share it with sequences 1..n_seq-1.

        Returns the logits after the prompt, shape (n_models, n_vocab): the first
        step's row for every sequence.
        """
        return prefill(self.runtime, prompt, n_seq)

    def step(self, tokens: Sequence[int], seq_ids: Sequence[int], position: int) -> np.ndarray:
        """Append ``tokens[i]`` to sequence ``seq_ids[i]`` at ``position``; rows (n_models, len, n_vocab)."""
        return self.advance([Run(seq, position, [token]) for token, seq in zip(tokens, seq_ids)])

    def advance(self, runs: Sequence[Run]) -> np.ndarray:
        """Append each run to its sequence, in one batch per model; the rows of every token in run order,
        shape (n_models, n_tokens, n_vocab)."""
        return advance(self.runtime, runs)

    def drop_from(self, seq: int, n: int) -> None:
        """Drop sequence ``seq``'s positions from ``n`` on in every context (drafts that did not pass)."""
        self.runtime.drop_from(seq, n)

    # ------------------------------------------------------------ scoring

    def rows_after(self, tokens: np.ndarray, first: int) -> np.ndarray:
        """Logits of positions first..len-2: the rows that predict ``tokens[first + 1 :]``.

        Shape (n_models, len(tokens) - 1 - first, n_vocab). The prefix sequence 0 holds
        is reused up to position ``first`` (whose row must be recomputed).
        """
        tokens = np.asarray(tokens, dtype=np.intc)
        keep = min(context.keep_prefix(tokens, first) for context in self.contexts)
        for context in self.contexts:
            context.truncate(keep)
        parts: List[np.ndarray] = []
        end = len(tokens) - 1  # the last token's row predicts nothing we score
        for start in range(keep, end, self.n_batch):
            chunk = tokens[start : min(start + self.n_batch, end)]
            pos = range(start, start + len(chunk))
            parts.append(self.runtime.decode(chunk.tolist(), pos, [0] * len(chunk), [p >= first for p in pos]))
        return np.concatenate(parts, axis=1)
