"""llama.cpp contexts as DeRa drives them: decode, output rows, what each KV cache holds.

A :class:`Context` is one llama.cpp context (a model, or the reference model with a
LoRA adapter). What its KV cache holds is read from llama.cpp every time: the
memory's last position of a sequence gives its extent, and the token at each
position is the one :meth:`Context.decode` last wrote there (for every sequence). That is exact whoever
else touches the cache (llama-cpp-python trims its own context inside
``generate()``), because llama.cpp only ever drops a suffix and every decode here
appends right after what llama.cpp says is held.

A :class:`Lockstep` keeps several contexts on one logical token sequence for
:class:`~dera_gguf.DeRaLlama`: only contexts with a non-zero weight decode (at lam 0
or 1 a step costs one model); a context left behind catches up in one batch the next
time it is needed; after a batch the blended logits are written into the logits
buffer of the first active context, so llama.cpp's own sampler chain samples the blend.
A model draft's batch is decoded only where it was not drafted: the drafting context
already holds its tokens and their rows (:class:`KnownRows`).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals

from ..blend import blend_logits
from ..errors import ContextFullError, DecodeError, DeRaError
from .threads import ThreadPlan


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    n = min(len(a), len(b))
    mismatch = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(mismatch[0]) if mismatch.size else n


class Context:
    """One llama.cpp context, its batch, and the tokens its sequences hold (their extents read from llama.cpp).

    Args:
        name: what error messages call it ("reference model", ...).
        ctx: the llama.cpp context.
        n_vocab: logits row width.
        batch: the batch to decode through (llama-cpp-python's own, or a new one).
        batch_size: how many tokens ``batch`` holds.
        adapters: the LoRA adapters already applied to ``ctx``, as ``((adapter, scale), ...)``.
    """

    def __init__(
        self,
        name: str,
        ctx: internals.LlamaContext,
        n_vocab: int,
        batch: internals.LlamaBatch,
        batch_size: int,
        adapters: tuple = (),
    ):
        self.name = name
        self.ctx = ctx
        self.n_vocab = n_vocab
        self.batch = batch
        self.batch_size = batch_size
        self.adapters = tuple(adapters)  # changed only through set_adapters
        self._written: Dict[int, np.ndarray] = {}  # per sequence: the last token decoded at each position

    # ------------------------------------------------------------- state

    def extent(self, seq: int = 0) -> int:
        """Number of positions sequence ``seq`` holds, as llama.cpp's memory reports it."""
        return int(llama_cpp.llama_memory_seq_pos_max(self.ctx.memory, seq)) + 1

    @property
    def n_positions(self) -> int:
        """The positions one sequence may hold (llama.cpp's n_ctx; per sequence with one KV stream each)."""
        return int(self.ctx.n_ctx())

    def _tokens(self, seq: int) -> np.ndarray:
        if seq not in self._written:
            self._written[seq] = np.zeros(self.n_positions, dtype=np.intc)
        return self._written[seq]

    def held(self, seq: int = 0) -> np.ndarray:
        """The tokens sequence ``seq`` holds in the KV cache now."""
        return self._tokens(seq)[: self.extent(seq)]

    def truncate(self, n: int) -> int:
        """Keep the first ``n`` positions of every sequence; returns how many are kept.

        A cache that cannot drop a suffix (recurrent models) is cleared: 0 kept.
        """
        # llama.cpp's seq_rm with sequence -1 trims every sequence; llama-cpp-python's own
        # kv_cache_seq_rm wrapper turns -1 into sequence 0, so it is called directly.
        if llama_cpp.llama_memory_seq_rm(self.ctx.memory, -1, n, -1):
            return n
        self.ctx.kv_cache_clear()
        return 0

    def drop_from(self, seq: int, n: int) -> None:
        """Drop what sequence ``seq`` holds from position ``n`` on (drafted tokens that did not pass)."""
        if not llama_cpp.llama_memory_seq_rm(self.ctx.memory, seq, n, -1):
            raise DeRaError(
                f"the {self.name}'s KV cache cannot drop single tokens (a recurrent model?), which "
                "speculation needs: run without it"
            )

    def keep_prefix(self, tokens: np.ndarray, limit: Optional[int] = None) -> int:
        """Keep the longest held prefix of ``tokens`` (at most ``limit``); returns its length."""
        keep = common_prefix(self.held(), tokens)
        return self.truncate(keep if limit is None else min(keep, limit))

    def clear(self) -> None:
        self.ctx.kv_cache_clear()

    def set_adapters(self, adapters: tuple) -> None:
        """Run on these LoRA adapters ``((adapter, scale), ...)`` from now on (none: ``()``).

        The KV cache holds what the old weights computed, so a change empties it.
        """
        adapters = tuple((a, float(s)) for a, s in adapters)
        if adapters == self.adapters:
            return
        pointers = (llama_cpp.llama_adapter_lora_p_ctypes * max(len(adapters), 1))(*[a for a, _ in adapters])
        scales = (ctypes.c_float * max(len(adapters), 1))(*[s for _, s in adapters])
        if llama_cpp.llama_set_adapters_lora(self.ctx.ctx, pointers, len(adapters), scales):
            raise DeRaError(f"llama.cpp refused the LoRA adapter(s) for the {self.name}: made for another model?")
        self.clear()
        self.adapters = adapters

    def save(self, seq: int = 0) -> "SavedSequence":
        """What sequence ``seq`` holds: its tokens, llama.cpp's state of it (KV cells, positions), the
        adapters' scales."""
        size = llama_cpp.llama_state_seq_get_size(self.ctx.ctx, seq)
        buffer = (ctypes.c_uint8 * max(size, 1))()
        n = llama_cpp.llama_state_seq_get_data(self.ctx.ctx, buffer, size, seq)
        tokens = self.held(seq).copy()
        return SavedSequence(tokens, bytes(buffer[:n]), tuple(s for _, s in self.adapters))

    def restore(self, saved: "SavedSequence", seq: int = 0) -> None:
        """Make sequence ``seq`` hold what ``saved`` holds, through llama.cpp's state API (a context of one
        sequence, an engine's, is emptied first; in one of several sequences only ``seq`` is).

        Saved under other adapter scales (weight-space mode at another lam) it holds what
        other weights computed: the sequence is left empty instead, to be caught up when needed.
        """
        if llama_cpp.llama_n_seq_max(self.ctx.ctx) == 1:
            self.clear()
        else:
            llama_cpp.llama_memory_seq_rm(self.ctx.memory, seq, -1, -1)
        if not len(saved.tokens) or saved.adapter_scales != tuple(s for _, s in self.adapters):
            return
        if len(saved.tokens) > self.n_positions:
            raise ContextFullError(
                f"the saved state holds {len(saved.tokens)} tokens but the {self.name}'s context holds "
                f"{self.n_positions} (n_ctx): load it into an engine with a larger n_ctx"
            )
        data = (ctypes.c_uint8 * len(saved.data)).from_buffer_copy(saved.data)
        read = llama_cpp.llama_state_seq_set_data(self.ctx.ctx, data, len(saved.data), seq)
        if read != len(saved.data) or self.extent(seq) != len(saved.tokens):
            llama_cpp.llama_memory_seq_rm(self.ctx.memory, seq, -1, -1)
            raise DeRaError(
                f"llama.cpp could not restore the {self.name}'s saved state (made by another model, or "
                "a damaged state): it was not loaded"
            )
        self._tokens(seq)[: len(saved.tokens)] = saved.tokens

    def share_sequence(self, src: int, dst: int) -> None:
        """Let sequence ``dst`` use the cells of ``src`` (a shared prompt; unified KV cache)."""
        llama_cpp.llama_memory_seq_cp(self.ctx.memory, src, dst, -1, -1)
        n = self.extent(src)
        self._tokens(dst)[:n] = self._tokens(src)[:n]

    # ------------------------------------------------------------ decode

    def decode(
        self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int], outputs: Sequence[bool]
    ) -> None:
        """Decode one batch: token i at ``positions[i]`` of sequence ``seqs[i]``, logits where ``outputs[i]``."""
        n = len(tokens)
        if n > self.batch_size:
            raise DecodeError(f"internal error: {n} tokens do not fit the {self.name}'s batch of {self.batch_size}")
        self._check_appends(positions, seqs)
        b = self.batch.batch
        b.n_tokens = n
        for i, (token, pos, seq, out) in enumerate(zip(tokens, positions, seqs, outputs)):
            b.token[i], b.pos[i], b.seq_id[i][0], b.n_seq_id[i], b.logits[i] = token, pos, seq, 1, out
        try:
            self.ctx.decode(self.batch)
        except RuntimeError as e:
            raise DecodeError(
                f"llama.cpp could not decode {n} token(s) in the {self.name} ({e}); "
                "a smaller n_ctx or n_batch, or fewer parallel sequences, may help"
            ) from None
        for token, pos, seq in zip(tokens, positions, seqs):
            self._tokens(seq)[pos] = token

    def _check_appends(self, positions: Sequence[int], seqs: Sequence[int]) -> None:
        """Refuse, before llama.cpp does, a decode that would not append to each sequence or overflow."""
        first: Dict[int, int] = {}
        for p, s in zip(positions, seqs):
            first.setdefault(s, p)
        for seq, start in first.items():
            if start != self.extent(seq):
                raise DecodeError(
                    f"internal error: the {self.name} holds {self.extent(seq)} tokens in sequence {seq} but a "
                    f"decode starts at position {start}; please report this"
                )
        top = max(positions, default=-1)
        if top >= self.n_positions:
            raise ContextFullError(
                f"the sequence needs {top + 1} positions but the {self.name}'s context "
                f"holds {self.n_positions} (n_ctx): use a larger n_ctx or a shorter text"
            )

    def decode_run(self, tokens: Sequence[int], start: int, n_out: int) -> None:
        """Decode ``tokens`` at positions start.. of sequence 0, with logits for the last ``n_out``."""
        n = len(tokens)
        self.decode(tokens, range(start, start + n), [0] * n, [i >= n - n_out for i in range(n)])

    def catch_up(self, tokens: np.ndarray, n_batch: int) -> None:
        """Make sequence 0 hold exactly ``tokens``: keep the held prefix, decode the rest (no logits kept)."""
        for start in range(self.keep_prefix(tokens), len(tokens), n_batch):
            self.decode_run(tokens[start : start + n_batch], start, 1)

    def rows(self, n_rows: int) -> np.ndarray:
        """The last ``n_rows`` output rows of the latest decode, as a writable view of llama.cpp's buffer."""
        if n_rows == 1:
            ptr = llama_cpp.llama_get_logits_ith(self.ctx.ctx, -1)
            return np.ctypeslib.as_array(ptr, shape=(1, self.n_vocab))
        ptr = llama_cpp.llama_get_logits(self.ctx.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_rows, self.n_vocab))


