"""Answers as JSON text: what llama-cpp-python returns, made plain for any JSON reader.

llama-cpp-python's log-probs are numpy floats (its own server turns them into numbers through
its pydantic response models); a log-prob of an impossible token is ``-inf``, which JSON has
no number for. Here numpy scalars and arrays become Python numbers and lists, and a float
that is not finite becomes ``null`` (as pydantic writes it), so every answer, whole or
streamed, is strict JSON that any client parses.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from fastapi.responses import JSONResponse


def plain(value: Any) -> Any:
    """``value`` with numpy numbers and arrays made Python ones and non-finite floats made None."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(value: Any) -> str:
    """Strict JSON text of ``value`` (see :func:`plain`); non-ASCII characters kept as they are."""
    return json.dumps(plain(value), ensure_ascii=False, allow_nan=False, separators=(",", ":"))


class Answer(JSONResponse):
    """A JSON response whose body is :func:`dumps` of the content."""

    def render(self, content: Any) -> bytes:
        return dumps(content).encode("utf-8")
