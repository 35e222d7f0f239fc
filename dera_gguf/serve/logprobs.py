"""Log-probs of the answers decoded together (several choices, slots) in llama-cpp-python's shapes.

Each :class:`~dera_gguf.batch.sequence.Sequence` keeps, per token drawn, its log-prob under the blend
and the most likely tokens' (:class:`~dera_gguf.batch.sequence.Scored`). Here they are written as a one-answer
call writes them: for completions ``tokens``, ``text_offset``, ``token_logprobs`` and
``top_logprobs`` (a dict by token text, the drawn token included); for chats OpenAI's
``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``. Token texts are detokenized after
the prompt and the tokens before them, as llama-cpp-python does.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional
from typing import Sequence as Tokens

from ..batch.sequence import Sequence

Piece = Callable[[int, Tokens[int]], str]  # (token, the answer's tokens before it) -> its text


def pieces_of(llm: Any, prompt: Tokens[int]) -> Piece:
    """Token texts after ``prompt`` on ``llm``'s vocabulary."""
    prompt = list(prompt)
    return lambda token, before: llm.detokenize([token], prev_tokens=prompt + list(before)).decode(
        "utf-8", errors="ignore"
    )


class LogprobShape:
    """Writes a choice's kept log-probs, tokens ``start:end``, for a chat or a text completion."""

    def __init__(self, chat: bool, piece: Piece, text_of: Callable[[Tokens[int]], str], base: int):
        self.chat, self.piece, self.text_of, self.base = chat, piece, text_of, base

    def of(self, choice: Sequence, start: int = 0, end: Optional[int] = None) -> Optional[dict]:
        if choice.logprobs is None:
            return None
        end = len(choice.scored) if end is None else end
        if start >= end:
            return None
        rows = []
        for i in range(start, end):
            before = choice.tokens[:i]
            token = self.piece(choice.tokens[i], before)
            top = {self.piece(t, before): value for t, value in choice.scored[i].top}
            top[token] = choice.scored[i].logprob
            rows.append((token, choice.scored[i].logprob, top, self.base + len(self.text_of(before))))
        return self._chat(rows) if self.chat else self._completion(rows)

    @staticmethod
    def _completion(rows: List[tuple]) -> dict:
        return {
            "tokens": [r[0] for r in rows],
            "text_offset": [r[3] for r in rows],
            "token_logprobs": [r[1] for r in rows],
            "top_logprobs": [r[2] for r in rows],
        }

    @staticmethod
    def _chat(rows: List[tuple]) -> dict:
        entry = lambda token, logprob: {"token": token, "logprob": logprob, "bytes": None}
        content = [{**entry(r[0], r[1]), "top_logprobs": [entry(t, v) for t, v in r[2].items()]} for r in rows]
        return {"content": content, "refusal": None}
