"""An LLM judge over a sweep's samples: asked as rows finish, every reply kept, resumed without asking twice.

:class:`Judge` is what the user sets (kind, endpoint, prompt, pace); :class:`Judging` runs it over
one sweep. Questions (:mod:`.questions`) go to a pool of threads as soon as the samples they need
are there, so the judge works while the pair still generates; each reply is written to
``judgments.jsonl`` in the run folder (the key, what was judged, the prompt sent, the raw reply,
the grade or verdict read from it, its status) the moment it arrives. A later run with the same
folder asks only the questions without a reply: a reply without a grade is kept (at temperature 0
the judge would say the same again), a request that failed is asked again. The settings that make
a judge (kind, model name, reply length, prompt text) are hashed into every key and recorded in
``judges.json`` (with the address last used): another prompt or model name judges the same samples
anew, and the samples are reused. The address is not part of it, so a local judge restarted on
another port goes on where it was; give a local model a name of its own (``--judge-model``).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ...errors import DeRaError
from ..data import Row
from ..store import ResultStore, atomic_write
from .client import Endpoint, JudgeClient, Reply
from .prompts import JudgePrompt, parse_rating, parse_verdict
from .questions import (
    ERROR,
    OK,
    UNRATED,
    Question,
    key_of,
    lam_name,
    pairwise_outcome,
    pairwise_questions,
    single_outcome,
    single_questions,
    turns_of,
)

JUDGMENTS_FILE = "judgments.jsonl"
JUDGES_FILE = "judges.json"


@dataclass(frozen=True)
class Judge:
    """An LLM judge for :func:`~dera_gguf.eval.generate`.

    Args:
        kind: ``"single"`` (a 1-10 grade per answer, MT-bench's single-answer grading) or ``"pairwise"``
            (each answer against the answer at each ``baselines`` λ, in both orders).
        url, model, key, max_tokens, timeout: the endpoint (:class:`~.client.Endpoint`); the key is never
            recorded.
        prompt: a judge prompt file of one's own (None: ours, in dera_gguf/data/).
        baselines: pairwise: the λ values each answer is compared with (added to the sweep if missing).
        concurrency: requests in flight at once.
        rpm: requests started per minute at most (None: no limit).
        retries, backoff: further tries of a failed request, and the first back-off in seconds (doubling).
    """

    kind: str
    url: str
    model: str
    key: Optional[str] = field(default=None, repr=False)
    prompt: Optional[str] = None
    baselines: Tuple[float, ...] = ()
    concurrency: int = 4
    rpm: Optional[float] = None
    retries: int = 3
    backoff: float = 1.0
    max_tokens: int = 512
    timeout: float = 120.0

    def __post_init__(self):
        if self.kind not in ("single", "pairwise"):
            raise DeRaError(f"unknown judge {self.kind!r}: choose single or pairwise")
        object.__setattr__(self, "baselines", tuple(float(b) for b in self.baselines))
        if (self.kind == "pairwise") != bool(self.baselines):
            raise DeRaError(
                "a pairwise judge compares with the answers at --baseline-lam (one λ or several); "
                "a single judge takes none"
            )
        if self.concurrency < 1 or self.retries < 0 or self.max_tokens < 1 or not self.timeout > 0:
            raise DeRaError("the judge needs concurrency >= 1, retries >= 0, max_tokens >= 1 and a timeout > 0")
        if self.rpm is not None and not self.rpm > 0:
            raise DeRaError(f"--judge-rpm must be positive, got {self.rpm}")
        if not self.url.startswith(("http://", "https://")):
            raise DeRaError(f"--judge-url {self.url!r}: give the API's address, e.g. http://127.0.0.1:8080/v1")

    def endpoint(self) -> Endpoint:
        return Endpoint(self.url, self.model, self.key, self.max_tokens, self.timeout)

    def load_prompt(self) -> JudgePrompt:
        return JudgePrompt.load(self.kind, self.prompt)

    def identity(self, prompt_text: str) -> Dict[str, Any]:
        """What makes this judge's replies what they are: its kind, model name, reply length and prompt. Not
        where it is (a local server restarted on another port is the same judge), nor the key or the pace."""
        return {
            "kind": self.kind,
            "model": self.model,
            "temperature": 0,
            "max_tokens": self.max_tokens,
            "prompt": prompt_text,
        }

    def metrics(self) -> Dict[str, tuple]:
        """Its summary metrics, ``name -> (record field, higher is better)``; the first picks the best λ."""
        if self.kind == "single":
            return {"mean_rating": ("rating", True)}
        out: Dict[str, tuple] = {}
        for b in self.baselines:
            s = lam_name(b)
            out[f"win_rate_vs_{s}"] = (f"win_vs_{s}", True)
            out[f"tie_rate_vs_{s}"] = (f"tie_vs_{s}", None)
            out[f"loss_rate_vs_{s}"] = (f"loss_vs_{s}", False)
        return out

    def counts(self) -> Dict[str, Callable[[Mapping[str, Any]], bool]]:
        """Its per-λ counts: samples judged, and samples whose judging failed."""
        fields = (
            ["judge_status"] if self.kind == "single" else [f"judge_status_vs_{lam_name(b)}" for b in self.baselines]
        )
        present = lambda r: [r[f] for f in fields if f in r]  # (a baseline's own samples have none)
        return {
            "judged": lambda r: bool(present(r)) and all(s == OK for s in present(r)),
            "judge_failed": lambda r: any(s == "failed" for s in present(r)),
        }


class MemoryStore(ResultStore):
    """A :class:`~dera_gguf.eval.store.ResultStore` without a file (a sweep without ``out_dir``)."""

    def __init__(self):
        self.path, self.key_fields, self.records = None, ("key",), {}

    def append(self, records: Iterable[Dict[str, Any]]) -> None:
        for record in records:
            self.records[self.key(record)] = record


class Judging:
    """``judge`` over one sweep of ``rows``, its judgments in ``out_dir`` (None: in memory)."""

    def __init__(self, judge: Judge, rows: Iterable[Row], out_dir: Optional[str]):
        self.judge = judge
        self.prompt = judge.load_prompt()
        identity = judge.identity(self.prompt.text)
        self.hash = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
        self.identity, self.out_dir = identity, out_dir
        self.rows = {row.id: row for row in rows}
        self.store: ResultStore = MemoryStore()  # the run folder's judgments once open()
        self.samples: Dict[tuple, Dict[str, Any]] = {}  # (row, λ, sample) -> record
        self.asked: set = set()  # keys queued by this run
        self.answered = 0  # of them
        self.client = JudgeClient(judge.endpoint(), judge.retries, judge.backoff, judge.rpm)
        self.todo: "queue.Queue[Optional[Question]]" = queue.Queue()
        self.done: "queue.Queue[Dict[str, Any]]" = queue.Queue()
        self.lock = threading.Lock()  # the store's file
        self.threads: List[threading.Thread] = []
        self.stored: Dict[tuple, Dict[str, Any]] = {}  # the judgments as annotate() read them

    def open(self) -> None:
        """Read the judgments of earlier runs in the run folder (made by then) and record this judge there."""
        if self.out_dir is not None:
            self.store = ResultStore(os.path.join(self.out_dir, JUDGMENTS_FILE), ("key",))
            seen = {**self.identity, "url": self.judge.url}
            record_judge(os.path.join(self.out_dir, JUDGES_FILE), self.hash, seen)

    # ------------------------------------------------------------ asking

    def submit(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Ask every question these samples (with those already seen) make possible and no reply answers."""
        touched = set()
        for r in records:
            self.samples[(r["row"], float(r["lam"]), r["sample"])] = dict(r)
            touched.add(r["row"])
        for key, record in list(self.samples.items()):
            if key[0] in touched:
                for question in self._questions(record):
                    self._ask(question)
        self.collect()

    def _questions(self, record: Mapping[str, Any]) -> List[Question]:
        row = self.rows.get(record["row"])
        if row is None:
            return []
        if self.judge.kind == "single":
            return single_questions(self.hash, self.prompt, row, record)
        out = []
        for b in self.judge.baselines:
            base = self.samples.get((record["row"], b, record["sample"]))
            if base is not None and float(record["lam"]) != b:
                out += pairwise_questions(self.hash, self.prompt, row, record, base)
        return out

    def _ask(self, question: Question) -> None:
        stored = self.judgment(question.key)
        if question.key in self.asked or (stored is not None and stored["status"] != ERROR):
            return
        self.asked.add(question.key)
        if len(self.threads) < self.judge.concurrency:
            thread = threading.Thread(target=self._work, name=f"judge-{len(self.threads)}", daemon=True)
            self.threads.append(thread)
            thread.start()
        self.todo.put(question)

    def _work(self) -> None:
        """A pool thread: ask, read, write each judgment the moment its reply arrives."""
        while True:
            question = self.todo.get()
            if question is None or self.client.stop.is_set():
                return
            started = time.time()
            try:
                reply = self.client.ask(question.prompt)
            except Exception as e:  # (the client closed under a request: the sweep is stopping)
                reply = Reply(None, f"{type(e).__name__}: {e}", 1)
            if self.client.stop.is_set() and reply.text is None:
                return  # interrupted, not failed: asked again by the next run
            judgment = self._judgment(question, reply, time.time() - started)
            try:
                with self.lock:
                    self.store.append([judgment])
            except Exception as e:  # (a full disk): counted as done, asked again by the next run
                judgment = {**judgment, "status": ERROR, "error": f"not written: {type(e).__name__}: {e}"}
            self.done.put(judgment)

    def _judgment(self, question: Question, reply: Reply, seconds: float) -> Dict[str, Any]:
        score: Any = None
        if reply.text is not None:
            score = parse_rating(reply.text) if self.judge.kind == "single" else parse_verdict(reply.text)
        status = ERROR if reply.text is None else OK if score is not None else UNRATED
        return {
            "key": question.key,
            "judge": self.hash,
            "kind": self.judge.kind,
            **question.about,
            "status": status,
            "score": score,
            "reply": reply.text,
            "error": reply.error,
            "tries": reply.tries,
            "seconds": round(seconds, 3),
            "prompt": question.prompt,
        }

    def collect(self) -> List[Dict[str, Any]]:
        """The judgments that arrived since the last call (without waiting)."""
        out = []
        while True:
            try:
                out.append(self.done.get_nowait())
            except queue.Empty:
                break
        self.answered += len(out)
        return out

    def wait(self, progress: Optional[Callable[[str, int, int], None]] = None) -> None:
        """Wait for every question asked; ``progress("judging", answered, asked)`` after each reply."""
        report = progress or (lambda label, done, total: None)
        self.collect()
        report("judging", self.answered, len(self.asked))
        while self.answered < len(self.asked):
            self.done.get()
            self.answered += 1
            self.answered += len(self.collect())
            report("judging", self.answered, len(self.asked))

    def close(self) -> None:
        """Stop asking: queued questions are dropped (asked by the next run), the threads end."""
        self.client.close()
        for _ in self.threads:
            self.todo.put(None)
        for thread in self.threads:
            thread.join(timeout=1.0)  # daemon threads: one stuck in a request does not hold the process

    # ----------------------------------------------------------- results

    def annotate(self, records: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
        """Copies of ``records`` with the judge's outcome of each (:mod:`.questions`), from the stored replies."""
        with self.lock:  # (a pool thread of an interrupted run may still be writing one)
            self.stored = dict(self.store.records)
        index = {(r["row"], float(r["lam"]), r["sample"]): r for r in records}
        index.update({k: v for k, v in self.samples.items() if k not in index})
        out = []
        for r in records:
            row = self.rows.get(r["row"])
            extra: Dict[str, Any] = {}
            if row is not None and self.judge.kind == "single":
                n = len(turns_of(row, r))
                extra = single_outcome([self._stored(r, t) for t in range(n)])
            elif row is not None:
                for b in self.judge.baselines:
                    if float(r["lam"]) == b or (r["row"], b, r["sample"]) not in index:
                        continue
                    n = len(turns_of(row, r))
                    lam = float(r["lam"])
                    pairs = [(self._stored(r, t, (lam, b)), self._stored(r, t, (b, lam))) for t in range(n)]
                    extra.update(pairwise_outcome(pairs, lam_name(b)))
            out.append({**r, **extra})
        return out

    def _stored(self, record, turn: int, lams: Optional[Tuple[float, float]] = None) -> Optional[dict]:
        """The judgment of a sample's turn (pairwise: of the question showing the answers at ``lams`` as A, B)."""
        about = {"row": record["row"], "sample": record["sample"], "turn": turn}
        if lams is None:
            about["lam"] = float(record["lam"])
        else:
            about["lam_a"], about["lam_b"] = lams
        return self._stored_judgment(key_of(self.hash, about))

    def judgment(self, key: str) -> Optional[Dict[str, Any]]:
        """The stored judgment of the question ``key`` (the latest), if any."""
        return self.store.records.get((key,))

    def _stored_judgment(self, key: str) -> Optional[Dict[str, Any]]:
        return self.stored.get((key,))

    def report(self) -> str:
        """How the judging went: replies of this run, those reused, and the failures (the first one's reason)."""
        with self.lock:
            mine = [j for j in self.store.records.values() if j["judge"] == self.hash]
        asked = [j for j in mine if j["key"] in self.asked]
        failed = [j for j in mine if j["status"] != OK]
        line = (
            f"judge {self.hash} ({self.judge.kind}, {self.judge.model}): {len(asked)} question(s) asked now, "
            f"{len(mine) - len(asked)} answered by earlier runs"
        )
        if failed:
            errors = sum(j["status"] == ERROR for j in failed)
            what = "grade" if self.judge.kind == "single" else "verdict"
            first = failed[0]
            why = first["error"] or f"no {what} in: {first['reply']!r}"
            line += (
                f"; {len(failed) - errors} without a {what}, {errors} without a reply "
                f"(asked again by the next run); first: {why[:200]}"
            )
        return line


def record_judge(path: str, judge_hash: str, identity: Dict[str, Any]) -> None:
    """Add this judge's settings to ``judges.json`` (hash -> settings and address): what each key's hash
    stands for."""
    known: Dict[str, Any] = {}
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                known = json.load(f)
        except (OSError, json.JSONDecodeError):
            known = {}
    if known.get(judge_hash) != identity:
        known[judge_hash] = identity
        atomic_write(path, json.dumps(known, indent=2, sort_keys=True) + "\n")
