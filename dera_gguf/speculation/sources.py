"""Where drafts come from: prompt lookup (free) and a model's greedy tokens (a decode per token): one of
the pair's own models here, a small drafter of its own in :mod:`dera_gguf.speculation.small_model`.

A draft source is ``source(ids, n)``: at most ``n`` tokens to follow ``ids`` (the text so far,
its last token sampled but not decoded yet), deterministic, so that verifying them by sampling
each row and comparing is exact (:mod:`dera_gguf.speculation.verify`). A source that drafts for free
also has ``propose(ids, n)`` returning ``(draft, kind)``: the speculation then asks it at every
step, drafts or not, to learn how often each kind of draft would pass (:mod:`dera_gguf.speculation.pace`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
from llama_cpp.llama_speculative import LlamaDraftModel

from ..runtime.contexts import KnownRows

EMPTY = np.zeros(0, dtype=np.intc)


class NgramLookup:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the text's last n-gram.

    The longest match of ``min_ngram`` to ``max_ngram`` tokens wins, and among equal ones the
    latest. Each match length is its own kind of draft ("lookup-1" ... "lookup-16", see
    :meth:`NgramIndex._kind`): a longer match is stronger evidence, and the pace learns how often
    each kind passes. A one-token match drafts at most ``short`` tokens.

    The scan is kept as an :class:`NgramIndex` of the text last asked about, grown by the new
    tokens while the text only grows (as it does within a generation), so a draft costs a few
    dictionary lookups; another text gets a new index.
    """

    def __init__(self, min_ngram: int = 1, max_ngram: int = 4, short: int = 2):
        self.min_ngram, self.max_ngram, self.short = min_ngram, max_ngram, short
        self._index: Optional[NgramIndex] = None
        self._seen = np.zeros(0, dtype=np.intc)  # the text the index holds

    def __call__(self, ids: np.ndarray, n: int) -> np.ndarray:
        return self.propose(ids, n)[0]

    def propose(self, ids: np.ndarray, n: int) -> tuple:
        """(draft, kind): kind "lookup-<m>" for a match of m tokens; (EMPTY, None) without a match."""
        return self._index_of(np.asarray(ids)).propose(n)

    def _index_of(self, ids: np.ndarray) -> "NgramIndex":
        seen = self._seen
        if self._index is None or len(ids) < len(seen) or not np.array_equal(ids[: len(seen)], seen):
            self._index, seen = NgramIndex((), self.min_ngram, self.max_ngram, self.short), ids[:0]
        self._index.extend(ids[len(seen) :].tolist())
        self._seen = np.array(ids, dtype=np.intc)  # a copy: the caller's buffer changes
        return self._index


