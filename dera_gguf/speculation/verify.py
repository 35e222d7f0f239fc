"""Speculative decoding for DeRa: cheap drafts, verified by the blend, made only where they pay.

llama-cpp-python's ``generate()`` already verifies drafts (its ``draft_model`` hook): it
decodes the last token and the drafted ones in one batch (DeRa: in every active model,
then blended row by row), samples each row with the call's own sampler chain, and keeps
drafted tokens only up to the first one the sampler did not pick; the caches are trimmed
past it (DeRa's other contexts follow on their next decode, :mod:`dera_gguf.runtime.contexts`).
Every kept token is the one the sampler chain picked at its row, one sampler draw per
emitted token, so the output is the one decoding without drafts gives, token for token
and seed for seed, for greedy and sampled decoding and every sampler setting, wherever
llama.cpp's logits do not depend on the batch shape (they do slightly on many backends:
a row verified in a batch can differ in the last bits from the same row decoded alone).
Drafts here are deterministic, so this sample-and-compare rule is exact; the accept /
resample rule of Leviathan et al. is only needed for drafts that are themselves sampled.

Drafts come from prompt lookup or from one of the pair's own models (:mod:`dera_gguf.speculation.sources`).
Whether a step drafts, and how much, is decided from how often each kind of draft passes and
what a verified batch costs on this machine, measured as the engine runs
(:mod:`dera_gguf.speculation.pace`, :mod:`dera_gguf.speculation.costs`): a draft is made only when it is expected
to emit more tokens per second than a plain step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional

import numpy as np
from llama_cpp.llama_speculative import LlamaDraftModel

from ..errors import DeRaError
from .costs import StepCosts, step_costs
from .pace import Pace
from .sources import EMPTY, ModelDraft, NgramIndex, NgramLookup, from_draft_model, largest_weight

__all__ = [
    "EMPTY",
    "Gate",
    "ModelDraft",
    "NgramIndex",
    "NgramLookup",
    "Pace",
    "Speculation",
    "SpeculationStats",
    "Trail",
    "check_kind",
    "from_draft_model",
    "largest_weight",
]

KINDS = ("lookup", "model")


@dataclass
class Gate:
    """How many tokens to draft next, from how the last drafts fared, whatever they cost: the size
    rule where steps are not timed (``Pace(timed=False)``; dera-eval generate's sequences).

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
        texts copy."""
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
class SpeculationStats:
    """Counts over the life of the engine: drafts (each verified in one batch), drafted tokens, and
    of the drafted tokens whose fate is known (the next draft call sees it), how many passed;
    ``probes``: drafts made to time a batch size not measured yet (:mod:`dera_gguf.speculation.pace`)."""

    verifications: int = 0
    drafted: int = 0
    settled: int = 0
    accepted: int = 0
    probes: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.settled if self.settled else float("nan")


@dataclass
class Trail:
    """What the speculation follows of one text (one generation), kept by whoever runs that generation
    (DeRaLlama: its call), so that two generations drafted in turn do not settle or time each other's
    steps. What the speculation learns stays its own, across texts (:meth:`Speculation.new_text`
    resets the parts that describe one text: the gate's pause, a free source's acceptance), so
    generations drafted in turn share those; that only changes how much is drafted, never the output.
    """

    last: Optional[tuple] = None  # (start position, drafted tokens, kind, tokens expected) of the latest draft
    watched: list = field(default_factory=list)  # (start position, tokens, kind) of free drafts not made, until settled
    clock: Optional[tuple] = None  # (text length, time, costs, rows, probe, overhead) at the previous step


class Speculation(LlamaDraftModel):
    """The ``draft_model`` DeRaLlama hands to llama-cpp-python's ``generate()``.

    Called with the text so far (its last token sampled, not yet decoded); checks how much
    of its previous draft the sampler kept, times the step since the previous call, and
    asks the pace (or, untimed, the gate) how much to draft and the source for a draft.

    Args:
        source: ``source(ids, n)`` returns at most n drafted tokens (deterministic); with
            ``propose(ids, n) -> (draft, kind)`` it drafts for free (:mod:`dera_gguf.speculation.sources`).
        room: ``room(n)``: the most tokens a draft may have when the text so far has n tokens (the
            decode batch holds the draft with the tokens not yet decoded: the last one, any sent ones).
        gate: the size rule when the pace is untimed.
        pace: what this engine learned about drafting, and its decisions (:class:`~dera_gguf.speculation.pace.Pace`).
        key: ``key()`` names what a step's cost depends on now (the models that decode, the
            thread plan, offloading); steps are timed into this process's table for that key and
            the source (:mod:`dera_gguf.speculation.costs`). None: one table for every step.
        trail: ``trail()`` is the :class:`Trail` of the generation a draft is made for (one that
            :meth:`new_text` made), or None; None (or no ``trail``): the speculation's own, which
            :meth:`restart` renews.
    """

    def __init__(
        self,
        source: Callable[[np.ndarray, int], np.ndarray],
        room: Callable[[int], int],
        gate: Optional[Gate] = None,
        pace: Optional[Pace] = None,
        key: Optional[Callable[[], Hashable]] = None,
        trail: Optional[Callable[[], Optional[Trail]]] = None,
    ):
        self.source = source
        self.room = room
        self.gate = gate or Gate()
        self.pace = pace or Pace()
        self.key = key or (lambda: None)
        self.trail = trail or (lambda: None)
        self.stats = SpeculationStats()
        self._free = hasattr(source, "propose")  # drafts cost nothing: proposed at every step, watched
        self._family = "lookup" if self._free else getattr(source, "kind", "draft")
        self._own = Trail()  # the trail when trail() names none

    def new_text(self) -> Trail:
        """A new generation's trail: the previous draft is not verified against its text. How often free
        drafts pass is learned again from the new text's own (another text copies more or less: a
        server's next request is another user's); a source that drafts at a cost learns only from its
        drafts, and keeps that."""
        self.gate.new_text()
        if self._free:
            self.pace.new_text()
        return Trail()

    def restart(self) -> None:
        """A new generation followed on the speculation's own trail (:meth:`new_text`)."""
        self._own = self.new_text()

    def __call__(self, input_ids: np.ndarray, /, **kwargs: Any) -> np.ndarray:
        now = time.perf_counter()
        ids = np.asarray(input_ids)
        trail = self.trail() or self._own
        followed = trail.last is not None  # the previous step drafted: a drafter of its own followed the text
        self._settle(trail, ids)
        self._watch(trail, ids)
        self._time_step(trail, len(ids), now)
        room = self.room(len(ids))
        costs = step_costs((self.key(), self._family)) if self.pace.timed else None
        draft, kind, probe = self._paced(trail, ids, room, costs) if costs is not None else self._gated(ids, room)
        trail.last = (len(ids), draft, kind, self.pace.expected(kind, len(draft))) if len(draft) else None
        # The drafting counts towards its step; a drafter's catching up after a pause is the pause's cost.
        overhead = getattr(self.source, "caught_up", 0.0) if len(draft) and not followed else 0.0
        trail.clock = (len(ids), now, costs, 1 + len(draft), probe, overhead)
        if len(draft):
            self.stats.verifications += 1
            self.stats.drafted += len(draft)
            self.stats.probes += probe
        return draft

    def _gated(self, ids: np.ndarray, room: int) -> tuple:
        """(draft, kind, False): as long a draft as the gate allows, whatever it costs."""
        n = min(self.gate.allows(len(ids)), room)
        if n < 1:
            return EMPTY, None, False
        if self._free:
            draft, kind = self.source.propose(ids, n)
            return draft[:n], kind, False
        return self.source(ids, n)[:n], self._family, False

    def _paced(self, trail: Trail, ids: np.ndarray, room: int, costs: StepCosts) -> tuple:
        """(draft, kind, probe): the draft the pace finds worth its measured cost, if any."""
        if self._free:
            proposal, kind = self.source.propose(ids, self.pace.max_draft)
            n, probe = self.pace.choose(kind, min(len(proposal), room), costs)
            if len(proposal) and not n:  # a draft not made: the text will tell how much of it would have passed
                trail.watched.append((len(ids), proposal, kind))
            return proposal[:n], kind, probe
        n, probe = self.pace.choose(self._family, min(self.pace.max_draft, room), costs, watched=False)
        return (self.source(ids, n)[:n] if n else EMPTY), self._family, probe

    def _time_step(self, trail: Trail, length: int, now: float) -> None:
        """Time the step since the previous call (its decode, sampling and drafting)."""
        if trail.clock is None:
            return
        before, then, costs, rows, probe, overhead = trail.clock
        if costs is not None and length > before:
            self.pace.record(costs, rows, now - then, length - before, probe, overhead)

    def _settle(self, trail: Trail, ids: np.ndarray) -> None:
        """Record how many tokens of the last draft the sampler kept (they now stand in ``ids``)."""
        if trail.last is None:
            return
        start, draft, kind, expected = trail.last
        accepted = _passed(draft, ids[start : start + len(draft)])
        self.gate.record(len(ids), len(draft), accepted)
        self.pace.drafted(kind, len(draft), accepted, expected)
        self.stats.settled += len(draft)
        self.stats.accepted += accepted
        trail.last = None

    def _watch(self, trail: Trail, ids: np.ndarray) -> None:
        """Count each watched (unverified) draft as a draft once the text shows how much of it it follows."""
        waiting = []
        for start, draft, kind in trail.watched:
            got = ids[start : start + len(draft)]
            passed = _passed(draft, got)
            if passed < len(got) or len(got) == len(draft):
                self.pace.acceptance.add(kind, passed, len(draft))
            else:
                waiting.append((start, draft, kind))
        trail.watched = waiting


def _passed(draft: np.ndarray, got: np.ndarray) -> int:
    """How many leading tokens of ``draft`` the text ``got`` (that followed it) has."""
    return int(np.cumprod(got == draft[: len(got)]).sum()) if len(got) else 0


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
