"""One choice's text as llama-cpp-python makes a completion's: stop strings, whole UTF-8 characters.

The text is the detokenized answer (after the prompt) cut before the first stop string
found, in the order the stop strings were given; while the last character's bytes are
incomplete no stop string is looked for. A stream sends what cannot become part of a
stop string, nor half of a character, and the rest when the answer ends.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence


def _whole(data: bytes) -> bool:
    """True if ``data`` does not end inside a UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # a continuation byte: look further back
            continue
        need = 1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
        return back >= need
    return True


class ChoiceText:
    """The text of one choice so far. ``detokenize(tokens) -> bytes`` turns its tokens into text."""

    def __init__(self, detokenize: Callable[[Sequence[int]], bytes], stop: List[str]):
        self.detokenize = detokenize
        self.stops = [s.encode("utf-8") for s in stop if s]
        self.data = b""
        self.sent = 0  # bytes a stream has sent

    def update(self, tokens: Sequence[int]) -> Optional[str]:
        """Take the choice's tokens; ``"stop"`` when the text now holds a stop string (cut before it)."""
        self.data = self.detokenize(tokens)
        if not _whole(self.data):
            return None
        hits = [s for s in self.stops if s in self.data]
        if hits:
            self.data = self.data[: self.data.index(hits[0])]
            return "stop"
        return None

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="ignore")

    def delta(self, final: bool) -> str:
        """What a stream has not sent yet: all of it once ``final``, else what no stop string or
        unfinished character may still claim."""
        end = len(self.data)
        if not final:
            end -= max(
                (i for s in self.stops for i in range(min(len(s), end), 0, -1) if self.data.endswith(s[:i])), default=0
            )
            while end > self.sent and not _whole(self.data[:end]):
                end -= 1
        if end <= self.sent:
            return ""
        out, self.sent = self.data[self.sent : end], end
        return out.decode("utf-8", errors="ignore")