class NgramIndex:
    """Prompt lookup for one text that only grows (a sequence of dera-eval generate): the drafts of
    :class:`NgramLookup`, from a table of where each n-gram was last followed, kept up to date token
    by token, so a draft costs a few dictionary lookups instead of a scan of the whole text."""

    def __init__(self, tokens: Sequence[int] = (), min_ngram: int = 1, max_ngram: int = 4, short: int = 2):
        self.min_ngram, self.max_ngram, self.short = min_ngram, max_ngram, short
        self.ids: list = []
        self.follows: dict = {}  # n-gram (a tuple) -> where the tokens after its latest occurrence start
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append ``tokens``: each n-gram they complete now has a continuation."""
        for token in tokens:
            end = len(self.ids)
            for size in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self.follows[tuple(self.ids[end - size : end])] = end
            self.ids.append(int(token))

    def fork(self) -> "NgramIndex":
        """An independent copy (every sequence of one prompt starts from the prompt's index)."""
        twin = NgramIndex((), self.min_ngram, self.max_ngram, self.short)
        twin.ids, twin.follows = list(self.ids), dict(self.follows)
        return twin

    def __call__(self, n: int) -> np.ndarray:
        """At most ``n`` tokens that followed the latest earlier occurrence of the text's longest last n-gram."""
        return self.propose(n)[0]

    def propose(self, n: int) -> tuple:
        """(draft, kind) as :meth:`NgramLookup.propose` gives them for this text."""
        for size in range(min(self.max_ngram, len(self.ids) - 1), self.min_ngram - 1, -1):
            start = self.follows.get(tuple(self.ids[-size:]))
            if start is not None:
                take = min(n, self.short) if size == 1 else n  # weak evidence: a short draft
                return np.array(self.ids[start : start + take], dtype=np.intc), self._kind(size, start)
        return EMPTY, None

    def _kind(self, size: int, start: int) -> str:
        """The kind "lookup-<m>": m the match length; a match of ``max_ngram`` tokens is followed further back;
        then m is ``max_ngram`` times 1, 2 or 4 by how far it reaches (a copy well under way passes more often)."""
        if size < self.max_ngram:
            return f"lookup-{size}"
        ids, reach, most = self.ids, size, 4 * size
        while reach < most and start - reach - 1 >= 0 and ids[start - reach - 1] == ids[len(ids) - reach - 1]:
            reach += 1
        return f"lookup-{size * (4 if reach >= most else 2 if reach >= 2 * size else 1)}"


class ModelDraft:
    """Greedy drafts from one context of the pair, chosen per call (the one with the largest weight).

    The drafting context keeps what it decoded, and its rows (:attr:`known`): verification then
    decodes the draft only in the other contexts, and in this one only the last drafted token.

    Args:
        pick: returns the context to draft with, or None (no drafts, e.g. only one model is active).
        run: runs a decode on a context with its thread share (``ThreadPlan.run`` for one context).
        n_batch: batch size for catching the drafting context up.
    """

    kind = "model"  # its steps are timed apart from lookup's: their cost includes the drafting decodes

    def __init__(self, pick: Callable[[], Any], run: Callable, n_batch: int):
        self.pick, self.run, self.n_batch = pick, run, n_batch
        self.known: Optional[KnownRows] = None  # the rows of the latest draft, until taken

    def __call__(self, ids: np.ndarray, n: int) -> np.ndarray:
        self.known = None
        context = self.pick()
        if context is None or n < 1:
            return EMPTY
        draft, rows = [], []
        self.run(context, lambda c: draft.extend(greedy_draft(c, ids, n, self.n_batch, rows)))
        self.known = KnownRows(context, len(ids) - 1, np.array(rows))
        return np.array(draft, dtype=np.intc)

    def take_known(self) -> Optional[KnownRows]:
        known, self.known = self.known, None
        return known


def greedy_draft(context, ids: np.ndarray, n: int, n_batch: int, rows: Optional[list] = None) -> list:
    """``n`` greedy tokens of ``context`` after ``ids`` (its last token not decoded yet). The context first
    holds ``ids[:-1]`` (what it holds of them is kept, the rest decoded in batches of ``n_batch``), then
    decodes one token at a time; each logits row is appended to ``rows`` where given."""
    context.catch_up(ids[:-1], n_batch)
    token, draft = int(ids[-1]), []
    for i in range(n):
        context.decode_run([token], len(ids) - 1 + i, 1)
        row = context.rows(1)[0]
        if rows is not None:
            rows.append(row.copy())
        token = int(np.argmax(row))
        draft.append(token)
    return draft


def from_draft_model(draft_model: LlamaDraftModel) -> Callable[[np.ndarray, int], np.ndarray]:
    """A llama-cpp-python draft model (e.g. ``LlamaPromptLookupDecoding``) as a draft source."""
    return lambda ids, n: np.asarray(draft_model(ids), dtype=np.intc)[:n]


def largest_weight(contexts: Sequence, weights: Sequence[float]):
    """The context with the largest mixing weight (the reference on a tie), or None if only one is active."""
    active = [i for i, w in enumerate(weights) if w != 0.0]
    if len(active) < 2:
        return None
    return contexts[max(active, key=lambda i: (weights[i], -i))]
