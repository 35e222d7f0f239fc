"""Resumable results: an append-only jsonl of finished work, and the run's settings.

Every finished (row, λ[, sample]) is one line, written and flushed as soon as its row
is done, so Ctrl-C or a crash loses nothing already written and a re-run with the
same ``--out`` skips it. A line cut short by a kill is dropped on the next open.
``run.json`` pins the settings that change results (models, sampling, reward), so a
resume never mixes results of two different runs.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, Iterable, List, Tuple

from ..errors import DeRaError


def atomic_write(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and os.replace: never half-written."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_run_settings(out_dir: str, settings: Dict[str, Any]) -> None:
    """Record ``settings`` in out_dir/run.json, or refuse if an earlier run there used others."""
    path = os.path.join(out_dir, "run.json")
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                before = json.load(f)
        except (OSError, json.JSONDecodeError):
            raise DeRaError(
                f"{path} is unreadable: delete it (and the results beside it) or use another --out"
            ) from None
        diff = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if diff:
            detail = ", ".join(f"{k}: {before.get(k)!r} then, {settings.get(k)!r} now" for k in diff)
            raise DeRaError(
                f"{out_dir} holds results of a run with other settings ({detail}): "
                "use another --out, or delete that folder to start over"
            )
        return
    atomic_write(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")


class ResultStore:
    """Append-only jsonl of result records, keyed by the values of ``key_fields``."""

    def __init__(self, path: str, key_fields: Tuple[str, ...]):
        self.path = path
        self.key_fields = key_fields
        self.records: Dict[tuple, Dict[str, Any]] = {}
        if os.path.exists(path):
            self._load()

    def key(self, record: Dict[str, Any]) -> tuple:
        return tuple(record[k] for k in self.key_fields)

    def _load(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # drop a last line cut short by a kill
        if len(complete) != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        for line_no, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
            try:
                record = json.loads(line)
                self.records[self.key(record)] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DeRaError(
                    f"{self.path} line {line_no} is not a result record: "
                    "delete that line (or the file, to recompute everything)"
                ) from None

    def has(self, *key: Any) -> bool:
        return tuple(key) in self.records

    def append(self, records: Iterable[Dict[str, Any]]) -> None:
        """Write ``records`` (one row's results) and flush them to the OS."""
        records = list(records)
        if not records:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
        for record in records:
            self.records[self.key(record)] = record

    def select(self, row_ids: Iterable[str]) -> List[Dict[str, Any]]:
        """The records of the given rows (the current data file), in file order."""
        wanted = set(row_ids)
        return [r for r in self.records.values() if r["row"] in wanted]
