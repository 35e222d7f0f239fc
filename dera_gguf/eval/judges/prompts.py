"""Judge prompts: a text with placeholders, filled in per question; and what a judge's reply says.

Our prompts are ``dera_gguf/data/judge_single.txt`` and ``judge_pairwise.txt``; a user's own file
replaces them (``--judge-prompt``). The placeholders, written ``{name}`` (any other brace is left as it
is, so a prompt may hold JSON):

- single-answer grading: ``{question}`` (the user's message), ``{answer}`` (the reply graded) and
  ``{history}`` (the conversation before the question, as ``User: ...`` / ``Assistant: ...`` lines);
- pairwise: ``{question}``, ``{answer_a}``, ``{answer_b}``, ``{history_a}``, ``{history_b}`` (each
  reply's own conversation before the question: the earlier turns of a multi-turn row differ per λ).

A grade is read from the reply's last ``Rating: N`` (N from 1 to 10; MT-bench's ``[[N]]`` too), a
verdict from its last ``Verdict: A``, ``Verdict: B`` or ``Verdict: tie`` (MT-bench's ``[[A]]``,
``[[B]]``, ``[[C]]`` too, C a tie). A reply with neither is kept and counted as unrated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Dict, List, Optional, Sequence, Tuple

from ...errors import DeRaError

KINDS = ("single", "pairwise")
REQUIRED = {"single": ("question", "answer"), "pairwise": ("question", "answer_a", "answer_b")}
OPTIONAL = {"single": ("history",), "pairwise": ("history_a", "history_b")}
NO_HISTORY = "(none: the question opens the conversation)"

_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
_RATING = re.compile(r"rating\s*[:=]?\s*[*_#\s]*\[*\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
_RATING_BRACKETS = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_VERDICT = re.compile(r"(?i:verdict)\s*[:=]?\s*[*_#\s]*\[*\s*(A|B|(?i:tie))\b")  # A, B: capitals only
_VERDICT_BRACKETS = re.compile(r"\[\[\s*(A|B|C|(?i:tie))\s*\]\]")


def default_prompt(kind: str) -> str:
    """Our prompt for ``kind`` ("single" or "pairwise"), as shipped in dera_gguf/data/."""
    return resources.files("dera_gguf").joinpath("data", f"judge_{kind}.txt").read_text(encoding="utf-8")


@dataclass(frozen=True)
class JudgePrompt:
    """A judge prompt's text for ``kind``, checked to hold the placeholders it needs."""

    kind: str
    text: str

    @classmethod
    def load(cls, kind: str, path: Optional[str] = None) -> "JudgePrompt":
        """Our prompt, or the one in the file at ``path``."""
        if kind not in KINDS:
            raise DeRaError(f"unknown judge {kind!r}: choose single or pairwise")
        if path is None:
            return cls(kind, default_prompt(kind))
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise DeRaError(f"cannot read the judge prompt {path} ({e.strerror})") from None
        return cls.checked(kind, text, path)

    @classmethod
    def checked(cls, kind: str, text: str, where: str = "the judge prompt") -> "JudgePrompt":
        named = set(_PLACEHOLDER.findall(text))
        missing = [name for name in REQUIRED[kind] if name not in named]
        if missing:
            known = ", ".join("{" + n + "}" for n in REQUIRED[kind] + OPTIONAL[kind])
            raise DeRaError(
                f"{where} lacks {', '.join('{' + m + '}' for m in missing)}: a {kind} judge prompt names {known}"
            )
        return cls(kind, text)

    def render(self, values: Dict[str, str]) -> str:
        """The text with each known placeholder replaced by its value (other braces left alone)."""
        known = REQUIRED[self.kind] + OPTIONAL[self.kind]
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)] if m.group(1) in known else m.group(0), self.text)


def transcript(exchanges: Sequence[Tuple[str, str]]) -> str:
    """Earlier (role, text) messages as ``User: ...`` / ``Assistant: ...`` lines; a note when there are none."""
    if not exchanges:
        return NO_HISTORY
    return "\n\n".join(f"{role.capitalize()}: {text}" for role, text in exchanges)


def single_values(history: List[Tuple[str, str]], question: str, answer: str) -> Dict[str, str]:
    return {"history": transcript(history), "question": question, "answer": answer}


def pairwise_values(
    history_a: List[Tuple[str, str]], history_b: List[Tuple[str, str]], question: str, answer_a: str, answer_b: str
) -> Dict[str, str]:
    return {
        "history_a": transcript(history_a),
        "history_b": transcript(history_b),
        "question": question,
        "answer_a": answer_a,
        "answer_b": answer_b,
    }


def _last(patterns: Sequence[re.Pattern], text: str) -> Optional[str]:
    """The group of the match that ends last in ``text`` among ``patterns``' matches."""
    found = [(m.end(), m.group(1)) for p in patterns for m in p.finditer(text)]
    return max(found)[1] if found else None


def parse_rating(text: str) -> Optional[float]:
    """The grade in a judge's reply (its last ``Rating: N`` or ``[[N]]``), None without one from 1 to 10."""
    found = _last([_RATING, _RATING_BRACKETS], text)
    if found is None:
        return None
    value = float(found)
    return value if 1 <= value <= 10 else None


def parse_verdict(text: str) -> Optional[str]:
    """The verdict in a judge's reply, as ``"A"``, ``"B"`` or ``"tie"``; None without one."""
    found = _last([_VERDICT, _VERDICT_BRACKETS], text)
    if found is None:
        return None
    found = found.upper()
    return "tie" if found in ("C", "TIE") else found
