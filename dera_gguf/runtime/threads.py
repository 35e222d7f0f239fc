"""How many CPU threads each context gets, and running the contexts' decodes at the same time.

On a CPU, two contexts that decode one after the other, each on all cores, cost twice one
model; the same two decoding at the same time, each on its share of the cores, cost less
(one token's decode does not scale to all cores on small models). ``ctypes`` releases the
GIL during ``llama_decode``, so plain Python threads run the contexts in parallel.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

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


@dataclass
class ThreadPlan:
    """Threads for the contexts of a pair, and whether their decodes run at the same time.

    Args:
        n_threads: threads for one-token decodes, in all.
        n_threads_batch: threads for prompt batches, in all.
        concurrent: decode the active contexts in parallel, the threads split among them.
    """

    n_threads: int
    n_threads_batch: int
    concurrent: bool
    _pool: Optional[ThreadPoolExecutor] = field(default=None, repr=False)

    def run(self, contexts: Sequence, work: Callable) -> None:
        """``work(context)`` for every context: in parallel when concurrent, each on its share of threads."""
        parallel = self.concurrent and len(contexts) > 1
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

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=7, thread_name_prefix="dera-decode")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _wait_all(futures: List) -> None:
    """Wait for every future, even through Ctrl-C, then raise the first failure."""
    try:
        wait(futures)
    except KeyboardInterrupt:
        wait(futures)
        raise
    for future in futures:
        future.result()
