"""The record of one running sequence: what it is conditioned on, how it draws, what it drew.

Set by whoever starts it: the mixing weights, the sampler chain (seeded on its own, so its
draw does not depend on its neighbours in the batch), the bias, how many log-probs to keep,
the stop rule and the budget; optionally a list that collects the KL to the reference per
token (dera-eval) and a draft source (prompt lookup). Set as it runs: the slot (its sequence
id in the pair's contexts), the prompt tokens its slot held and those still to decode, the tokens drawn, their
log-probs, and why it finished. Where it stands in the KV cache is read from llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, NamedTuple, Optional, Tuple
from typing import Sequence as Tokens

import numpy as np
from llama_cpp import _internals as internals

from ..speculation.verify import EMPTY, Gate, NgramIndex
from .runs import models_of


class Scored(NamedTuple):
    """One token's log-prob under the blend and the ``k`` most likely tokens' ``(id, log-prob)``."""

    logprob: float
    top: List[Tuple[int, float]]


@dataclass(eq=False)
class Sequence:
    """One sequence to decode (see the module docstring).

    ``weights``: on [reference, aligned_1, ...]; a model weighted 0 is never decoded for it.
    ``bias``: ``{token: added logit}``, added to the blended row before the chain samples it
    (llama-cpp-python's ``logit_bias``). ``logprobs``: how many of the most likely tokens to keep
    with each token drawn (0: its own log-prob only; None: none), from the blend before the bias,
    as llama-cpp-python's. ``stop(sequence)``: asked after each token; true ends it with ``"stop"``
    (a stop string in its text). ``finish`` is ``"stop"`` (end of text, stop rule), ``"length"``
    (``max_tokens`` reached) or None while it runs; a caller may set it between steps.
    """

    weights: np.ndarray
    chain: internals.LlamaSampler
    max_tokens: int = 0
    bias: Optional[dict] = None
    logprobs: Optional[int] = None
    stop: Optional[Callable[["Sequence"], bool]] = None
    kl: Optional[List[float]] = None
    drafts: Optional["LookupDrafts"] = None
    prompt: Tokens[int] = ()
    slot: int = -1
    reused: int = 0  # the first prompt tokens its slot held when it joined (not decoded again)
    pending: List[int] = field(default_factory=list)
    tokens: List[int] = field(default_factory=list)
    scored: List[Scored] = field(default_factory=list)
    finish: Optional[str] = None

    def models(self) -> List[int]:
        """The models it decodes in: those its blend weighs, and the reference when its KL is kept."""
        used = models_of(self.weights)
        return sorted({0, *used}) if self.kl is not None else used

    @property
    def position(self) -> int:
        """Where its next token goes: after the prompt and every token drawn but the last (not decoded yet)."""
        return len(self.prompt) + len(self.tokens) - 1


class LookupDrafts:
    """Prompt-lookup drafts of one sequence (its prompt and tokens), sized by its own gate from how much
    of its last drafts passed, not by timing: a run repeats itself exactly."""

    def __init__(self, index: NgramIndex):
        self.index, self.gate = index.fork(), Gate()
        self.drafted = self.accepted = 0

    def propose(self, position: int, room: int, left: int) -> np.ndarray:
        """A draft for the tokens after ``position``: at most ``room`` batch entries and ``left`` tokens."""
        n = min(self.gate.allows(position), left, room)
        return self.index(n) if n > 0 else EMPTY

    def settle(self, position: int, drafted: int, passed: int, new_tokens: Tokens[int]) -> None:
        """After a step: the tokens it drew join the index; a draft's fate sizes the next one."""
        self.index.extend(new_tokens)
        if drafted:
            self.gate.record(position, drafted, passed)
            self.drafted, self.accepted = self.drafted + drafted, self.accepted + passed
