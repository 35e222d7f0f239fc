"""The pair runtime every front uses: a pair's contexts, their threads, the realignment, drafting.

A :class:`PairRuntime` owns the llama.cpp contexts of one pair (reference first, then the
aligned models) and the sequences they hold. :class:`~dera_gguf.DeRaLlama` steps one
sequence in lockstep through it (:meth:`PairRuntime.eval`); a λ sweep
(:mod:`dera_gguf.eval`) decodes many sequences in one batch (:meth:`PairRuntime.decode`).
The rules both need are written here once: how the contexts share the CPU
(:func:`thread_plan`), which modes a pair has (:func:`check_mode`), and what weight-space
mode does to the contexts (:meth:`PairRuntime.prepare`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, List, NamedTuple, Optional, Sequence

import llama_cpp
import numpy as np

from ..blend import Lam, mixing_weights
from ..errors import DeRaError
from ..speculation import verify as spec
from ..speculation.small_model import Drafter, SmallDraft
from .contexts import Context, KnownRows, Lockstep, SavedSequence
from .threads import ThreadPlan, physical_cores
from .weights import PairFiles, PairModels

MODES = ("blend", "weights")
MAX_SEQ = 256  # LLAMA_MAX_SEQ in llama.cpp


class Batch(NamedTuple):
    """One llama.cpp batch: token i at ``positions[i]`` of sequence ``seqs[i]``, logits where ``outputs[i]``."""

    tokens: Sequence[int]
    positions: Sequence[int]
    seqs: Sequence[int]
    outputs: Sequence[bool]


def check_mode(mode: Any, files: PairFiles) -> str:
    """``"blend"`` (DeRa: the models' logits blended) or ``"weights"`` (the LoRA adapters applied on the
    reference at scale lam, one forward pass: the paper's weight-space approximation of DeRa).

    Weight-space mode needs every aligned model to be a LoRA adapter: two full GGUF models,
    quantized, cannot be interpolated.
    """
    if mode not in MODES:
        raise DeRaError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    full = [path for path, adapter in zip(files.aligned, files.is_adapter) if not adapter]
    if mode == "weights" and full:
        raise DeRaError(
            f"mode 'weights' applies LoRA adapters on the reference at scale lam, but {full[0]} is a full GGUF "
            "model (interpolating two quantized GGUF files is not supported): use mode 'blend'"
        )
    return mode


@dataclass(frozen=True)
class Realign:
    """A realignment: mixing weights on [reference, aligned_1, ...] and the mode (see :func:`check_mode`)."""

    weights: tuple
    mode: str = "blend"

    def __post_init__(self):
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))

    @classmethod
    def of(cls, lam: Lam, mode: str, files: PairFiles) -> "Realign":
        """``lam`` and ``mode`` checked against the pair's files."""
        return cls(mixing_weights(lam, len(files.aligned)), check_mode(mode, files))

    @property
    def lams(self) -> tuple:
        """The weight of each aligned model."""
        return self.weights[1:]

    def override(self, files: PairFiles, lam: Optional[Lam] = None, mode: Optional[str] = None) -> "Realign":
        """This realignment with ``lam`` and ``mode`` (where given) instead of its own, checked."""
        weights = self.weights if lam is None else mixing_weights(lam, len(files.aligned))
        return Realign(weights, self.mode if mode is None else check_mode(mode, files))


def thread_plan(
    n_gpu_layers: int,
    n_threads: Optional[int] = None,
    n_threads_batch: Optional[int] = None,
    concurrent: Optional[bool] = None,
) -> ThreadPlan:
    """The threads of a pair's contexts, shared among those that decode at the same time.

    ``n_threads`` defaults to the physical cores (llama-cpp-python's default, half the logical
    CPUs, and llama.cpp's, 4, misjudge machines with hyper-threads or few cores),
    ``n_threads_batch`` to the logical CPUs.
    ``concurrent=None``: on a CPU with 2 threads or more, whichever of the two plans (at the same time,
    each on its share; one after the other, each on all threads) the runtime measures to be faster for
    each batch size (:class:`~dera_gguf.runtime.threads.PlanChoice`; at the same time first), and one
    after the other when offloaded to a GPU (there the overlap is unmeasured). True or False: that
    plan always. The logits are the same either way.
    """
    n_threads = n_threads or physical_cores()
    measured = False
    if concurrent is None:
        offloaded = n_gpu_layers != 0 and llama_cpp.llama_supports_gpu_offload()
        concurrent = measured = not offloaded and n_threads >= 2
    return ThreadPlan(n_threads, n_threads_batch or os.cpu_count() or 1, bool(concurrent), measured)


def sequence_params(context_params, n_ctx: int, n_seq: int, unified: bool = True):
    """``context_params`` (a ``llama_context_params``, copied: batch sizes, threads, attention) for contexts
    of ``n_seq`` sequences on a KV cache of ``n_ctx`` cells in all.

    ``unified``: one cache that the sequences share (a prompt's cells shared by copying); else one
    cache of ``n_ctx / n_seq`` cells per sequence, each laid out as in a context of its own, so that a
    sequence's numbers do not depend on where the others' cells lie. A batch holds a token of every
    sequence.
    """
    if not 1 <= n_seq <= MAX_SEQ:
        raise DeRaError(f"{n_seq} parallel sequences: llama.cpp allows 1 to {MAX_SEQ}; ask for fewer")
    params = type(context_params).from_buffer_copy(context_params)
    params.n_ctx, params.n_seq_max, params.kv_unified = n_ctx, n_seq, unified
    params.n_batch = max(params.n_batch, n_seq)
    params.n_ubatch = max(params.n_ubatch, n_seq)
    return params


class PairRuntime:
    """The contexts of one pair, reference first, and what runs on them.

    Args:
        models: the pair's loaded weights.
        contexts: one per model: the reference, then aligned model 1, 2, ...
        n_batch: the most tokens one decode holds.
        threads: how the contexts share the CPU; closed with the runtime.
        owned: the contexts this runtime closes (not one its caller lent it).
    """

    def __init__(
        self,
        models: PairModels,
        contexts: Sequence[Context],
        n_batch: int,
        threads: ThreadPlan,
        owned: Sequence[Context] = (),
    ):
        self.models, self.files = models, models.files
        self.contexts: List[Context] = list(contexts)
        self.n_batch, self.threads = n_batch, threads
        self.n_vocab = self.contexts[0].n_vocab
        self._owned = list(owned)
        self._blend_adapters = self.contexts[1].adapters  # what aligned model 1 runs on in blend mode
        self._lockstep = Lockstep(self.contexts, n_batch, threads)
        self.speculation: Optional[spec.Speculation] = None  # the drafts of eval(), if any (set once: drafting)

    @classmethod
    def open(
        cls,
        models: PairModels,
        context_params,
        n_batch: int,
        threads: ThreadPlan,
        n_seq: int = 1,
        aligned_context: Optional[Context] = None,
        lora_scale: float = 1.0,
    ) -> "PairRuntime":
        """New contexts for every model of the pair, each for ``n_seq`` sequences, an adapter at ``lora_scale``.

        ``aligned_context``: a context the caller holds for aligned model 1 (DeRaLlama's own), used
        instead of a new one and left to the caller to close.
        """
        members = range(len(models.files.aligned) + 1)
        contexts = [
            aligned_context
            if m == 1 and aligned_context is not None
            else models.context(m, context_params, n_batch, n_seq, lora_scale=lora_scale)
            for m in members
        ]
        return cls(models, contexts, n_batch, threads, [c for c in contexts if c is not aligned_context])

    @classmethod
    def for_sequences(
        cls,
        models: PairModels,
        context_params,
        n_ctx: int,
        n_seq: int,
        threads: ThreadPlan,
        unified: bool = True,
    ) -> "PairRuntime":
        """New contexts of every model of the pair for ``n_seq`` sequences (:func:`sequence_params`).

        ``context_params`` and ``threads`` are usually those of the pair's one-sequence engine, so a
        prompt decodes in the same batch shapes as there.
        """
        params = sequence_params(context_params, n_ctx, n_seq, unified)
        members = range(len(models.files.aligned) + 1)
        contexts = [models.context(m, params, params.n_batch, n_seq) for m in members]
        return cls(models, contexts, params.n_batch, threads.copy(), owned=contexts)

    # ----------------------------------------------------------- realignment

    def prepare(self, realign: Realign) -> tuple:
        """Set the contexts up for ``realign``; return the weights their rows are blended with.

        Weight-space mode runs aligned model 1's context on the reference with every adapter at
        its lam, and only that context decodes (weight 1 on it, 0 on the others). Blend mode runs
        it on its own weights (its adapter, if any, at the scale the context was made with).

        Nothing about ``realign`` is kept here: what the contexts run on is what they hold (their
        adapters), and whoever needs the realignment later is handed it by the call that has it.
        """
        adapted = self.contexts[1]
        if realign.mode == "weights":
            adapted.set_adapters(self.models.adapters_at(realign.lams))
            return (0.0, 1.0) + (0.0,) * (len(realign.weights) - 2)
        adapted.set_adapters(self._blend_adapters)
        return realign.weights

    # ------------------------------------------------------- one sequence

    def eval(
        self,
        prefix: np.ndarray,
        tokens: Sequence[int],
        realign: Realign,
        scores: Optional[np.ndarray] = None,
        n_rows: int = 1,
        before_batch: Callable[[], None] = lambda: None,
    ) -> Context:
        """Decode ``tokens`` after ``prefix`` in sequence 0 of the contexts ``realign`` weighs; blend their
        rows (:meth:`~dera_gguf.runtime.contexts.Lockstep.eval`). Returns the context whose logits buffer holds
        the blend. Rows a model draft left behind serve this decode only."""
        weights = self.prepare(realign)
        return self._lockstep.eval(prefix, tokens, weights, scores, n_rows, before_batch, self._take_known())

    # --------------------------------------------------- many sequences

    def decode(
        self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int], outputs: Sequence[bool]
    ) -> np.ndarray:
        """Decode one batch in every context; the output rows in batch order, shape (n_models, n_out, n_vocab)."""
        n_out = int(sum(bool(o) for o in outputs))
        rows = np.empty((len(self.contexts), n_out, self.n_vocab), dtype=np.float32)
        batch = Batch(tokens, positions, seqs, outputs)
        for m, out in enumerate(self.decode_each([batch] * len(self.contexts))):
            if out is not None:
                rows[m] = out
        return rows

    def decode_each(self, batches: Sequence[Optional["Batch"]]) -> List[Optional[np.ndarray]]:
        """Decode ``batches[m]`` in context m (None: context m decodes nothing), the contexts at the same
        time; each context's output rows in its batch order, (n_out, n_vocab), a view of llama.cpp's
        buffer valid until that context's next decode (None where it returned none)."""
        rows: List[Optional[np.ndarray]] = [None] * len(self.contexts)
        active = [c for c, b in zip(self.contexts, batches) if b is not None and len(b.tokens)]

        def decode(context: Context) -> None:
            m = self.contexts.index(context)
            context.decode(*batches[m])
            n_out = int(sum(bool(o) for o in batches[m].outputs))
            if n_out:
                rows[m] = context.rows(n_out)

        self.threads.run(active, decode, max((len(b.tokens) for b in batches if b is not None), default=0))
        return rows

    def share_sequence(self, src: int, dst: int) -> None:
        """Let sequence ``dst`` use the cells of ``src`` in every context (a shared prompt)."""
        for context in self.contexts:
            context.share_sequence(src, dst)

    def drop_from(self, seq: int, n: int) -> None:
        """Drop sequence ``seq``'s positions from ``n`` on in every context (drafts that did not pass)."""
        for context in self.contexts:
            context.drop_from(seq, n)

    def clear(self) -> None:
        for context in self.contexts:
            context.clear()

    # ------------------------------------------------------------ states

    def save(self) -> tuple:
        """Every context's sequence 0 (:meth:`~dera_gguf.runtime.contexts.Context.save`), reference first."""
        return tuple(context.save() for context in self.contexts)

    def restore(self, saved: Sequence[SavedSequence]) -> None:
        """Make every context hold what :meth:`save` saw; a context left behind catches up when needed."""
        if len(saved) != len(self.contexts):
            raise DeRaError(f"the state has {len(saved)} contexts, this pair {len(self.contexts)}: another pair's")
        for context, sequence in zip(self.contexts, saved):
            context.restore(sequence)

    # ------------------------------------------------------------- drafts

    def drafting(
        self,
        kind: Any,
        room: Callable[[int], int],
        realign: Callable[[], Realign],
        settings: tuple = (),
        drafter: Optional[Drafter] = None,
        trail: Optional[Callable[[], Optional[spec.Trail]]] = None,
    ) -> Optional[spec.Speculation]:
        """The drafts :meth:`eval` verifies: ``kind`` is ``"lookup"``, ``"model"`` or a llama-cpp-python
        ``LlamaDraftModel`` (None: no drafts); ``room(n)``, the most tokens a draft may have after n;
        ``realign()``: the realignment of the call a draft is made for (it names the step's cost,
        :meth:`cost_key`, and the context a ``"model"`` draft uses, :meth:`drafting_context`);
        ``settings``: what else a step's cost depends on (offloading, attention), part of :meth:`cost_key`;
        ``drafter``: a small drafter (:mod:`dera_gguf.speculation.small_model`), which a ``"model"`` draft
        uses instead of the pair's own models; ``trail()``: what the speculation follows of that call's text
        (:class:`~dera_gguf.speculation.verify.Trail`)."""
        run = lambda context, work: self.threads.run([context], work)
        if kind is None:
            source = None
        elif kind == "lookup":
            source = spec.NgramLookup()
        elif kind == "model" and drafter is not None:
            source = SmallDraft(drafter.context, run, self.n_batch, drafter.path, limit=self.n_vocab)
        elif kind == "model":
            source = spec.ModelDraft(lambda: self.drafting_context(realign()), run, self.n_batch)
        else:
            source = spec.from_draft_model(kind)
        key = lambda: self.cost_key(realign(), settings)
        self.speculation = None if source is None else spec.Speculation(source, room, key=key, trail=trail)
        return self.speculation

    def cost_key(self, realign: Realign, settings: tuple = ()) -> tuple:
        """What a step under ``realign`` costs depends on (speculation times steps per key): the models
        and which of them decode, the thread plan, and the caller's ``settings``."""
        active = "weights" if realign.mode == "weights" else tuple(w != 0.0 for w in realign.weights)
        files = (self.files.reference, *self.files.aligned)
        plan = self.threads
        return files, active, (plan.n_threads, plan.n_threads_batch, plan.concurrent, plan.measured), settings

    def drafting_context(self, realign: Realign) -> Optional[Context]:
        """The context that drafts for a model draft under ``realign``: the one with the largest weight
        (blend mode only: in weight-space mode one context decodes; None: nothing to draft with)."""
        if realign.mode != "blend":
            return None
        return spec.largest_weight(self.contexts, realign.weights)

    def _take_known(self) -> Optional[KnownRows]:
        """The rows the latest model draft left in its context (verification need not decode them again)."""
        source = getattr(self.speculation, "source", None)
        return source.take_known() if isinstance(source, spec.ModelDraft) else None

    def close(self) -> None:
        """Stop the decode threads and free the contexts this runtime made."""
        self.threads.close()
        for context in self._owned:
            context.ctx.close()
            context.batch.close()
