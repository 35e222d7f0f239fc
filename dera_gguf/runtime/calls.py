"""Which realignment a DeRaLlama decode runs under: the per-call object and the scope that holds it.

A :class:`Call` is made where a call starts (a public call with its ``lam=`` / ``mode=``, a
``generate()`` called directly, or a lone ``eval()``) and is in effect while that call, and
each chunk of its stream, runs; calls nest (a chat's inner completion keeps the chat's
realignment). :class:`CallScope` holds the default realignment and the call in effect, so
nothing about a call lives in attributes that another call could see.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from ..blend import Lam
from ..errors import DecodeError
from ..speculation.verify import Trail
from .contexts import Context
from .pair import Realign
from .weights import PairFiles

_DONE = object()


@dataclass
class Call:
    """What one call runs with (``lone``: an ``eval()`` outside any call, Llama.eval then Llama.sample
    by hand; the next eval makes another).

    ``every_row``: the next decode's every row is sampled, so every row is blended (``generate()``
    samples the row of every token it decodes after its first decode: the sampled token, tokens
    given to ``send()``, drafts); else only the last row. ``target``: the context whose logits
    buffer holds the latest blend, where ``DeRaLlama.sample`` samples. ``trail``: what speculation
    follows of the text its ``generate()`` makes (made when it starts).
    """

    realign: Realign
    lone: bool = False
    generating: bool = False
    every_row: bool = False
    target: Optional[Context] = None
    trail: Optional[Trail] = None


class CallScope:
    """The default realignment (lam and mode of a call that names neither) and the call in effect."""

    def __init__(self, default: Realign, files: PairFiles):
        self.default, self.files = default, files
        self.current: Optional[Call] = None  # the call in effect (or the latest lone one)

    def open(self) -> Optional[Call]:
        """The public call or generate() in effect (not a lone eval's), if any."""
        return self.current if self.current is not None and not self.current.lone else None

    def realign(self) -> Realign:
        """The realignment in effect: the open call's, else the default."""
        call = self.open()
        return call.realign if call is not None else self.default

    def new(self, lam: Optional[Lam], mode: Optional[str]) -> Call:
        """A public call's: its ``lam`` and ``mode``, else those in effect."""
        return Call(self.realign().override(self.files, lam, mode))

    def lone(self) -> Call:
        """The call of an eval() outside any call, at the default; sample() reads its target."""
        self.current = Call(self.default, lone=True)
        return self.current

    @contextlib.contextmanager
    def in_effect(self, call: Call):
        """``call`` in effect inside (calls nest: a chat's completion, a call between generate() steps)."""
        saved, self.current = self.current, call
        try:
            yield
        finally:
            self.current = saved

    @contextlib.contextmanager
    def using(self, call: Call):
        """``call`` in effect inside; a llama.cpp failure in llama-cpp-python becomes a DeRaError."""
        with self.in_effect(call):
            try:
                yield
            except RuntimeError as e:  # llama-cpp-python raises RuntimeError for llama.cpp's failures
                raise DecodeError(f"llama.cpp failed during the call ({e})") from None

    def run(self, call: Call, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` with ``call`` in effect; a stream has it in effect while each chunk is made."""
        with self.using(call):
            result = fn()
        return self._stream(call, result) if isinstance(result, Iterator) else result

    def _stream(self, call: Call, chunks: Iterator) -> Iterator:
        while True:
            with self.using(call):
                chunk = next(chunks, _DONE)
            if chunk is _DONE:
                return
            yield chunk