class Lockstep:
    """Contexts on one logical token sequence; ``contexts[0]`` is the reference model.

    ``threads`` says how many CPU threads the contexts get and whether the active ones
    decode at the same time (each on its share): every context computes the same logits
    either way, only the wall time differs.
    """

    def __init__(self, contexts: Sequence[Context], n_batch: int, threads: ThreadPlan):
        self.contexts = list(contexts)
        self.n_batch = n_batch
        self.threads = threads

    def eval(
        self,
        prefix: np.ndarray,
        tokens: Sequence[int],
        weights: Sequence[float],
        scores: Optional[np.ndarray] = None,
        n_rows: int = 1,
        before_batch: Callable[[], None] = lambda: None,
        known: Optional["KnownRows"] = None,
    ) -> Context:
        """Decode ``tokens`` after ``prefix`` in every context with a non-zero weight.

        Writes the blended logits of the last ``n_rows`` tokens (of every token when
        ``scores``, the ``(len(tokens), n_vocab)`` destination rows, is given) into the
        logits buffer of the first active context, and returns that context (the one to
        sample from). The last ``n_rows`` tokens must fit one batch of ``n_batch``.
        ``before_batch()`` runs before each batch of ``tokens`` (it may raise to stop a long prompt:
        the contexts then hold a prefix of the text, which the next call keeps or trims).
        ``known``: rows one context already has for the first of ``tokens`` (a model draft's).
        """
        active = [(c, w) for c, w in zip(self.contexts, weights) if w != 0.0]
        if known is not None and n_rows == len(tokens) <= self.n_batch:
            target = self._verify(prefix, list(tokens), active, known, scores, before_batch)
            if target is not None:
                return target
        contexts = [c for c, _ in active]
        self._catch_up(contexts, prefix)
        first_row = 0 if scores is not None else len(tokens) - n_rows
        for start in range(0, len(tokens), self.n_batch):
            before_batch()
            chunk = list(tokens[start : start + self.n_batch])
            end = start + len(chunk)
            n_out = max(1, end - max(first_row, start))
            self.threads.run(
                contexts, lambda c, chunk=chunk, at=len(prefix) + start, k=n_out: c.decode_run(chunk, at, k), len(chunk)
            )
            if end > first_row:
                rows = _blend_rows(active, n_out)
                if scores is not None:
                    scores[end - n_out : end] = rows
        return active[0][0]

    def _catch_up(self, contexts: Sequence[Context], prefix: np.ndarray) -> None:
        """Make every one of ``contexts`` hold ``prefix`` (those behind decode what they lack, at the same time)."""
        lacking = {c: len(prefix) - c.keep_prefix(prefix) for c in contexts}
        behind = [c for c in contexts if lacking[c] > 0]
        self.threads.run(behind, lambda c: c.catch_up(prefix, self.n_batch), max(lacking.values(), default=0))

    def _verify(self, prefix, tokens: List[int], active: List[tuple], known: "KnownRows", scores, before_batch):
        """Decode a draft's batch in every active context but the one that drafted it: that one holds
        the first of ``tokens`` with their rows already (``known``, from one-token decodes, as without
        drafts) and decodes only the rest, at the same time as the others. Returns the context whose
        buffer holds the blended rows, or None where ``known`` does not apply (nothing decoded)."""
        start, drafter = len(prefix), known.context
        others = [c for c, _ in active if c is not drafter]
        if len(others) == len(active) or not others or known.start != start:
            return None
        held = drafter.keep_prefix(np.concatenate([np.asarray(prefix, dtype=np.intc), np.asarray(tokens, np.intc)]))
        have = min(held - start, len(known.rows), len(tokens))
        if have < 1:
            return None  # (its cache now holds at most the prefix: the usual path catches it up)
        drafter.truncate(start + have)
        self._catch_up(others, prefix)
        before_batch()
        rest = tokens[have:]

        def work(c: Context) -> None:
            if c is not drafter:
                c.decode_run(tokens, start, len(tokens))
            elif rest:
                c.decode_run(rest, start + have, len(rest))

        self.threads.run([c for c, _ in active], work, len(tokens))
        drafted = known.rows[:have]
        if rest:
            drafted = np.concatenate([drafted, drafter.rows(len(rest))])
        rows = [drafted if c is drafter else c.rows(len(tokens)) for c, _ in active]
        target = others[0]  # its buffer holds a row per token: the blend goes there, for the sampler
        out = rows[[c for c, _ in active].index(target)]
        blended = blend_logits(rows, [w for _, w in active], out=out)
        if scores is not None:
            scores[:] = blended
        return target


@dataclass(frozen=True)
class SavedSequence:
    """A context's sequence 0 as :meth:`Context.save` took it (plain data: it pickles)."""

    tokens: np.ndarray
    data: bytes
    adapter_scales: tuple

    @property
    def nbytes(self) -> int:
        return len(self.data) + self.tokens.nbytes


@dataclass
class KnownRows:
    """Rows a context computed for tokens it decoded one at a time from position ``start`` (a model
    draft): ``rows[i]`` is its logits row after the token at ``start + i``."""

    context: Context
    start: int
    rows: np.ndarray


def _blend_rows(active: List[tuple], n_rows: int) -> np.ndarray:
    """Blend the newest output rows of the active contexts in place; return the rows."""
    rows = [context.rows(n_rows) for context, _ in active]
    if len(active) == 1:  # weight 1 on one model: leave llama.cpp's logits untouched
        return rows[0]
    return blend_logits(rows, [w for _, w in active], out=rows[0])
