"""What a command computes per row, and what comes back: the interface between the commands
(:mod:`.score`, :mod:`.generate`), the sweep loop (:mod:`.runner`) and where rows run
(:mod:`.executors`, :mod:`.cluster`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Protocol, Sequence, Tuple

from .data import Row
from .models import EvalPair

# work(row, the λ values it lacks) -> its records; may raise RowProblem.
Work = Callable[[Row, List[float]], List[Dict[str, Any]]]


class RowWork(NamedTuple):
    """A task opened on a pair: ``work`` and what frees its contexts."""

    work: Work
    close: Callable[[], None]


class RowTask(Protocol):
    """What a command computes per row (sent to Ray workers, so it must pickle)."""

    def open(self, pair: EvalPair) -> RowWork:
        """Set up on ``pair`` (its contexts) in the process that computes the rows."""

    def user_code(self) -> Sequence[Any]:
        """Objects from the user's own modules (a reward function) whose code Ray workers need."""


class Outcome(NamedTuple):
    """One finished row: its records, or why it was skipped (a RowProblem's message)."""

    row: Row
    records: List[Dict[str, Any]]
    problem: Optional[str] = None


# execute(rows and the λ values each lacks) -> outcomes, in any order, as rows finish.
Execute = Callable[[List[Tuple[Row, List[float]]]], Iterable[Outcome]]
