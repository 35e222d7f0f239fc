"""Reading prefs.jsonl / prompts.jsonl: every row keeps its line number, bad rows are reported.

A row is identified by its line number *and* a hash of its content, so a resumed run
never reuses a result for a row whose text changed in the meantime.

A prompt row is ``{"prompt": str}``, ``{"messages": [...]}`` or ``{"turns": [str, ...]}`` (a conversation
of user messages answered one after the other, MT-bench's questions; Hugging Face's MT-bench copy
names the list ``"prompt"``), with an optional ``"category"``. Rows come from a local JSONL file or,
as ``hf:DATASET[:SPLIT or FILE]``, from a dataset on the Hugging Face hub (:mod:`.hub_rows`); a
parquet file's rows are numbered as lines are.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

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
    turns: Optional[List[str]] = None  # user messages answered one after the other, in one conversation
    category: Optional[str] = None

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
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)  # (str: a parquet row's dates)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def parse_row(obj: Any, line: int, kind: str) -> Row:
    """Check one decoded JSON value; raise DeRaError saying what is missing or wrong."""
    if not isinstance(obj, dict):
        raise DeRaError(f"expected a JSON object, got {type(obj).__name__}")
    given = [k for k in ("prompt", "messages", "turns") if k in obj]
    if len(given) != 1 or (kind == "score" and given == ["turns"]):
        if kind == "score":
            raise DeRaError('needs exactly one of "prompt" (a string) or "messages" (a list of chat messages)')
        raise DeRaError(
            'needs exactly one of "prompt" (a string), "messages" (a list of chat messages) '
            'or "turns" (a list of user messages)'
        )
    row = Row(line=line, key=row_key(obj))
    if "turns" in obj or (kind == "generate" and isinstance(obj.get("prompt"), list)):
        row.turns = check_turns(obj[given[0]], given[0])
    elif "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise DeRaError('"prompt" must be a string' + (" (or a list of user turns)" if kind == "generate" else ""))
        row.prompt = obj["prompt"]
    else:
        row.messages = check_messages(obj["messages"])
    if obj.get("category") is not None:
        row.category = str(obj["category"])
    for name in RESPONSE_KEYS[kind]:
        if name not in obj:
            raise DeRaError(f'missing key "{name}"')
        if not isinstance(obj[name], str) or not obj[name]:
            raise DeRaError(f'"{name}" must be a non-empty string')
        row.responses[name] = obj[name]
    return row


def check_turns(turns: Any, name: str) -> List[str]:
    """A conversation's user messages: a non-empty list of non-empty strings."""
    if not (isinstance(turns, list) and turns and all(isinstance(t, str) and t for t in turns)):
        raise DeRaError(f'"{name}" as turns must be a non-empty list of non-empty strings (the user\'s messages)')
    return list(turns)


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

    ``path`` may also be ``hf:DATASET[:SPLIT or FILE]``: a dataset on the Hugging Face hub
    (:func:`~.hub_rows.hub_rows_file`), fetched once into its cache. ``limit`` keeps the first
    ``limit`` usable rows (a quick look at a big file). Blank lines are ignored; a file with no
    usable row at all is an error.
    """
    path = os.fspath(path)
    if kind not in RESPONSE_KEYS:
        raise DeRaError(f"unknown data kind {kind!r}")
    paths = [path]
    if path.startswith("hf:"):
        from .hub_rows import hub_rows_files

        paths = hub_rows_files(path)
    rows: List[Row] = []
    bad: List[BadRow] = []
    for line_no, obj, problem in numbered_objects(paths):
        if limit is not None and len(rows) >= limit:
            break
        if problem is not None:
            bad.append(BadRow(line_no, problem))
            continue
        try:
            rows.append(parse_row(obj, line_no, kind))
        except DeRaError as e:
            bad.append(BadRow(line_no, str(e)))
    if not rows:
        need = '"prompt"' + "".join(f', "{k}"' for k in RESPONSE_KEYS[kind])
        detail = f" ({len(bad)} bad row(s), first: {bad[0]})" if bad else ""
        raise DeRaError(f"{path} has no usable rows{detail}: each line must be a JSON object with {need}")
    return Dataset(path, rows, bad)


def numbered_objects(paths: List[str]) -> Iterator[Tuple[int, Any, Optional[str]]]:
    """``(line number, value, None)`` for each row of JSONL or parquet files (a parquet row is numbered
    as a line; the files' lines one after the other), or ``(line number, None, why)`` for a line that
    is not JSON. Blank lines are skipped."""
    offset = 0
    for path in paths:
        if path.endswith(".parquet"):
            objects = parquet_rows(path)
            yield from ((offset + i, obj, None) for i, obj in enumerate(objects, start=1))
            offset += len(objects)
            continue
        try:
            f = open(path, encoding="utf-8")
        except OSError as e:
            raise DeRaError(f"cannot read {path} ({e.strerror}): check the path") from None
        line_no = 0
        with f:
            for line_no, text in enumerate(f, start=offset + 1):
                if not text.strip():
                    continue
                try:
                    yield line_no, json.loads(text), None
                except json.JSONDecodeError as e:
                    yield line_no, None, f"not valid JSON ({e.msg})"
        offset = max(offset, line_no)


def parquet_rows(path: str) -> List[Dict[str, Any]]:
    """A parquet file's rows as dicts (pyarrow reads it: the ``parquet`` extra)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DeRaError(
            f"{path} is a parquet file: reading it needs pyarrow (pip install 'dera-gguf[parquet]')"
        ) from None
    return pq.read_table(path).to_pylist()


class RowProblem(DeRaError):
    """A row that cannot be used (too long for n_ctx, nothing to score): skipped and reported."""
