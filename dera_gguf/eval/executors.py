"""Where a sweep's rows run: one after the other in this process, or on Ray workers (:mod:`.cluster`).

A command describes its per-row computation as a :class:`~.tasks.RowTask`; whichever
process computes rows opens the task on its own :class:`~.models.EvalPair`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional, Tuple

from .data import Row, RowProblem
from .models import PairSpec
from .tasks import Execute, Outcome, RowTask, Work


def serial(work: Work) -> Execute:
    """Run ``work`` on the rows one after the other, in this process."""

    def execute(todo: List[Tuple[Row, List[float]]]) -> Iterator[Outcome]:
        for row, lams in todo:
            try:
                yield Outcome(row, work(row, lams))
            except RowProblem as e:
                yield Outcome(row, [], str(e))

    return execute


@contextlib.contextmanager
def row_executor(
    pair, task: RowTask, ray=None, workers: Optional[int] = None, log: Optional[Callable[[str], None]] = None
):
    """How a command's rows run: ``task`` on ``pair`` here, or on Ray workers when ``ray`` is set.

    ``pair`` is an open :class:`~.models.EvalPair` or a :class:`~.models.PairSpec` (opened here,
    and closed at the end, when rows run in this process).
    """
    if ray is not None and ray is not False:
        from .cluster import RayExecutor

        spec = pair if isinstance(pair, PairSpec) else pair.spec
        with RayExecutor(spec, task, address=ray, workers=workers, log=log) as execute:
            yield execute
        return
    with contextlib.ExitStack() as stack:
        if isinstance(pair, PairSpec):
            pair = stack.enter_context(pair.open())
        opened = task.open(pair)
        stack.callback(opened.close)
        yield serial(opened.work)
