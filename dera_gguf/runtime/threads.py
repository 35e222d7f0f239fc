"""How many CPU threads each context gets, and running the contexts' decodes at the same time.

On a CPU, two contexts that decode one after the other, each on all cores, cost twice one
model; the same two decoding at the same time, each on its share of the cores, may cost less
(one token's decode of a small model does not scale to all cores) or the same (a large model's
decodes both wait on memory), and a batch of many rows may scale better on all cores. Which
plan is faster depends on the machine, the models, the batch and the load, so by default the
plan is chosen by measurement (:class:`PlanChoice`): per number of contexts and batch size,
both plans are timed, and the faster one runs, the slower one retried now and then.
``ctypes`` releases the GIL during ``llama_decode``, so plain Python threads run the contexts
in parallel. The logits are the same under either plan.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Sequence

import llama_cpp


def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads slow llama.cpp down, so they do not count).

    Linux: distinct (package, core) pairs of /proc/cpuinfo among the CPUs this process may run
    on; elsewhere llama-cpp-python's own guess, half the logical CPUs.
    """
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cores = _cpuinfo_cores(f.read())
    except OSError:
        cores = 0
    return max(1, min(cores, logical)) if cores else max(1, (os.cpu_count() or 2) // 2)


def _cpuinfo_cores(text: str) -> int:
    """Number of distinct (physical id, core id) pairs in /proc/cpuinfo text (0 if it has none)."""
    pairs, package = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            package = value.strip()
        elif key == "core id":
            pairs.add((package, value.strip()))
    return len(pairs)


_CHOOSING = threading.Lock()  # plans that share measurements may run in two threads (a server's engine and slots)


class PlanChoice:
    """Which of two plans (concurrent: True, one after the other: False) runs a kind of decode, by timing both.

    A run is timed only when the run before it used the same plan: the first run after a switch pays
    for the switch (the other plan's threads waking, a context's first decode of a shape building its
    graph), and counting it would favour whichever plan is running. A plan's cost is the median
    seconds per row of its latest ``window`` timed runs, so one slow step on a shared machine does not
    decide. Each plan is first run ``trials + 1`` times in a row (the first uncounted); then the
    cheaper one runs, and the other is tried again after ``recheck`` runs: ``retry`` runs in a row,
    the first uncounted, its cost then from those runs alone (its older ones may date from another
    load on the machine). Each time it is still dearer the next try waits twice as long, up to
    ``near`` runs while the two are within ``close`` of each other and ``most`` when far apart; when
    it wins it runs. A choice so follows a change in the machine's load, and exploring costs about 1 %.
    """

    def __init__(
        self,
        first: bool,
        trials: int = 5,
        recheck: int = 16,
        near: int = 64,
        most: int = 256,
        close: float = 0.15,
        retry: int = 3,
        window: int = 7,
    ):
        self.trials, self.recheck, self.retry = trials, recheck, retry
        self.near, self.most, self.close = near, most, close
        self.samples: Dict[bool, Deque[float]] = {first: deque(maxlen=window), not first: deque(maxlen=window)}
        self.timed: Dict[bool, int] = {first: 0, not first: 0}  # counted runs
        self.first, self._interval, self._until = first, recheck, recheck
        self._last: Optional[bool] = None  # the plan of the latest run
        self._block: Optional[bool] = None  # a plan being run several times in a row to be timed
        self._left = 0  # runs of it still to come

    @property
    def seconds(self) -> Dict[bool, Optional[float]]:
        """Each plan's cost: the median seconds per row of its latest timed runs (None before any)."""
        return {plan: statistics.median(runs) if runs else None for plan, runs in self.samples.items()}

    @property
    def best(self) -> bool:
        """The cheaper plan so far (the first plan until both are measured)."""
        a, b = self.seconds[True], self.seconds[False]
        if a is None or b is None:
            return self.first
        return a <= b

    def pick(self) -> bool:
        """The plan to run next."""
        if self._left:
            return self._block
        for plan in (self.first, not self.first):  # the trials: each plan in a block of its own
            if self.timed[plan] < self.trials:
                return self._run_in_a_row(plan, self.trials - self.timed[plan] + (plan != self._last))
        if self._until <= 0:
            other = not self.best
            self.samples[other].clear()  # its cost from this try alone
            return self._run_in_a_row(other, self.retry)
        self._until -= 1
        return self.best

    def _run_in_a_row(self, plan: bool, runs: int) -> bool:
        self._block, self._left = plan, runs
        return plan

    def record(self, plan: bool, seconds: float, rows: int) -> None:
        """A run of ``plan`` (the latest :meth:`pick`) took ``seconds`` for ``rows`` rows per context."""
        if plan == self._last:
            self.samples[plan].append(seconds / max(1, rows))
            self.timed[plan] += 1
        self._last = plan
        if self._left and plan == self._block:
            self._left -= 1
            if not self._left and min(self.timed.values()) >= self.trials:  # a retry of the other plan ended
                self._until = self._interval = self._next_interval(plan)

    def _next_interval(self, retried: bool) -> int:
        if retried == self.best:
            return self.recheck
        costs = self.seconds
        dearer = costs[retried] / max(costs[not retried], 1e-12) - 1.0
        return min(self.near if dearer < self.close else self.most, 2 * self._interval)


@dataclass
class ThreadPlan:
    """Threads for the contexts of a pair, and whether their decodes run at the same time.

    Args:
        n_threads: threads for one-token decodes, in all.
        n_threads_batch: threads for prompt batches, in all.
        concurrent: decode the active contexts in parallel, the threads split among them (with
            ``measured``: the plan tried first).
        measured: choose between the two plans by timing them (:class:`PlanChoice`), per number of
            contexts and batch size, for runs that name their rows.
    """

    n_threads: int
    n_threads_batch: int
    concurrent: bool
    measured: bool = False
    _pool: Optional[ThreadPoolExecutor] = field(default=None, repr=False)
    choices: Dict[tuple, PlanChoice] = field(default_factory=dict, repr=False)

    def run(self, contexts: Sequence, work: Callable, rows: int = 0) -> None:
        """``work(context)`` for every context: in parallel when concurrent, each on its share of threads.
        ``rows``: how many tokens each context decodes in it (0: unknown; the plan is then not measured)."""
        if len(contexts) < 2:
            return self._run(contexts, work, False)
        if not (self.measured and rows > 0):
            return self._run(contexts, work, self.concurrent)
        with _CHOOSING:
            choice = self.choices.get((len(contexts), size_class(rows)))
            if choice is None:
                choice = self.choices.setdefault((len(contexts), size_class(rows)), PlanChoice(self.concurrent))
            plan = choice.pick()
        start = time.perf_counter()
        self._run(contexts, work, plan)
        with _CHOOSING:
            choice.record(plan, time.perf_counter() - start, rows)

    def _run(self, contexts: Sequence, work: Callable, parallel: bool) -> None:
        parallel = parallel and len(contexts) > 1
        share = len(contexts) if parallel else 1
        for context in contexts:
            n, n_batch = max(1, self.n_threads // share), max(1, self.n_threads_batch // share)
            llama_cpp.llama_set_n_threads(context.ctx.ctx, n, n_batch)
        if not parallel:
            for context in contexts:
                work(context)
            return
        futures = [self._executor().submit(work, context) for context in contexts[1:]]
        try:
            work(contexts[0])
        finally:
            _wait_all(futures)  # nothing may touch a context while its decode runs

    def copy(self) -> "ThreadPlan":
        """The same plan for other contexts of the same models (several sequences): its own decode threads, and
        the same measurements (those contexts' decodes cost what these contexts' do)."""
        return ThreadPlan(self.n_threads, self.n_threads_batch, self.concurrent, self.measured, choices=self.choices)

    def chosen(self) -> Dict[tuple, tuple]:
        """What was measured: (contexts, batch size class) -> (plan in use, "concurrent" per-row seconds,
        "sequential" per-row seconds)."""
        return {k: (c.best, c.seconds[True], c.seconds[False]) for k, c in sorted(self.choices.items())}

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=7, thread_name_prefix="dera-decode")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def size_class(rows: int) -> int:
    """The batch size a measurement counts for: 1, 2, then powers of two (3-4 -> 4, 5-8 -> 8, ...), at most 256."""
    return min(256, 1 << max(0, rows - 1).bit_length())


def _wait_all(futures: List) -> None:
    """Wait for every future, even through Ctrl-C, then raise the first failure."""
    try:
        wait(futures)
    except KeyboardInterrupt:
        wait(futures)
        raise
    for future in futures:
        future.result()
