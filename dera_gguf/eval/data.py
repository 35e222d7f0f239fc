"""Reading prefs.jsonl / prompts.jsonl: every row keeps its line number, bad rows are reported.

A row is identified by its line number *and* a hash of its content, so a resumed run
never reuses a result for a row whose text changed in the meantime.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..errors import DeRaError

# What each command needs in a row, besides "prompt" (or "messages").
RESPONSE_KEYS = {"score": ("chosen", "rejected"), "generate": ()}


@dataclass
class Row:
    """One usable row: its 1-based line number, content key and fields."""

    line: int
    key: str
    prompt: Optional[str] = None
    messages: Optional[List[Dict[str, Any]]] = None
    responses: Dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """``"<line>:<key>"``: what result files use to match rows on resume."""
        return f"{self.line}:{self.key}"


@dataclass
class BadRow:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class Dataset:
    path: str
    rows: List[Row]
    bad: List[BadRow]

    def report(self) -> str:
        """One line per bad row, and a count: what was skipped, and why."""
        if not self.bad:
            return ""
        lines = [f"{self.path}: skipped {len(self.bad)} bad row(s) of {len(self.rows) + len(self.bad)}:"]
        lines += [f"  {b}" for b in self.bad]
        return "\n".join(lines)


def row_key(obj: Any) -> str:
    """A short, stable hash of a row's content."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def parse_row(obj: Any, line: int, kind: str) -> Row:
    """Check one decoded JSON value; raise DeRaError saying what is missing or wrong."""
    if not isinstance(obj, dict):
        raise DeRaError(f"expected a JSON object, got {type(obj).__name__}")
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise DeRaError('needs exactly one of "prompt" (a string) or "messages" (a list of chat messages)')
    row = Row(line=line, key=row_key(obj))
    if has_prompt:
        if not isinstance(obj["prompt"], str):
            raise DeRaError('"prompt" must be a string')
        row.prompt = obj["prompt"]
    else:
        row.messages = check_messages(obj["messages"])
    for name in RESPONSE_KEYS[kind]:
        if name not in obj:
            raise DeRaError(f'missing key "{name}"')
        if not isinstance(obj[name], str) or not obj[name]:
            raise DeRaError(f'"{name}" must be a non-empty string')
        row.responses[name] = obj[name]
    return row


def check_messages(messages: Any) -> List[Dict[str, Any]]:
    ok = (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    )
    if not ok:
        raise DeRaError('"messages" must be a non-empty list of {"role": str, "content": str} objects')
    return messages


def read_rows(path: "os.PathLike[str] | str", kind: str, limit: Optional[int] = None) -> Dataset:
    """Read a jsonl file for ``kind`` ("score" or "generate"); bad rows are collected, not raised.

    ``limit`` keeps the first ``limit`` usable rows (a quick look at a big file).
    Blank lines are ignored; a file with no usable row at all is an error.
    """
    path = os.fspath(path)
    if kind not in RESPONSE_KEYS:
        raise DeRaError(f"unknown data kind {kind!r}")
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DeRaError(f"cannot read {path} ({e.strerror}): check the path") from None
    rows: List[Row] = []
    bad: List[BadRow] = []
    with f:
        for line_no, text in enumerate(f, start=1):
            if limit is not None and len(rows) >= limit:
                break
            if not text.strip():
                continue
            try:
                rows.append(parse_row(json.loads(text), line_no, kind))
            except json.JSONDecodeError as e:
                bad.append(BadRow(line_no, f"not valid JSON ({e.msg})"))
            except DeRaError as e:
                bad.append(BadRow(line_no, str(e)))
    if not rows:
        need = '"prompt"' + "".join(f', "{k}"' for k in RESPONSE_KEYS[kind])
        detail = f" ({len(bad)} bad row(s), first: {bad[0]})" if bad else ""
        raise DeRaError(f"{path} has no usable rows{detail}: each line must be a JSON object with {need}")
    return Dataset(path, rows, bad)


class RowProblem(DeRaError):
    """A row that cannot be used (too long for n_ctx, nothing to score): skipped and reported."""
