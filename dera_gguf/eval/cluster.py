"""Sweeps sharded over Ray: workers that each load the pair once and compute rows.

The driver (the process that calls :func:`~dera_gguf.eval.score` / ``generate``) keeps
the queue of rows, hands each worker at most ``depth`` rows at a time, and gets every
finished row back as it completes; it alone writes the result store, the summary and
the plot (:mod:`.runner`). A row's numbers do not depend on the process computing it
(score rows start from an empty cache; each (row, λ, sample) of generate has its own
seed), so a sharded sweep gives the results of one process.

Faults: a worker that dies (killed, out of memory, its node lost) costs only the rows
it held; they go back to the front of the queue and a new worker takes its place. The
row it was computing counts one try against it; a row that has failed ``max_tries``
times is skipped and reported like a bad row, with its line number. Errors that are
the data's (a RowProblem) are reported as in one process; any other exception raised
by a row stops the sweep, as it would in one process.
"""

from __future__ import annotations

import collections
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Deque, Dict, Iterator, List, NamedTuple, Optional, Tuple

from ..errors import DeRaError
from .data import Row, RowProblem
from .models import PairSpec
from .tasks import Outcome, RowTask

LOCAL = "local"
THREADS_PER_CPU_WORKER = 4  # default llama.cpp threads of a CPU worker (when --threads is not given)


@dataclass(frozen=True)
class RayOptions:
    """How a sweep uses Ray.

    Args:
        address: ``"local"`` starts a Ray runtime on this machine (or uses the one this process
            already joined with ``ray.init``); ``"auto"`` or ``"ray://host:port"`` joins a cluster.
        workers: how many workers (default: one per GPU when offloading, else the cluster's CPUs
            divided by each worker's threads).
        max_tries: tries a row gets on workers that die under it before it is skipped.
        depth: rows queued on a worker at once (2: the next row waits there while one computes).
    """

    address: str = LOCAL
    workers: Optional[int] = None
    max_tries: int = 3
    depth: int = 2


def ray_options(ray: Any, workers: Optional[int]) -> RayOptions:
    """The ``ray=`` argument of score()/generate() (True, an address or RayOptions) as RayOptions."""
    if isinstance(ray, RayOptions):
        options = ray
    elif ray is True or ray == "" or ray is None:
        options = RayOptions()
    elif isinstance(ray, str):
        options = RayOptions(address=ray)
    else:
        raise DeRaError(f"ray must be True, an address ('local', 'auto', 'ray://host:port') or RayOptions, got {ray!r}")
    if workers is not None:
        options = replace(options, workers=workers)
    if options.workers is not None and options.workers < 1:
        raise DeRaError(f"workers must be at least 1, got {options.workers}")
    if options.max_tries < 1 or options.depth < 1:
        raise DeRaError("max_tries and depth must be at least 1")
    return options


def import_ray():
    try:
        import ray
    except ImportError:
        raise DeRaError("--ray needs Ray: pip install 'dera-gguf[cluster]'") from None
    return ray


class RowResult(NamedTuple):
    """What a worker sends back for a row: its records, or why it was skipped (a RowProblem), or a
    DeRaError's message (the driver raises it: as in one process, it stops the sweep)."""

    records: List[Dict[str, Any]]
    problem: Optional[str] = None
    error: Optional[str] = None


class RowWorker:
    """A Ray actor: one loaded pair, computing the rows it is given (one at a time)."""

    def __init__(self, spec: PairSpec, task: RowTask):
        start = time.perf_counter()
        self.pair = spec.open()
        self.work, self.close = task.open(self.pair)
        self.load_s = time.perf_counter() - start

    def info(self) -> Dict[str, Any]:
        """Where this worker runs and how long its pair took to load."""
        import socket

        return {"pid": os.getpid(), "host": socket.gethostname(), "load_s": self.load_s}

    def run(self, row: Row, lams: List[float]) -> RowResult:
        try:
            return RowResult(self.work(row, lams))
        except RowProblem as e:
            return RowResult([], problem=str(e))
        except DeRaError as e:
            return RowResult([], error=str(e))


class WorkerPlan(NamedTuple):
    """How many workers, the Ray resources of each, and the pair spec they load (with their threads)."""

    n_workers: int
    actor_options: Dict[str, Any]
    spec: PairSpec


