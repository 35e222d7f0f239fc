"""What dera-serve serves: its pairs, their model ids and ``PAIR@λ`` aliases, and each request's λ.

A UI picks a model from ``/v1/models`` and may have no way to send extra fields, so λ
can ride in the model id: ``smollm2-demo@1.5``. Every alias of a pair is the same
loaded DeRaLlama; only the ``lam=`` of the call differs, so changing λ never reloads.
The λ of a request is the body's ``lam`` if given, else the alias's, else the pair's
default.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

from ..blend import Lam, format_lam, normalize_lam, parse_lams
from ..errors import DeRaError
from .errors import ApiError


@dataclass
class ServedPair:
    """One loaded pair: its engine, default λ, and the lock that serves its requests one at a time."""

    name: str
    llm: Any  # a DeRaLlama (any object with its call signatures will do)
    lam: Lam
    n_aligned: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    choices: Any = None  # the contexts of requests with several choices (serve.choices), made when first asked
    slots: Any = None  # dera_gguf.slots.Slots answering one-answer requests together (--parallel > 1), or None


@dataclass(frozen=True)
class Asked:
    """What a request asks, parsed and checked once where it enters: the pair, the model id to echo,
    the λ of each choice (one for a one-answer request), and the mode.

    ``lam_list``: the body gave one λ per choice (each choice is the request at its λ, all drawing
    with the request's seed); else ``n`` samples of one λ (seeds ``seed``, ``seed + 1``, ...).
    """

    pair: ServedPair
    model: str
    lams: Tuple[Lam, ...]
    lam_list: bool
    mode: str

    @property
    def several(self) -> bool:
        return len(self.lams) > 1

    @property
    def lam(self) -> Lam:
        """The λ of a one-answer request."""
        return self.lams[0]


class Catalog:
    """The served pairs by id; ``presets`` are the λ aliases listed for pairs with one aligned model."""

    def __init__(self, pairs: Sequence[ServedPair], presets: Sequence[float] = ()) -> None:
        if not pairs:
            raise DeRaError("dera-serve needs at least one pair to serve")
        self.pairs = {p.name: p for p in pairs}
        self.presets = list(presets)
        self.created = int(time.time())

    @property
    def default(self) -> ServedPair:
        """The pair a request without ``model`` goes to: the first one given."""
        return next(iter(self.pairs.values()))

    def aliases(self, pair: ServedPair) -> List[str]:
        """``PAIR@λ`` for each preset; a pair with several aligned models takes ``PAIR@λ1,λ2`` typed by hand."""
        if pair.n_aligned != 1:
            return []
        return [f"{pair.name}@{format_lam(x)}" for x in self.presets]

    def ids(self) -> List[str]:
        return [i for p in self.pairs.values() for i in [p.name, *self.aliases(p)]]

    def listing(self) -> dict:
        """``GET /v1/models``: llama-cpp-python's ModelList shape, plus ``created``."""
        data = [
            {"id": i, "object": "model", "created": self.created, "owned_by": "dera-gguf", "permissions": []}
            for i in self.ids()
        ]
        return {"object": "list", "data": data}

    def find(self, model: Optional[str]) -> tuple[ServedPair, Optional[Lam]]:
        """The pair and the alias's λ (None without one) for a model id; 404 if there is no such pair."""
        if not model:
            return self.default, None
        if model in self.pairs:
            return self.pairs[model], None
        name, at, text = model.rpartition("@")
        if not at or name not in self.pairs:
            raise ApiError(
                404,
                f"unknown model {model!r}: this server has {', '.join(self.pairs)}; "
                f"any pair takes a lam in its id, e.g. {self.default.name}@1.5",
                "model",
                "model_not_found",
            )
        pair = self.pairs[name]
        try:
            return pair, normalize_lam(parse_lams(text), pair.n_aligned)
        except DeRaError as e:
            raise ApiError(400, f"model {model!r}: {e}", "model", "invalid_lam") from None

    def ask(self, model: Optional[str], body_lam: Any, n: Optional[int], mode: str, cap: int) -> Asked:
        """What a request asks (model id, body ``lam`` and ``n``; ``mode`` already defaulted), checked.

        The body's ``lam`` wins over the alias's, which wins over the pair's default; a list of λ
        (see :meth:`_lam_list`) asks for one choice each, ``n`` for that many samples of one λ.
        """
        pair, alias_lam = self.find(model)
        listed = self._lam_list(pair, body_lam)
        if n is not None and n < 1:
            raise ApiError(400, f"n must be at least 1, got {n}", "n")
        if listed is not None and n is not None and n != len(listed):
            message = f"lam has {len(listed)} values but n is {n}: give one lam per choice, or leave n out"
            raise ApiError(400, message, "lam")
        lams = listed if listed is not None else [self._one_lam(pair, body_lam, alias_lam)] * (n or 1)
        if len(lams) > cap:
            raise ApiError(
                400,
                f"n must be at most {cap} (the choices one request may ask for: dera-serve --max-choices), "
                f"got {len(lams)}",
                "n",
            )
        return Asked(pair, model or pair.name, tuple(lams), listed is not None, mode)

    @staticmethod
    def _one_lam(pair: ServedPair, body_lam: Any, alias_lam: Optional[Lam]) -> Lam:
        lam = body_lam if body_lam is not None else alias_lam if alias_lam is not None else pair.lam
        try:
            return normalize_lam(lam, pair.n_aligned)
        except DeRaError as e:
            raise ApiError(400, f"lam: {e}", "lam", "invalid_lam") from None

    def _lam_list(self, pair: ServedPair, body_lam: Any) -> Optional[List[Lam]]:
        """A ``lam`` that gives one λ per choice, checked; None for one λ (or none).

        For a pair with one aligned model that is a list of two numbers or more (``[0, 1, 2]``;
        ``[1.5]`` stays one λ); with several aligned models, a list of lists (``[[0.5, 1], [1, 1]]``).
        """
        if not isinstance(body_lam, (list, tuple)) or not body_lam:
            return None
        nested = any(isinstance(x, (list, tuple)) for x in body_lam)
        if not nested and (pair.n_aligned != 1 or len(body_lam) == 1):
            return None
        lams = []
        for i, lam in enumerate(body_lam):
            try:
                lams.append(normalize_lam(lam, pair.n_aligned))
            except DeRaError as e:
                raise ApiError(400, f"lam[{i}]: {e}", "lam", "invalid_lam") from None
        return lams

    def close(self) -> None:
        for pair in self.pairs.values():
            if pair.slots is not None:
                pair.slots.close()
            if pair.choices is not None:
                pair.choices.close()
            close = getattr(pair.llm, "close", None)
            if close is not None:
                close()
