"""A small drafter: llama.cpp's usual speculative decoding, a small GGUF of the pair's family drafting.

The drafter is a third llama.cpp context, on a model whose vocabulary may draft for the pair's by
llama.cpp's rule (:mod:`dera_gguf.speculation.vocab`, checked before any weights load), made with the pair's
n_ctx, context settings and offloading. That rule lets the two vocabularies differ in size: a text
holding a token past the drafter's vocabulary is not drafted for (the drafter cannot read it), and a
draft ends before a token past the pair's (the pair could not verify it).

It drafts greedily (:func:`~dera_gguf.speculation.sources.greedy_draft`) on the whole thread plan, alone, before
the pair verifies the draft in one batch per model exactly as any other draft
(:mod:`dera_gguf.speculation.verify`): outputs stay those without drafts. Its KV cache follows
the text (what it holds of the text is kept), so a draft decodes only the tokens new since its
previous draft and the draft itself.

Its steps are timed as their own kind (the kind names the drafter's file, :mod:`dera_gguf.speculation.costs`)
and how often its drafts pass is learned from the drafts it makes (:mod:`dera_gguf.speculation.pace`): like
any model draft, a fresh engine drafts only once its measurements say a draft pays. A draft after
steps that did not draft first catches the drafter up with the text they added (a new reply: its
whole prompt); that time is the pause's cost, not the draft's, so it is left out of what a draft
step costs and paid from the exploration budget (:meth:`~dera_gguf.speculation.pace.Pace.record`).
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Optional

import numpy as np

from .. import checks
from ..errors import DeRaError
from ..runtime.contexts import Context
from ..runtime.weights import PairModels
from .sources import EMPTY, greedy_draft
from .vocab import check_draft_vocabulary


def check_draft_model(path: Any, reference: str, verbose: bool = False) -> str:
    """The checked path of a draft model: a GGUF model (not a LoRA adapter) whose vocabulary may draft for the
    pair's by llama.cpp's rule (:mod:`dera_gguf.speculation.vocab`)."""
    path = checks.check_gguf_file(path, "draft model")
    if checks.gguf_general_type(path) == "adapter":
        raise DeRaError(
            f"the draft model {path} is a LoRA adapter: give a full GGUF model of the pair's family "
            "(an adapter cannot draft on its own)"
        )
    check_draft_vocabulary(reference, path, verbose)
    return path


def draft_kind(speculative: Any, draft_model_path: Any) -> Any:
    """The speculation a DeRaLlama runs: a draft file means drafts from it (``speculative`` None or
    ``"model"``, which then means the file); another source of drafts beside it is refused."""
    if draft_model_path is None or speculative in (None, "model"):
        return "model" if draft_model_path is not None else speculative
    raise DeRaError(
        f"draft_model_path drafts from {draft_model_path}, and speculative={speculative!r} names another source "
        "of drafts: give one of them (with draft_model_path, speculative may be None or 'model')"
    )


class SmallDraft:
    """Greedy drafts from the drafter's own context (:class:`Drafter`).

    Args:
        context: the drafter's context.
        run: runs a decode on a context with its thread share (``ThreadPlan.run`` for one context).
        n_batch: batch size for catching the drafter up with the text.
        path: the drafter's file, part of :attr:`kind` (its steps' costs and acceptance are its own).
        limit: the pair's vocabulary size (None: the drafter's): a draft ends before an id past it.
    """

    def __init__(self, context: Context, run: Callable, n_batch: int, path: str, limit: Optional[int] = None):
        self.context, self.run, self.n_batch = context, run, n_batch
        self.limit = context.n_vocab if limit is None else limit
        self.kind = f"drafter {path}"
        self.caught_up = 0.0  # seconds the latest draft spent catching the drafter up with the text

    def __call__(self, ids: np.ndarray, n: int) -> np.ndarray:
        self.caught_up = 0.0
        ids, draft = np.asarray(ids), []
        if n < 1 or (ids.size and int(ids.max()) >= self.context.n_vocab):
            return EMPTY  # nothing asked, or a token the drafter's vocabulary lacks is in the text

        def work(context: Context) -> None:
            start = time.perf_counter()
            context.catch_up(ids[:-1], self.n_batch)
            self.caught_up = time.perf_counter() - start
            draft.extend(greedy_draft(context, ids, n, self.n_batch))

        self.run(self.context, work)
        return below(np.array(draft, dtype=np.intc), self.limit)


def below(draft: np.ndarray, limit: int) -> np.ndarray:
    """``draft`` up to its first token id of ``limit`` or more (one the pair's vocabulary lacks)."""
    past = np.flatnonzero(draft >= limit)
    return draft[: past[0]] if past.size else draft


class Drafter(NamedTuple):
    """A draft model's checked file and its context."""

    path: str
    context: Context


def open_drafter(models: PairModels, path: Optional[str], context_params, n_batch: int) -> Optional[Drafter]:
    """The drafter on the pair's loaded models, its context made like the pair's (None without a draft file)."""
    return None if path is None else Drafter(path, models.draft_context(path, context_params, n_batch))
