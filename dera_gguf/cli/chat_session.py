"""A chat conversation over a DeRaLlama: the history, lam and sampling settings.

Kept apart from the terminal loop (``chat.py``) so that every answer is, by
construction, one ``DeRaLlama.create_chat_completion`` call on the history as it
stands: the CLI is a front, not a second engine. Nothing here touches a terminal;
callers pass ``on_text`` (print a streamed piece) and ``should_stop`` (Ctrl-C seen).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Set

import numpy as np

from ..blend import Lam, normalize_lam
from ..errors import DeRaError
from ..runtime.states import read_state_file, write_state_file
from ..sampling.settings import Sampling

OnText = Callable[[str], None]
ShouldStop = Callable[[], bool]
INTERRUPTED = "interrupted"  # finish_reason of an answer stopped by the user
SESSION_KIND = "dera-chat session 1"


@dataclass
class Answer:
    """One generated answer and what the status line reports about it."""

    text: str
    lam: Lam
    mode: str  # "blend" (DeRa) or "weights" (adapters at scale lam)
    tokens: int  # tokens sampled, the end-of-turn token included
    seconds: float
    finish_reason: Optional[str]
    drafts: Optional[tuple] = None  # (passed, drafted) in this answer, when speculating

    @property
    def interrupted(self) -> bool:
        return self.finish_reason == INTERRUPTED

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class _TokenWatch:
    """A logits processor that counts sampling steps and carries out a stop request.

    Streamed chunks do not map one to one onto tokens (llama-cpp-python holds back
    text that is not yet valid UTF-8), so this is the one exact count the public API
    gives, and the one place a stop can act at the very next token however the text
    is chunked: once ``should_stop()`` is true, only the end-of-text token is left, so
    the answer ends cleanly and llama-cpp-python flushes the text it holds.
    """

    def __init__(self, should_stop: ShouldStop, eos: int) -> None:
        self.should_stop, self.eos = should_stop, eos
        self.n = 0
        self.stopped = False

    def __call__(self, input_ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        self.n += 1
        self.stopped = self.stopped or bool(self.should_stop())
        if self.stopped:
            logits[:] = -np.inf
            logits[self.eos] = 0.0
        return logits


@dataclass
class ChatSession:
    """History, lam and settings of one conversation with a DeRaLlama ``llm``."""

    llm: object
    lam: Lam = 1.0
    mode: str = "blend"
    system: Optional[str] = None
    sampling: Sampling = field(default_factory=Sampling)
    history: List[dict] = field(default_factory=list)  # user/assistant messages, as sent
    partial: Set[int] = field(default_factory=set)  # history indices of interrupted answers
    session_file: Optional[str] = None  # --session: where /save and /load go without a file name

    # ------------------------------------------------------------ settings

    def set_lam(self, lam: Lam) -> None:
        """Change lam for the following answers; checked now (count, finiteness)."""
        self.lam = normalize_lam(lam, _n_lams(self.lam))

    def set_mode(self, mode: str) -> None:
        """Change the mode for the following answers; checked now (full-model pairs have no weights mode)."""
        self.llm.mode = mode
        self.mode = mode

    def set_system(self, text: Optional[str]) -> None:
        self.system = text or None

    def reset(self) -> None:
        """Forget the conversation (the system prompt and lam stay)."""
        self.history.clear()
        self.partial.clear()

    # ------------------------------------------------------------ sessions

    def save(self, path: os.PathLike) -> None:
        """The conversation, lam, mode, sampling and every context's state in one file, written
        atomically: :meth:`load` goes on from here without recomputing the conversation."""
        extra = {
            "kind": SESSION_KIND,
            "lam": list(self.lam) if isinstance(self.lam, tuple) else self.lam,
            "mode": self.mode,
            "system": self.system,
            "history": self.history,
            "partial": sorted(self.partial),
            "sampling": self.sampling.as_dict(),
        }
        write_state_file(path, self.llm.save_state(), extra)

    def load(self, path: os.PathLike) -> None:
        """Go on from a session :meth:`save` wrote (for the same pair: another pair's is refused by name)."""
        state, extra = read_state_file(path)
        if extra.get("kind") != SESSION_KIND:
            raise DeRaError(f"{path} holds an engine state, not a dera-chat session")
        try:
            lam = normalize_lam(extra["lam"], _n_lams(self.lam))
            sampling = Sampling(**extra["sampling"])
            history = [{"role": str(m["role"]), "content": str(m["content"])} for m in extra["history"]]
            mode, system, partial = extra["mode"], extra["system"], set(extra["partial"])
        except (KeyError, TypeError, ValueError) as e:
            raise DeRaError(f"{path} is not a dera-chat session of this pair's shape ({e})") from None
        self.llm.load_state(state)  # first: a state of another pair changes nothing
        self.set_mode(mode)
        self.lam, self.sampling, self.system, self.history, self.partial = lam, sampling, system, history, partial

    def messages(self, history: Optional[Sequence[dict]] = None) -> List[dict]:
        """What the model sees: the system prompt (if any), then ``history``."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [dict(m) for m in (self.history if history is None else history)]

    # ------------------------------------------------------------- answers

    def ask(self, text: str, on_text: OnText = lambda s: None, should_stop: ShouldStop = lambda: False) -> Answer:
        """Add a user message and answer it; an interrupted answer is kept, marked partial."""
        self.history.append({"role": "user", "content": text})
        try:
            answer = self.generate(self.messages(), self.lam, on_text, should_stop)
        except BaseException:
            self.history.pop()  # nothing was answered: the turn did not happen
            raise
        self.history.append({"role": "assistant", "content": answer.text})
        if answer.interrupted:
            self.partial.add(len(self.history) - 1)
        return answer

    def sweep(
        self,
        lams: Sequence[Lam],
        on_start: Callable[[Lam], None] = lambda lam: None,
        on_text: OnText = lambda s: None,
        should_stop: ShouldStop = lambda: False,
        on_answer: Callable[[Answer], None] = lambda answer: None,
    ) -> List[Answer]:
        """Answer the last user message once per lam (one seed for all), history unchanged.

        Stops after the answer during which ``should_stop`` turned true.
        """
        messages = self.messages(self._through_last_user())
        seed = self.sampling.next_seed()
        answers = []
        for lam in lams:
            on_start(lam)
            answers.append(self.generate(messages, lam, on_text, should_stop, seed=seed))
            on_answer(answers[-1])
            if answers[-1].interrupted:
                break
        return answers

    def complete(self, text: str) -> dict:
        """One-shot, not streamed: the OpenAI-shaped completion for one user message."""
        messages = self.messages([{"role": "user", "content": text}])
        kwargs = self.sampling.call_kwargs(self.sampling.next_seed())
        return self.llm.create_chat_completion(messages, lam=self.lam, mode=self.mode, **kwargs)

    def generate(
        self, messages: List[dict], lam: Lam, on_text: OnText, should_stop: ShouldStop, seed: Optional[int] = None
    ) -> Answer:
        """Stream one ``create_chat_completion``; a stop request ends it at the next token."""
        watch = _TokenWatch(should_stop, self.llm.token_eos())
        kwargs = self.sampling.call_kwargs(self.sampling.next_seed() if seed is None else seed)
        start, drafts = time.perf_counter(), _draft_counts(self.llm)
        stream = self.llm.create_chat_completion(
            messages, lam=lam, mode=self.mode, stream=True, logits_processor=[watch], **kwargs
        )
        text, finish = _consume(stream, on_text)
        finish = INTERRUPTED if watch.stopped else finish
        if drafts is not None:
            drafts = tuple(now - then for now, then in zip(_draft_counts(self.llm), drafts))
        return Answer("".join(text), lam, self.mode, watch.n, time.perf_counter() - start, finish, drafts)

    def _through_last_user(self) -> List[dict]:
        for i in range(len(self.history) - 1, -1, -1):
            if self.history[i]["role"] == "user":
                return self.history[: i + 1]
        raise DeRaError("nothing to sweep yet: ask something first")


def _consume(stream: Iterator[dict], on_text: OnText) -> tuple[List[str], Optional[str]]:
    """Pass streamed pieces to ``on_text``; returns the pieces and the finish reason."""
    pieces: List[str] = []
    finish = None
    try:
        for chunk in stream:
            choice = chunk["choices"][0]
            piece = choice["delta"].get("content")
            if piece:
                pieces.append(piece)
                on_text(piece)
            finish = choice.get("finish_reason") or finish
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # on an error midway, end llama-cpp-python's generator now
    return pieces, finish


def _draft_counts(llm) -> Optional[tuple]:
    """(drafted tokens that passed, drafted tokens whose fate is known) so far; None without speculation."""
    stats = getattr(llm, "speculation_stats", None)
    return None if stats is None else (stats.accepted, stats.settled)


def _n_lams(lam: Lam) -> int:
    return len(lam) if isinstance(lam, (list, tuple)) else 1
