"""Speculative decoding for DeRa: cheap drafts, verified by the blend, gated by how often they pass.

llama-cpp-python's ``generate()`` already verifies drafts (its ``draft_model`` hook): it
decodes the last token and the drafted ones in one batch (DeRa: in every active model,
then blended row by row), samples each row with the call's own sampler chain, and keeps
drafted tokens only up to the first one the sampler did not pick; the caches are trimmed
past it (DeRa's other contexts follow on their next decode, :mod:`dera_gguf.contexts`).
Every kept token is the one the sampler chain picked at its row, one sampler draw per
emitted token, so the output is the one decoding without drafts gives, token for token
and seed for seed, for greedy and sampled decoding and every sampler setting, wherever
llama.cpp's logits do not depend on the batch shape (they do slightly on many backends:
a row verified in a batch can differ in the last bits from the same row decoded alone).
Drafts here are deterministic, so this sample-and-compare rule is exact; the accept /
resample rule of Leviathan et al. is only needed for drafts that are themselves sampled.

Drafts come from prompt lookup (:class:`NgramLookup`, free) or from one of the pair's
own models (:class:`ModelDraft`, one decode per drafted token). A :class:`Gate` sets how
many tokens to draft from how many of the last draft passed, and stops drafting for a
while after drafts fail; :class:`Pace` times the steps and drafts only now and then
while drafted steps cost more per token than plain ones, so that speculation that does
not pay on this machine, or on this text, costs little.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
from llama_cpp.llama_speculative import LlamaDraftModel

from .errors import DeRaError

KINDS = ("lookup", "model")
EMPTY = np.zeros(0, dtype=np.intc)


class NgramLookup:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the text's last n-gram.

    The longest match of ``min_ngram`` to ``max_ngram`` tokens wins, and among equal ones the
    latest. A match of one token predicts less, but on a CPU verifying a two- or three-token
    draft costs about one token (measured: 1.39× on copy-heavy prompts with one-token matches
    allowed, 1.17× with two), and the gate and the pace stop drafts that do not pay.
    """

    def __init__(self, min_ngram: int = 1, max_ngram: int = 4):
        self.min_ngram, self.max_ngram = min_ngram, max_ngram

    def __call__(self, ids: np.ndarray, n: int) -> np.ndarray:
        ids = np.asarray(ids)
        for size in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], size)
            hits = np.flatnonzero((windows == ids[-size:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + size
                return ids[start : start + n].astype(np.intc)
        return EMPTY


class ModelDraft:
    """Greedy drafts from one context of the pair, chosen per call (the one with the largest weight).

    Args:
        pick: returns the context to draft with, or None (no drafts, e.g. only one model is active).
        run: runs a decode on a context with its thread share (``ThreadPlan.run`` for one context).
        n_batch: batch size for catching the drafting context up.
    """

    def __init__(self, pick: Callable[[], Any], run: Callable, n_batch: int):
        self.pick, self.run, self.n_batch = pick, run, n_batch

    def __call__(self, ids: np.ndarray, n: int) -> np.ndarray:
        context = self.pick()
        if context is None or n < 1:
            return EMPTY
        draft = []

        def work(c):
            c.catch_up(ids[:-1], self.n_batch)
            token = int(ids[-1])
            for i in range(n):
                c.decode_run([token], len(ids) - 1 + i, 1)
                token = int(np.argmax(c.rows(1)[0]))
                draft.append(token)

        self.run(context, work)
        return np.array(draft, dtype=np.intc)


@dataclass
class Gate:
    """How many tokens to draft next, from how the last drafts fared.

    A draft that passed whole doubles the next one (up to ``max_draft``); one cut short
    drafts one more than passed next time. After ``patience`` drafts in a row with
    nothing passing, drafting pauses for ``pause`` tokens, doubling each time it fails
    again (so a text with nothing to copy costs a few failed verifications per pause).
    """

    max_draft: int = 8
    first_draft: int = 4
    patience: int = 2
    pause: int = 8
    max_pause: int = 128
    size: int = field(init=False)
    _misses: int = field(default=0, init=False)
    _paused_until: int = field(default=0, init=False)
    _pause: int = field(default=0, init=False)

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        """A new text: positions start again, and so does what was learned about the drafts."""
        self.size, self._pause, self._misses, self._paused_until = self.first_draft, self.pause, 0, 0

    def allows(self, position: int) -> int:
        """Tokens to draft at this position of the text (0: not now)."""
        return 0 if position < self._paused_until else self.size

    def record(self, position: int, drafted: int, accepted: int) -> None:
        if accepted == drafted:
            self.size = min(self.max_draft, 2 * self.size)
        else:
            self.size = max(1, accepted + 1)
        self._misses = self._misses + 1 if accepted == 0 else 0
        if accepted > 0:
            self._pause = self.pause
        if self._misses >= self.patience:
            self._paused_until = position + self._pause
            self._pause = min(self.max_pause, 2 * self._pause)
            self._misses = 0


@dataclass
class Pace:
    """Whether drafting pays in wall time: seconds per emitted token with and without a draft.

    Acceptance alone does not say it: a verified batch costs more than one token (how much
    depends on the machine), a model draft costs a decode per drafted token. So the time of
    every step is measured (token-weighted running averages per kind of step, over enough
    steps that a lucky or unlucky draft does not decide), and once ``settle`` drafted steps
    are slower per token than plain ones, only every ``probe``-th step drafts (to notice when
    the text turns copyable); the interval doubles, up to ``max_probe``, while probes stay
    slower. Until ``settle`` plain steps are measured, every ``learn``-th step is plain. The averages outlive a
    generation (they describe the machine and the models); a step that decoded a prompt is
    not measured. ``timed=False`` drafts at every step (tests use it: their outcome must not
    depend on how fast the machine is).
    """

    timed: bool = True
    probe: int = 16
    max_probe: int = 256
    learn: int = 2
    settle: int = 4
    weight: float = 0.1  # of the newest step in the running averages
    _drafted: Optional[np.ndarray] = field(default=None, init=False)  # running (seconds, tokens), drafted steps
    _plain: Optional[np.ndarray] = field(default=None, init=False)  # ... and plain ones
    _interval: int = field(default=0, init=False)
    _steps: int = field(default=0, init=False)
    _counts: list = field(default_factory=lambda: [0, 0], init=False)  # plain, drafted steps measured

    def __post_init__(self):
        self._interval = self.probe

    @property
    def drafted(self) -> Optional[float]:
        """Seconds per emitted token in steps with a draft (None: none measured yet)."""
        return None if self._drafted is None else float(self._drafted[0] / self._drafted[1])

    @property
    def plain(self) -> Optional[float]:
        """Seconds per emitted token in steps without a draft."""
        return None if self._plain is None else float(self._plain[0] / self._plain[1])

    def record(self, had_draft: bool, seconds: float, tokens: int) -> None:
        """One step: ``tokens`` emitted in ``seconds`` (averaged token-weighted: a step that kept
        five drafted tokens says more than one that kept none)."""
        step = np.array([seconds, tokens], dtype=np.float64)
        old = self._drafted if had_draft else self._plain
        self._counts[had_draft] += 1
        weight = max(self.weight, 1.0 / self._counts[had_draft])  # a plain mean until the average fills
        new = step if old is None else old + weight * (step - old)
        if had_draft:
            self._drafted = new
            if self.plain is not None:  # a probe that found drafting slower waits longer for the next
                slower = seconds / tokens > self.plain
                self._interval = min(self.max_probe, 2 * self._interval) if slower else self.probe
        else:
            self._plain = new

    def allows(self) -> bool:
        """Whether this step may draft."""
        if not self.timed:
            return True
        self._steps += 1
        if self._counts[0] < self.settle:
            return self._steps % self.learn != 0
        if self._counts[1] >= self.settle and self.drafted > self.plain:
            return self._steps % self._interval == 0
        return True


@dataclass
class SpeculationStats:
    """Counts over the life of the engine: drafts (each verified in one batch), drafted tokens, and
    of the drafted tokens whose fate is known (the next draft call sees it), how many passed."""

    verifications: int = 0
    drafted: int = 0
    settled: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.settled if self.settled else float("nan")


class Speculation(LlamaDraftModel):
    """The ``draft_model`` DeRaLlama hands to llama-cpp-python's ``generate()``.

    Called with the text so far (its last token sampled, not yet decoded); checks how much
    of its previous draft the sampler kept, asks the gate for a size and the source for a
    draft. ``pending`` tells DeRaLlama's next decode how many drafted rows to output.

    Args:
        source: ``source(ids, n)`` returns at most n drafted tokens (deterministic).
        limit: the most tokens a draft may have (the decode batch holds it with the last token).
    """

    def __init__(
        self,
        source: Callable[[np.ndarray, int], np.ndarray],
        limit: int,
        gate: Optional[Gate] = None,
        pace: Optional[Pace] = None,
    ):
        self.source = source
        self.limit = limit
        self.gate = gate or Gate()
        self.pace = pace or Pace()
        self.stats = SpeculationStats()
        self.pending = 0
        self._last: Optional[tuple] = None  # (start position, drafted tokens)
        self._clock: Optional[tuple] = None  # (text length, time, drafted?) at the previous call

    def restart(self) -> None:
        """A new generation: the previous draft is not verified against it."""
        self._last, self._clock, self.pending = None, None, 0
        self.gate.reset()

    def take_pending(self) -> int:
        n, self.pending = self.pending, 0
        return n

    def __call__(self, input_ids: np.ndarray, /, **kwargs: Any) -> np.ndarray:
        now = time.perf_counter()
        ids = np.asarray(input_ids)
        self._settle(ids)
        self._time_step(len(ids), now)
        n = min(self.gate.allows(len(ids)), self.limit)
        if n > 0 and not self.pace.allows():
            n = 0
        draft = self.source(ids, n)[:n] if n > 0 else EMPTY
        self._last = (len(ids), draft) if len(draft) else None
        self._clock = (len(ids), now, len(draft) > 0)  # the drafting itself counts towards its step
        self.pending = len(draft)
        if len(draft):
            self.stats.verifications += 1
            self.stats.drafted += len(draft)
        return draft

    def _time_step(self, length: int, now: float) -> None:
        """Time the step since the previous call (its decode, sampling and drafting) per emitted token."""
        if self._clock is None:
            return
        before, then, had_draft = self._clock
        if length > before:
            self.pace.record(had_draft, now - then, length - before)

    def _settle(self, ids: np.ndarray) -> None:
        """Record how many tokens of the last draft the sampler kept (they now stand in ``ids``)."""
        if self._last is None:
            return
        start, draft = self._last
        got = ids[start : start + len(draft)]
        accepted = int(np.cumprod(got == draft[: len(got)]).sum()) if len(got) else 0
        self.gate.record(len(ids), len(draft), accepted)
        self.stats.settled += len(draft)
        self.stats.accepted += accepted
        self._last = None


def check_kind(speculative: Any, draft_model: Any = None) -> Any:
    """None, "lookup", "model" or a llama-cpp-python ``LlamaDraftModel``; anything else is refused.

    ``draft_model`` is llama-cpp-python's keyword for a ``LlamaDraftModel``; it may stand instead.
    """
    if draft_model is not None:
        if speculative is not None:
            raise DeRaError("give speculative= or draft_model=, not both")
        if not isinstance(draft_model, LlamaDraftModel):
            raise DeRaError(
                f"draft_model must be a llama_cpp.llama_speculative.LlamaDraftModel (e.g. LlamaPromptLookupDecoding), "
                f"got {type(draft_model).__name__}; or use speculative='lookup' or 'model'"
            )
        return draft_model
    if speculative is None or (isinstance(speculative, str) and speculative in KINDS):
        return speculative
    if isinstance(speculative, LlamaDraftModel):
        return speculative
    raise DeRaError(
        f"speculative must be one of {', '.join(KINDS)}, None, or a llama_cpp LlamaDraftModel, got {speculative!r}"
    )


def from_draft_model(draft_model: LlamaDraftModel) -> Callable[[np.ndarray, int], np.ndarray]:
    """A llama-cpp-python draft model (e.g. ``LlamaPromptLookupDecoding``) as a draft source."""
    return lambda ids, n: np.asarray(draft_model(ids), dtype=np.intc)[:n]


def largest_weight(contexts: Sequence, weights: Sequence[float]):
    """The context with the largest mixing weight (the reference on a tie), or None if only one is active."""
    active = [i for i, w in enumerate(weights) if w != 0.0]
    if len(active) < 2:
        return None
    return contexts[max(active, key=lambda i: (weights[i], -i))]
