"""Several sequences decoded in lockstep in the reference and the aligned context.

Every context holds the same sequences at the same positions (one llama.cpp batch per
model and step). For generation the prompt is evaluated once in sequence 0 and its KV
cells are shared with the other sequences (``llama_memory_seq_cp`` on a unified KV
cache); each step then decodes one token per live sequence. For scoring, sequence 0
holds one text at a time and keeps the longest shared prefix (chosen and rejected
share their prompt) so only the rest is decoded.
"""

from __future__ import annotations

from typing import List, Sequence

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals

from ..contexts import common_prefix


class ParallelSequences:
    """Contexts (reference first) that decode the same tokens for up to ``n_seq`` sequences."""

    def __init__(self, contexts: Sequence[internals.LlamaContext], n_vocab: int, n_batch: int, n_seq: int):
        self.contexts = list(contexts)
        self.n_vocab = n_vocab
        self.n_batch = n_batch
        self.n_seq = n_seq
        self.batch = internals.LlamaBatch(n_tokens=max(n_batch, n_seq), embd=0, n_seq_max=n_seq, verbose=False)
        self.cached = np.zeros(0, dtype=np.intc)  # tokens of sequence 0 in every KV cache

    def close(self) -> None:
        self.batch.close()

    # ------------------------------------------------------------ low level

    def _decode(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int],
                outputs: Sequence[bool]) -> np.ndarray:
        """Decode one batch in every context; return the output rows, shape (n_models, n_out, n_vocab)."""
        b = self.batch.batch
        b.n_tokens = len(tokens)
        for i, (token, pos, seq, out) in enumerate(zip(tokens, positions, seqs, outputs)):
            b.token[i], b.pos[i], b.seq_id[i][0], b.n_seq_id[i], b.logits[i] = token, pos, seq, 1, out
        n_out = int(sum(bool(o) for o in outputs))
        rows = np.empty((len(self.contexts), n_out, self.n_vocab), dtype=np.float32)
        for m, ctx in enumerate(self.contexts):
            ctx.decode(self.batch)
            if n_out:  # the output rows lie in batch order in llama.cpp's logits buffer
                ptr = llama_cpp.llama_get_logits(ctx.ctx)
                rows[m] = np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))
        return rows

    def _clear(self) -> None:
        for ctx in self.contexts:
            ctx.kv_cache_clear()
        self.cached = np.zeros(0, dtype=np.intc)

    # --------------------------------------------------------- generation

    def prefill(self, prompt: Sequence[int], n_seq: int) -> np.ndarray:
        """Evaluate ``prompt`` once in sequence 0, share it with sequences 1..n_seq-1.

        Returns the logits after the prompt, shape (n_models, n_vocab): the first
        step's row for every sequence.
        """
        self._clear()
        n = len(prompt)
        last = None
        for start in range(0, n, self.n_batch):
            chunk = list(prompt[start : start + self.n_batch])
            pos = range(start, start + len(chunk))
            outs = [start + i == n - 1 for i in range(len(chunk))]
            rows = self._decode(chunk, pos, [0] * len(chunk), outs)
            if rows.shape[1]:
                last = rows[:, 0]
        for ctx in self.contexts:
            for seq in range(1, n_seq):
                llama_cpp.llama_memory_seq_cp(ctx.memory, 0, seq, -1, -1)
        return last

    def step(self, tokens: Sequence[int], seqs: Sequence[int], position: int) -> np.ndarray:
        """Append ``tokens[i]`` to sequence ``seqs[i]`` at ``position``; rows (n_models, len, n_vocab)."""
        n = len(tokens)
        return self._decode(list(tokens), [position] * n, list(seqs), [True] * n)

    # ------------------------------------------------------------ scoring

    def rows_after(self, tokens: np.ndarray, first: int) -> np.ndarray:
        """Logits of positions first..len-2: the rows that predict ``tokens[first + 1 :]``.

        Shape (n_models, len(tokens) - 1 - first, n_vocab). The cached prefix of
        sequence 0 is reused up to position ``first`` (whose row must be recomputed).
        """
        tokens = np.asarray(tokens, dtype=np.intc)
        keep = min(common_prefix(self.cached, tokens), first)
        for ctx in self.contexts:
            if not ctx.kv_cache_seq_rm(0, keep, -1):
                self._clear()
                keep = 0
                break
        self.cached = tokens[:keep]
        parts: List[np.ndarray] = []
        end = len(tokens) - 1  # the last token's row predicts nothing we score
        for start in range(keep, end, self.n_batch):
            chunk = tokens[start : min(start + self.n_batch, end)]
            pos = range(start, start + len(chunk))
            parts.append(self._decode(chunk.tolist(), pos, [0] * len(chunk), [p >= first for p in pos]))
            self.cached = tokens[: start + len(chunk)]
        return np.concatenate(parts, axis=1)
