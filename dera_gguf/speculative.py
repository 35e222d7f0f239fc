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

from .contexts import KnownRows
from .errors import DeRaError

KINDS = ("lookup", "model")
EMPTY = np.zeros(0, dtype=np.intc)


class NgramLookup:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the text's last n-gram.

    The longest match of ``min_ngram`` to ``max_ngram`` tokens wins, and among equal ones the
    latest. A one-token match is weak evidence: it drafts at most ``short`` tokens and is its
    own kind ("lookup-1"), which the pace keeps only where steps are faster with it.
    """

    def __init__(self, min_ngram: int = 1, max_ngram: int = 4, short: int = 2):
        self.min_ngram, self.max_ngram, self.short = min_ngram, max_ngram, short

    def __call__(self, ids: np.ndarray, n: int) -> np.ndarray:
        return self.propose(ids, n)[0]

    def propose(self, ids: np.ndarray, n: int) -> tuple:
        """(draft, kind): kind "lookup-1" for a one-token match, "lookup" for longer ones."""
        ids = np.asarray(ids)
        for size in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], size)
            hits = np.flatnonzero((windows == ids[-size:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + size
                if size == 1:  # weak evidence: a short draft, whose verification costs least
                    return ids[start : start + min(n, self.short)].astype(np.intc), "lookup-1"
                return ids[start : start + n].astype(np.intc), "lookup"
        return EMPTY, None


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
        for size in range(min(self.max_ngram, len(self.ids) - 1), self.min_ngram - 1, -1):
            start = self.follows.get(tuple(self.ids[-size:]))
            if start is not None:
                take = min(n, self.short) if size == 1 else n
                return np.array(self.ids[start : start + take], dtype=np.intc)
        return EMPTY


class ModelDraft:
    """Greedy drafts from one context of the pair, chosen per call (the one with the largest weight).

    The drafting context keeps what it decoded, and its rows (:attr:`known`): verification then
    decodes the draft only in the other contexts, and in this one only the last drafted token.

    Args:
        pick: returns the context to draft with, or None (no drafts, e.g. only one model is active).
        run: runs a decode on a context with its thread share (``ThreadPlan.run`` for one context).
        n_batch: batch size for catching the drafting context up.
    """

    def __init__(self, pick: Callable[[], Any], run: Callable, n_batch: int):
        self.pick, self.run, self.n_batch = pick, run, n_batch
        self.known: Optional[KnownRows] = None  # the rows of the latest draft, until taken

    def __call__(self, ids: np.ndarray, n: int) -> np.ndarray:
        self.known = None
        context = self.pick()
        if context is None or n < 1:
            return EMPTY
        draft, rows = [], []

        def work(c):
            c.catch_up(ids[:-1], self.n_batch)
            token = int(ids[-1])
            for i in range(n):
                c.decode_run([token], len(ids) - 1 + i, 1)
                rows.append(c.rows(1)[0].copy())
                token = int(np.argmax(rows[-1]))
                draft.append(token)

        self.run(context, work)
        self.known = KnownRows(context, len(ids) - 1, np.array(rows))
        return np.array(draft, dtype=np.intc)

    def take_known(self) -> Optional[KnownRows]:
        known, self.known = self.known, None
        return known


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
        """Forget everything: the next draft is ``first_draft`` long."""
        self.size, self._pause, self._misses, self._paused_until = self.first_draft, self.pause, 0, 0

    def new_text(self) -> None:
        """A new text: positions start again; the draft size stays, as it describes how well this engine's
        texts copy (one run on 2 CPU cores at lam 1.5: chat replies 1.01x of no drafting with the same
        tokens, copy ones 1.17x; when each reply began at 4 tokens, copy 1.14x, and 2 of 3 chat replies
        took another path by batch rounding)."""
        self._misses, self._paused_until = 0, 0

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
    every step is measured: token-weighted running averages for plain steps and for each
    kind of draft (a source may tell kinds apart: prompt lookup's one-token matches pay on
    some machines and not on others, its longer ones more often). Once ``judge`` drafts of a
    kind are measured (fewer would let the first, unlucky drafts of a reply decide) and they
    are slower per token than plain steps, that kind drafts only every ``probe``-th time it
    could (to notice when the text turns copyable); the interval doubles, up to
    ``max_probe``, while probes stay slower. Kinds in ``trial_kinds`` are judged instead by
    every step, in alternating windows with and without them (:class:`_Trial`). Until
    ``settle`` plain steps are measured, every ``learn``-th step is plain.
    The averages outlive a generation (they describe the machine and the models); a step
    that decoded a prompt is not measured. ``timed=False`` drafts whenever the gate allows
    (tests use it: their outcome must not depend on how fast the machine is).
    """

    timed: bool = True
    probe: int = 16
    max_probe: int = 256
    learn: int = 2
    settle: int = 4
    judge: int = 16
    weight: float = 0.1  # of the newest step in the running averages
    # Kinds judged by their effect on every step rather than on their own steps: a one-token
    # lookup draft is a little slower than a plain step by itself, but it keeps the lookup in
    # step with a text being copied, so the longer drafts after it pass more (measured on 2 CPU
    # cores: 1.37x on copy prompts with them at lam 1.5 against 1.15x without; about even at lam 1).
    trial_kinds: tuple = ("lookup-1",)
    _trials: dict = field(default_factory=dict, init=False)
    _plain: "_Average" = field(default=None, init=False)
    _kinds: dict = field(default_factory=dict, init=False)  # kind -> [_Average, probe interval, chances]
    _steps: int = field(default=0, init=False)

    def __post_init__(self):
        self._plain = _Average(self.weight)

    @property
    def plain(self) -> Optional[float]:
        """Seconds per emitted token in steps without a draft (None: none measured yet)."""
        return self._plain.per_token

    def drafted(self, kind: str = "draft") -> Optional[float]:
        """Seconds per emitted token in steps with a draft of this kind."""
        return self._kind(kind)[0].per_token

    def _kind(self, kind: str) -> list:
        return self._kinds.setdefault(kind, [_Average(self.weight), self.probe, 0])

    def record(self, kind: Optional[str], seconds: float, tokens: int) -> None:
        """One step that emitted ``tokens`` in ``seconds``, with a draft of ``kind`` (None: plain)."""
        for trial in self._trials.values():
            trial.add(seconds, tokens)
        if kind is None:
            self._plain.add(seconds, tokens)
            return
        track = self._kind(kind)
        track[0].add(seconds, tokens)
        if self.plain is not None:  # a probe that found drafting slower waits longer for the next
            slower = seconds / tokens > self.plain
            track[1] = min(self.max_probe, 2 * track[1]) if slower else self.probe

    def allows(self, kind: str = "draft") -> bool:
        """Whether this step may verify a draft of ``kind``."""
        if not self.timed:
            return True
        if kind in self.trial_kinds:
            return self._trials.setdefault(kind, _Trial()).on
        self._steps += 1
        if self._plain.count < self.settle:
            return self._steps % self.learn != 0
        track = self._kind(kind)
        if track[0].count >= self.judge and track[0].per_token > self.plain:
            track[2] += 1
            return track[2] % track[1] == 0
        return True


