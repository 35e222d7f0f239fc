"""OpenAI's shapes of answers decoded in a batch (several choices, a slot's answer): whole or streamed.

A choice is a :class:`~dera_gguf.batch.sequence.Sequence` and its text
(:class:`~dera_gguf.batch.text.ChoiceText`); each choice says at which λ it was answered.
A stream sends one chunk per choice and step with news (a chat's first chunk per choice
carries the role) and, with ``stream_options.include_usage``, a closing usage chunk.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Iterator, List, Optional

from ..batch.sequence import Sequence
from ..batch.text import ChoiceText
from .catalog import Asked
from .logprobs import LogprobShape
from .schema import ChatRequest, Request


class Shape:
    """OpenAI's shapes of a batched answer, one choice or several (chat or text completion, whole or streamed)."""

    def __init__(self, asked: Asked, body: Request, n_prompt: int, options: Any):
        self.chat = isinstance(body, ChatRequest)
        self.lams, self.model, self.n_prompt = asked.lams, asked.model, n_prompt
        self.usage_chunk = bool(options is not None and options.include_usage)
        self.logprobs: Optional[LogprobShape] = None  # set when the choices keep log-probs
        self.reported: dict = {}  # per choice: tokens whose log-probs a stream has sent
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _usage(self, choices: List[Sequence]) -> dict:
        completion = sum(len(c.tokens) for c in choices)
        return {
            "prompt_tokens": self.n_prompt,
            "completion_tokens": completion,
            "total_tokens": self.n_prompt + completion,
        }

    def _logprobs(self, i: int, choice: Sequence, chunk: bool) -> Optional[dict]:
        """The choice's log-probs: all of them, or for a chunk those its stream has not sent yet."""
        if self.logprobs is None:
            return None
        start = self.reported.get(i, 0) if chunk else 0
        self.reported[i] = len(choice.scored)
        return self.logprobs.of(choice, start)

    def _choice(self, i: int, text: str, finish: Optional[str], chunk: bool, first: bool = False) -> dict:
        if not self.chat:
            body = {"text": text}
        elif chunk and first:
            body = {"delta": {"role": "assistant"}}
        elif chunk:
            body = {"delta": {"content": text} if text else {}}
        else:
            body = {"message": {"role": "assistant", "content": text}}
        return {"index": i, **body, "logprobs": None, "finish_reason": finish, "lam": self.lams[i]}

    def whole(self, choices: List[Sequence], texts: List[ChoiceText]) -> dict:
        rows = [
            dict(self._choice(i, t.text, c.finish, False), logprobs=self._logprobs(i, c, False))
            for i, (c, t) in enumerate(zip(choices, texts))
        ]
        return {**self._head(False), "choices": rows, "usage": self._usage(choices)}

    def stream(self, choices: List[Sequence], texts: List[ChoiceText], steps: Iterator[List[int]]) -> Iterator[dict]:
        """A chunk per choice and step that has news (for chats a first chunk per choice with the role)."""
        first = True
        for moved in steps:
            yield from self.step(choices, texts, moved, first)
            first = False
        if self.usage_chunk:
            yield self.usage(choices)

    def step(self, choices: List[Sequence], texts: List[ChoiceText], moved: List[int], first: bool) -> List[dict]:
        """The chunks of one step (``moved``: the choices that drew; texts updated)."""
        chunks = []
        if first and self.chat:
            chunks += [
                {**self._head(True), "choices": [self._choice(i, "", None, True, first=True)]}
                for i in range(len(choices))
            ]
        for i in moved:
            finish = choices[i].finish
            text = texts[i].delta(final=finish is not None)
            if text or finish is not None:
                row = dict(self._choice(i, text, finish, True), logprobs=self._logprobs(i, choices[i], True))
                chunks.append({**self._head(True), "choices": [row]})
        return chunks

    def usage(self, choices: List[Sequence]) -> dict:
        """The closing chunk of ``stream_options.include_usage``."""
        return {**self._head(True), "choices": [], "usage": self._usage(choices)}