class _Worker:
    """The driver's view of one actor: its handle, number, and the rows it holds, oldest first."""

    def __init__(self, number: int, actor, info_ref):
        self.number, self.actor, self.info_ref = number, actor, info_ref
        self.info: Optional[Dict[str, Any]] = None
        self.held: Deque[Any] = collections.deque()  # refs of rows given to it, in order


class _Given(NamedTuple):
    """A row handed to a worker, with the λ values it is to compute."""

    worker: _Worker
    row: Row
    lams: List[float]


class _Run:
    """The bookkeeping of one ``execute(todo)`` call: the rows still to hand out, who holds which,
    the tries each row lost to dead workers, and the workers not yet known to be ready."""

    def __init__(self, todo: List[Tuple[Row, List[float]]], max_starts: int):
        self.queue: Deque[Tuple[Row, List[float]]] = collections.deque(todo)
        self.tries: Dict[str, int] = collections.defaultdict(int)  # row id -> tries lost to dead workers
        self.given: Dict[Any, _Given] = {}  # row ref -> who holds which row
        self.loading: Dict[Any, _Worker] = {}  # info ref -> a worker not yet known to be ready
        self.max_starts = max_starts  # workers started (by the executor, in all) past which it gives up


class RayExecutor:
    """``execute(todo)`` for :func:`~.runner.run_sweep`, over Ray workers; a context manager.

    Entering connects to Ray (and starts a local runtime if asked to and none is running) and
    plans the workers; leaving kills this sweep's workers and, if it started the runtime, shuts it
    down, so neither Ctrl-C nor an error leaves a worker behind. The workers live as long as the
    executor; each call keeps its rows' bookkeeping apart (:class:`_Run`).
    """

    def __init__(self, spec: PairSpec, task: RowTask, address: Any = LOCAL, workers: Optional[int] = None, log=None):
        self.spec, self.task = spec, task
        self.options = ray_options(address, workers)
        self.log: Callable[[str], None] = log or (lambda message: None)
        self.ray = import_ray()
        self.owns_runtime = False  # whether entering started the Ray runtime (leaving then shuts it down)
        self.plan: Optional[WorkerPlan] = None  # the workers, their resources and pair spec: made on entering
        self.actor_class: Any = None  # RowWorker as a Ray actor with the plan's resources: made on entering
        self.workers: List[_Worker] = []  # the live workers, oldest first
        self.started = 0  # workers started so far
        self.pids: List[int] = []  # every worker's pid, as each reports

    # ------------------------------------------------------------ set up

    def __enter__(self) -> "RayExecutor":
        ray = self.ray
        if not ray.is_initialized():
            if self.options.address == LOCAL:
                ray.init(include_dashboard=False, configure_logging=False, log_to_driver=True)
            else:
                ray.init(address=self.options.address, configure_logging=False, log_to_driver=True)
            self.owns_runtime = True
        try:
            for code in self.task.user_code():
                ship_user_code(code)
            self.plan = self._plan()
            self.actor_class = ray.remote(RowWorker).options(max_restarts=0, **self.plan.actor_options)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _plan(self) -> WorkerPlan:
        """Workers, each one's Ray resources, and the pair spec they load (with their thread count)."""
        resources = self.ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
        if self.spec.n_gpu_layers != 0 and gpus > 0:  # (with no GPU in the cluster, offloading is a no-op)
            threads = self.spec.n_threads or 1  # the GPU computes; the thread samples and blends
            return WorkerPlan(
                self.options.workers or gpus, {"num_gpus": 1, "num_cpus": 1}, replace(self.spec, n_threads=threads)
            )
        if self.spec.n_threads:
            threads = self.spec.n_threads
            n = self.options.workers or max(cpus // threads, 1)
        elif self.options.workers:
            n = self.options.workers
            threads = max(cpus // n, 1)
        else:
            threads = max(min(THREADS_PER_CPU_WORKER, cpus), 1)
            n = max(cpus // threads, 1)
        return WorkerPlan(n, {"num_cpus": min(threads, max(cpus, 1))}, replace(self.spec, n_threads=threads))

    def __exit__(self, *exc) -> None:
        for worker in self.workers:
            try:
                self.ray.kill(worker.actor)
            except Exception:  # already dead
                pass
        self.workers = []
        if self.owns_runtime:
            self.ray.shutdown()
            self.owns_runtime = False

    # ------------------------------------------------------------- rows

    def __call__(self, todo: List[Tuple[Row, List[float]]]) -> Iterator[Outcome]:
        if not todo:
            return
        if self.plan is None:
            raise DeRaError("RayExecutor runs rows inside its with block (entering it plans the workers)")
        ray, plan = self.ray, self.plan
        run = _Run(todo, plan.n_workers + len(todo) * self.options.max_tries)
        for _ in range(min(plan.n_workers, len(todo))):
            self._start_worker(run)
        while run.queue or run.given:
            self._hand_out(run)
            (ref,), _ = ray.wait(list(run.loading) + list(run.given), num_returns=1)
            if ref in run.loading:
                worker = run.loading.pop(ref)
                try:
                    worker.info = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    yield from self._lost(worker, e, run)
                    continue
                self.pids.append(worker.info["pid"])
                self.log(
                    f"worker {worker.number} loaded the pair in {worker.info['load_s']:.1f} s "
                    f"(pid {worker.info['pid']} on {worker.info['host']}, {plan.spec.n_threads} thread(s))"
                )
                continue
            worker, row = run.given[ref].worker, run.given[ref].row
            try:
                result: RowResult = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                yield from self._lost(worker, e, run)
                continue
            del run.given[ref]
            worker.held.remove(ref)
            if result.error is not None:
                raise DeRaError(result.error)
            yield Outcome(row, result.records, result.problem)

    def _start_worker(self, run: _Run) -> _Worker:
        if self.started >= run.max_starts:
            raise DeRaError(f"Ray workers keep dying ({self.started} started): see the log above for why")
        actor = self.actor_class.remote(self.plan.spec, self.task)
        self.started += 1
        worker = _Worker(self.started, actor, actor.info.remote())
        self.workers.append(worker)
        run.loading[worker.info_ref] = worker
        return worker

    def _hand_out(self, run: _Run) -> None:
        """The queue's front to the ready workers with room, one row each per round.

        A worker gets rows once its pair is loaded: one that Ray cannot place (more workers
        than the cluster's CPUs or GPUs) holds none, and the others do all the rows.
        """
        for depth in range(1, self.options.depth + 1):
            for worker in self.workers:
                if run.queue and worker.info is not None and len(worker.held) < depth:
                    row, lams = run.queue.popleft()
                    ref = worker.actor.run.remote(row, lams)
                    worker.held.append(ref)
                    run.given[ref] = _Given(worker, row, lams)

    def _lost(self, worker: _Worker, error, run: _Run) -> List[Outcome]:
        """A worker died: its rows go back to the queue's front (the oldest one loses a try); replace it."""
        cause = _first_line(error)
        if worker.info is None and _is_creation_error(error):
            raise DeRaError(f"a Ray worker could not load the pair: {cause}")
        self.workers.remove(worker)
        run.loading.pop(worker.info_ref, None)
        held = [run.given.pop(ref) for ref in worker.held if ref in run.given]
        failed, back = [], []
        for i, (_, row, lams) in enumerate(held):
            if i == 0:  # the row it was computing
                run.tries[row.id] += 1
                if run.tries[row.id] >= self.options.max_tries:
                    message = f"failed on {run.tries[row.id]} tries: the Ray worker computing it died ({cause})"
                    failed.append(Outcome(row, [], message))
                    continue
            back.append((row, lams))
        run.queue.extendleft(reversed(back))
        self.log(f"worker {worker.number} died ({cause}); {len(back)} row(s) go back to the queue")
        if run.queue:
            self._start_worker(run)
        return failed


def ship_user_code(code) -> None:
    """Send the module of ``code`` (a reward function) to the workers by value unless it is installed code.

    A ``--reward my_rewards:f`` module found on the driver's path (the current folder, say) is
    not on the workers' path; an installed package is, and is imported there by name.
    """
    import sys
    import sysconfig

    module = sys.modules.get(getattr(code, "__module__", None) or "")
    path = getattr(module, "__file__", None)
    if module is None or path is None or module.__name__.startswith("dera_gguf"):
        return
    installed = {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib")}
    if not any(os.path.abspath(path).startswith(os.path.abspath(p) + os.sep) for p in installed):
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(module)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def _is_creation_error(error: BaseException) -> bool:
    """Whether the actor died because its __init__ raised (not killed): retrying will not help."""
    return "__init__" in str(error) or "creation task" in str(error)