class _Trial:
    """Every step timed in alternating windows with a kind of draft allowed and not; once each side
    has ``judge`` windows, the faster side stays, and every ``recheck``-th window tries the other."""

    def __init__(self, window: int = 16, judge: int = 4, recheck: int = 16):
        self.window, self.judge, self.recheck = window, judge, recheck
        self.on, self.left = True, window
        self.sides = {True: _Average(0.02), False: _Average(0.02)}
        self.windows = {True: 0, False: 0}

    def add(self, seconds: float, tokens: int) -> None:
        self.sides[self.on].add(seconds, tokens)
        self.left -= 1
        if self.left:
            return
        self.windows[self.on] += 1
        self.left = self.window
        if min(self.windows.values()) < self.judge:
            self.on = not self.on
            return
        best = self.sides[True].per_token <= self.sides[False].per_token
        self.on = (not best) if sum(self.windows.values()) % self.recheck == 0 else best


class _Average:
    """A token-weighted running average of step times: (seconds, tokens) moved towards each new step
    (a step that kept five drafted tokens says more than one that kept none); a plain mean at first."""

    def __init__(self, weight: float):
        self.weight, self.count, self.sums = weight, 0, None

    def add(self, seconds: float, tokens: int) -> None:
        step = np.array([seconds, tokens], dtype=np.float64)
        self.count += 1
        weight = max(self.weight, 1.0 / self.count)
        self.sums = step if self.sums is None else self.sums + weight * (step - self.sums)

    @property
    def per_token(self) -> Optional[float]:
        return None if self.sums is None else float(self.sums[0] / self.sums[1])


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
    draft.

    Args:
        source: ``source(ids, n)`` returns at most n drafted tokens (deterministic).
        room: ``room(n)``: the most tokens a draft may have when the text so far has n tokens (the
            decode batch holds the draft with the tokens not yet decoded: the last one, any sent ones).
    """

    def __init__(
        self,
        source: Callable[[np.ndarray, int], np.ndarray],
        room: Callable[[int], int],
        gate: Optional[Gate] = None,
        pace: Optional[Pace] = None,
    ):
        self.source = source
        self.room = room
        self.gate = gate or Gate()
        self.pace = pace or Pace()
        self.stats = SpeculationStats()
        self._last: Optional[tuple] = None  # (start position, drafted tokens)
        self._clock: Optional[tuple] = None  # (text length, time, kind of draft or None) at the previous call

    def restart(self) -> None:
        """A new generation: the previous draft is not verified against it."""
        self._last, self._clock = None, None
        self.gate.new_text()

    def __call__(self, input_ids: np.ndarray, /, **kwargs: Any) -> np.ndarray:
        now = time.perf_counter()
        ids = np.asarray(input_ids)
        self._settle(ids)
        self._time_step(len(ids), now)
        n = min(self.gate.allows(len(ids)), self.room(len(ids)))
        draft, kind = self._propose(ids, n) if n > 0 else (EMPTY, None)
        self._last = (len(ids), draft) if len(draft) else None
        self._clock = (len(ids), now, kind if len(draft) else None)  # the drafting counts towards its step
        if len(draft):
            self.stats.verifications += 1
            self.stats.drafted += len(draft)
        return draft

    def _propose(self, ids: np.ndarray, n: int) -> tuple:
        """(draft, its kind) if the pace allows that kind now, else (EMPTY, None).

        A source with ``propose`` names the kind of each draft (asked after drafting: lookup is
        free); any other has one kind, asked before drafting (a model draft costs decodes).
        """
        if hasattr(self.source, "propose"):
            draft, kind = self.source.propose(ids, n)
            return (draft[:n], kind) if len(draft) and self.pace.allows(kind) else (EMPTY, None)
        if not self.pace.allows("draft"):
            return EMPTY, None
        return self.source(ids, n)[:n], "draft"

    def _time_step(self, length: int, now: float) -> None:
        """Time the step since the previous call (its decode, sampling and drafting) per emitted token."""
        if self._clock is None:
            return
        before, then, kind = self._clock
        if length > before:
            self.pace.record(kind, now - then, length - before)

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
