"""What a verification step costs on this machine, measured by the engine as it runs.

A generation step decodes one row (the last sampled token) or, with a draft of d tokens,
verifies d + 1 rows in one batch per model. What the extra rows cost against a one-row
step depends on the CPU or GPU, its kernels for one row and for many, the thread plan, the
models that decode and how many: no constant holds everywhere, so the speculation times every
step (from one draft call to the next: decode, blend, sampling, drafting) and keeps here, per
*kind of step* (the engine's key: models, thread plan, offloading; and the draft source), a
one-row step's seconds and, for each batch size that was verified, its cost in one-row steps.

The table lives as long as the process: a second engine, or the next request of a server,
starts from what the first one measured. A batch size never verified is priced as dear as it
could be (:func:`ratio_at`): past the largest measured size, one whole step per extra row, a cost
at which no draft pays, so drafting at a new size is a probe (:mod:`dera_gguf.speculation.pace`), never a
bet on a constant.
"""

from __future__ import annotations

from typing import Dict, Hashable, Optional

UNMEASURED_ROW = 1.0  # a verified row not measured yet costs as much as a one-row step


class _Average:
    """An exponentially weighted running average (a plain mean over the first ``1 / weight`` values)."""

    def __init__(self, weight: float):
        self.weight, self.count, self.value = weight, 0, None

    def add(self, x: float) -> None:
        self.count += 1
        if self.value is None:
            self.value = float(x)
        else:
            self.value += max(self.weight, 1.0 / self.count) * (x - self.value)


class StepCosts:
    """Measured step costs for one kind of step: seconds of a one-row step, and each verified batch
    size's cost in one-row steps (a step's seconds over the one-row average at the time).

    Args:
        weight: of the newest step in the running averages (older steps fade: the text grows,
            and the machine's load changes).
    """

    def __init__(self, weight: float = 0.1):
        self.weight = weight
        self.plain = _Average(weight)
        self._rows: Dict[int, _Average] = {}

    def record(self, rows: int, seconds: float) -> None:
        """A step that decoded ``rows`` rows in ``seconds`` (a batch is priced once one-row steps are known)."""
        if rows <= 1:
            self.plain.add(seconds)
        elif self.plain.value:
            self._rows.setdefault(rows, _Average(self.weight)).add(seconds / self.plain.value)

    def measured(self, rows: int) -> int:
        """How many steps of ``rows`` rows were timed (one-row steps: how many plain steps)."""
        if rows <= 1:
            return self.plain.count
        return self._rows[rows].count if rows in self._rows else 0

    def ratio(self, rows: int) -> float:
        """A step of ``rows`` rows in one-row steps (see :func:`ratio_at`)."""
        return ratio_at(rows, {k: a.value for k, a in self._rows.items()})

    def sizes(self) -> Dict[int, tuple]:
        """Every measured batch size: (its cost in one-row steps, how many steps were timed)."""
        return {k: (a.value, a.count) for k, a in sorted(self._rows.items())}

    @property
    def step_seconds(self) -> Optional[float]:
        """Seconds of a one-row step (None: none measured yet)."""
        return self.plain.value


def ratio_at(rows: int, known: Dict[int, float]) -> float:
    """The cost of a ``rows``-row step in one-row steps, from the measured sizes ``known`` (size -> cost).

    A measured size costs what was measured. Any other costs the most it could, were costs to grow
    with the rows by at most :data:`UNMEASURED_ROW` per row: no more than the next larger measured
    size, and no more than the next smaller one (a one-row step costs 1) plus that much per row.
    (Interpolating would be optimistic: on CPUs a batch's cost grows less and less per row, so a
    straight line under-prices the sizes between.)
    """
    if rows <= 1:
        return 1.0
    if rows in known:
        return known[rows]
    points = {1: 1.0, **known}
    below = max(k for k in points if k < rows)
    most = points[below] + UNMEASURED_ROW * (rows - below)
    above = [k for k in points if k > rows]
    return min(most, points[min(above)]) if above else most


_TABLES: Dict[Hashable, StepCosts] = {}


def step_costs(key: Hashable) -> StepCosts:
    """This process's measured costs for steps of kind ``key`` (made empty on first use)."""
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES.setdefault(key, StepCosts())
    return table


def measured() -> Dict[Hashable, StepCosts]:
    """Every kind of step this process has timed, and its costs."""
    return dict(_TABLES)


def forget() -> None:
    """Drop every measurement (as a new process would start: benchmarks of a fresh engine, tests)."""
    _TABLES.clear()
