"""Fixtures shared by the dera-eval tests: the pair under test and its independent twin."""

from __future__ import annotations

import json

import pytest
import reference as R

from dera_gguf.eval import EvalPair


def write_jsonl(path, rows):
    """Write rows (dicts as JSON, strings as they are, for bad-row tests) one per line."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def pair(ref_path, aligned_path):
    with EvalPair(ref_path, aligned_path, n_ctx=256, n_threads=1) as p:
        yield p


@pytest.fixture(scope="module")
def plain_pair(ref_path, aligned_path):
    return tuple(R.plain(p, n_threads=1, n_threads_batch=1) for p in (ref_path, aligned_path))
