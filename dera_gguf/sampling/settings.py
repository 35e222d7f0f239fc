"""The sampling settings every front uses (dera-chat, dera-serve, dera-eval), defaults written once.

The defaults are the paper's Zephyr settings. Min-p and the repeat penalty are off, unlike
in llama-cpp-python, because the paper sampled with Hugging Face ``generate``, which
applies neither.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass
from typing import Optional

from .. import checks
from ..errors import DeRaError


@dataclass(frozen=True)
class Sampling:
    """How answers are sampled; checked when made, before anything reaches llama.cpp.

    ``temperature`` 0 is greedy decoding (the argmax of the blend). ``seed=None`` draws a
    fresh seed per answer; a fixed seed makes every answer reproducible from its prompt alone.
    """

    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.95
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    max_tokens: int = 256
    seed: Optional[int] = None

    def __post_init__(self):
        checks.check_sampling_values(self.as_dict())
        if self.max_tokens < 1:
            raise DeRaError(f"max_tokens must be at least 1, got {self.max_tokens}")

    def as_dict(self) -> dict:
        return asdict(self)

    def call_kwargs(self, seed: int) -> dict:
        """Keyword arguments of a ``DeRaLlama`` completion call for one answer drawn with ``seed``."""
        return {**self.as_dict(), "seed": seed}

    def next_seed(self) -> int:
        """The seed of the next answer: the fixed one, else a fresh one."""
        return self.seed if self.seed is not None else secrets.randbelow(2**32)
