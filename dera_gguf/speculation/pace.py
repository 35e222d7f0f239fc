"""When to draft and how much: expected tokens per unit of measured cost.

A draft of d tokens, each passing with probability a once the ones before it passed, makes
its step emit ``1 + a + ... + a^d`` tokens on average (:func:`expected_tokens`), for the cost
of a (d + 1)-row step, measured on this machine in one-row steps
(:class:`~dera_gguf.speculation.costs.StepCosts`). A draft is made only when its expected tokens per unit
of cost beat a plain step's one token per step by a margin (:func:`best_draft`), at the size
that gives the most.

Both numbers are learned, and both start where no draft pays:

* how often drafts pass (:class:`Acceptance`), per kind of draft (prompt lookup's match
  length, a model's drafts), starts at a prior of one failed token with every text. Prompt
  lookup is free, so its draft is proposed at every step, drafted or not, and the tokens that
  follow tell how many of it would have passed: acceptance is learned without verifying
  anything.
* what a batch size costs is known only once a step of that size has been timed. Drafting at
  an unmeasured size is a probe, paid from an exploration budget: a share of the time spent
  so far, minus what earlier probes cost beyond plain steps, and made only once the budget
  covers the most a probe can cost (:func:`may_probe`). An engine that has measured nothing
  drafts nothing at first, and what exploring costs stays within that share of its time.

Acceptance learned from earlier drafts is an optimistic guide to the next one (a copy ends, and
the evidence that it was going on is what made the draft look good), so the expected tokens are
also scaled by how many of their expected tokens the drafts made so far did emit.

The decisions are pure functions of those numbers; :class:`Pace` holds the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

from .costs import UNMEASURED_ROW, StepCosts


def expected_tokens(acceptance: float, drafted: int) -> float:
    """Tokens a step emits on average when it verifies ``drafted`` tokens, each passing with
    probability ``acceptance`` once those before it passed: 1 + a + a^2 + ... + a^drafted."""
    return sum(acceptance**i for i in range(drafted + 1))


def best_draft(
    acceptance: float, longest: int, ratio: Callable[[int], float], margin: float, calibration: float = 1.0
) -> int:
    """How many tokens to draft (1 ... ``longest``), or 0 for none.

    The size with the most expected tokens per unit of cost, ``calibration * expected_tokens(a, d) /
    ratio(d + 1)`` (``ratio(k)``: a k-row step's cost in one-row steps; ``calibration``: the share of
    their expected tokens that drafts made so far emitted), if that is at least ``1 + margin`` tokens
    per one-row step (a plain step emits 1); the smaller size on a tie.
    """
    best, value = 0, 1.0 + margin
    for drafted in range(1, longest + 1):
        per_cost = calibration * expected_tokens(acceptance, drafted) / ratio(drafted + 1)
        if per_cost > value or (best == 0 and per_cost == value):
            best, value = drafted, per_cost
    return best


def probe_cost(drafted: int) -> float:
    """The most a probe of ``drafted`` tokens at a batch size never measured costs beyond plain steps, in
    one-row steps: the step priced at :data:`~dera_gguf.speculation.costs.UNMEASURED_ROW` per extra row, and only
    the one token every step emits (nothing drafted passing)."""
    return UNMEASURED_ROW * drafted


def may_probe(acceptance: Optional[float], drafted: int, budget_steps: float) -> bool:
    """Whether to probe with ``drafted`` tokens: the exploration budget (in one-row steps) covers the most
    the probe can cost, and at least half its tokens are expected to pass (a draft worth measuring is one
    worth making wherever verification is cheap). ``acceptance`` None: not known without drafting (a
    model's drafts), so the probe is how it is learned, and the budget alone decides."""
    affordable = budget_steps >= probe_cost(drafted)
    promising = acceptance is None or expected_tokens(acceptance, drafted) >= 1 + drafted / 2
    return drafted > 0 and affordable and promising


class Acceptance:
    """How often drafted tokens of each kind passed: per kind, counts of tokens that passed and of
    tokens tested (a draft tests its tokens up to the first that fails), older drafts fading by
    ``memory`` per new draft of the kind. The rate counts one failed token more than seen, so a
    kind never seen has rate 0 and a few lucky tokens do not make a high one."""

    def __init__(self, memory: float = 0.9):
        self.memory = memory
        self._counts: Dict[str, list] = {}

    def add(self, kind: str, passed: int, drafted: int) -> None:
        """A draft of ``drafted`` tokens of which the first ``passed`` passed."""
        tested = passed + (1 if passed < drafted else 0)
        counts = self._counts.setdefault(kind, [0.0, 0.0])
        counts[0] = self.memory * counts[0] + passed
        counts[1] = self.memory * counts[1] + tested

    def rate(self, kind: Optional[str]) -> float:
        passed, tested = self._counts.get(kind, (0.0, 0.0))
        return passed / (tested + 1.0)


@dataclass
class Pace:
    """What the speculation of one engine has learned, and its decisions from it.

    Args:
        timed: False drafts whenever the gate allows, whatever steps cost (tests use it: their
            outcome must not depend on how fast the machine is).
        max_draft: the most tokens one draft may have.
        margin: how much a draft must beat a plain step by (expected tokens per one-row step).
        explore: the share of the measured time that probes at unmeasured sizes may cost.
        trust: a batch size counts as measured after this many timed steps; before, drafting at
            it is a probe.
        probe_size: tokens a probe drafts (a draft of prompt lookup that has fewer is not a probe).
        memory: how fast old drafts fade from the acceptance rates (:class:`Acceptance`) and from
            the calibration.
    """

    timed: bool = True
    max_draft: int = 8
    margin: float = 0.1
    explore: float = 0.02
    trust: int = 3
    probe_size: int = 8
    memory: float = 0.9
    acceptance: Acceptance = field(init=False)
    budget: float = field(default=0.0, init=False)  # seconds that probes may still cost beyond plain steps
    _emitted: list = field(default_factory=lambda: [8.0, 8.0], init=False)  # [emitted, expected] tokens of drafts

    def __post_init__(self):
        self.acceptance = Acceptance(self.memory)

    @property
    def calibration(self) -> float:
        """Tokens the drafts made so far emitted, per token expected of them (a prior of one draft as expected)."""
        return self._emitted[0] / self._emitted[1]

    def expected(self, kind: Optional[str], drafted: int) -> float:
        """Tokens a draft of ``kind`` and ``drafted`` tokens is expected to emit (uncalibrated)."""
        return expected_tokens(self.acceptance.rate(kind), drafted)

    def drafted(self, kind: Optional[str], drafted: int, passed: int, expected: float) -> None:
        """A draft was verified: ``passed`` of its ``drafted`` tokens passed (its step emitted one more),
        where ``expected`` tokens were expected."""
        self.acceptance.add(kind, passed, drafted)
        self._emitted = [self.memory * self._emitted[0] + passed + 1, self.memory * self._emitted[1] + expected]

    def choose(self, kind: Optional[str], longest: int, costs: StepCosts, watched: bool = True) -> tuple:
        """(tokens to draft, whether that is a probe) for a draft of ``kind`` of at most ``longest`` tokens.

        A probe has ``probe_size`` tokens: the largest batch is measured, and a smaller size costs no
        more than it (:func:`~dera_gguf.speculation.costs.ratio_at`) until measured itself. ``watched``: whether
        this kind's acceptance is learned without drafting (prompt lookup); if not, probes learn it too.
        """
        rate = self.acceptance.rate(kind)
        drafted = best_draft(rate, longest, costs.ratio, self.margin, self.calibration)
        if drafted:
            return drafted, False
        size, step = self.probe_size, costs.step_seconds
        if longest < size or not step or costs.measured(size + 1) >= self.trust:
            return 0, False
        return (size, True) if may_probe(rate if watched else None, size, self.budget / step) else (0, False)

    def new_text(self) -> None:
        """A new text: acceptance is learned again (from its own drafts); costs, budget, calibration stay."""
        self.acceptance = Acceptance(self.memory)

    def record(
        self, costs: StepCosts, rows: int, seconds: float, tokens: int, probe: bool, overhead: float = 0.0
    ) -> None:
        """A step of ``rows`` rows that took ``seconds`` and emitted ``tokens``; a probe pays what it cost
        beyond plain steps from the budget (or adds what it saved). ``overhead``: seconds of the step that
        are not its rows' cost (a drafter of its own catching up with the text after a pause, a cost of
        the pause): left out of the step's cost, paid from the budget."""
        step = costs.step_seconds
        if probe and step:
            self.budget -= seconds - tokens * step
        elif overhead:
            self.budget -= overhead
        self.budget += self.explore * seconds
        costs.record(rows, seconds - overhead)
