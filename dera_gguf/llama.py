"""DeRaLlama: a drop-in ``llama_cpp.Llama`` that samples from the realigned model.

``DeRaLlama`` *is* a ``llama_cpp.Llama`` for the (first) aligned model, so every public
method of llama-cpp-python (completions, chat with the GGUF's template, streaming,
stop strings, seeds, logprobs, grammars, JSON mode) keeps working. Only three seams
change:

* ``eval`` decodes the new tokens in every model with a non-zero weight (the
  :class:`~dera_gguf.contexts.Lockstep` group) and leaves the blended logits in a
  context's logits buffer, for every row ``generate()`` samples (the last token's,
  and those of drafted or sent tokens; and in ``self.scores`` when ``logits_all`` is on);
* ``sample`` points llama.cpp's sampler chain at that buffer;
* the public calls take ``lam=`` to override the default for one call.

At lam 0 and 1 a single model decodes and its logits are left untouched, so outputs
equal those of plain ``llama_cpp.Llama`` on that model exactly. What each context
holds is read from llama.cpp at every call (:mod:`dera_gguf.contexts`), so whatever
llama-cpp-python does to its own context (it trims it inside ``generate``), the next
call is exact. This leans on
llama-cpp-python internals (``_ctx``, ``_batch``, ``n_tokens``, ``input_ids``,
``scores``); pyproject.toml pins the release line the tests cover.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Union

import llama_cpp
import numpy as np
from llama_cpp import Llama
from llama_cpp.llama_speculative import LlamaDraftModel

from . import checks
from . import speculative as spec
from .blend import Lam, mixing_weights, normalize_lam
from .contexts import Context, Lockstep
from .errors import ContextFullError, DecodeError, DeRaError, Stopped
from .models import PairFiles, PairModels, as_path_list
from .threads import ThreadPlan, physical_cores

PathLike = Union[str, "os.PathLike[str]"]

# Llama arguments that would break the lockstep or make no sense for a pair.
_REFUSED_KWARGS = {
    "model_path": "give the models as reference_model_path and aligned_model_path",
    "embedding": "DeRa blends next-token logits; use a plain llama_cpp.Llama for embeddings",
    "lora_path": "pass the LoRA adapter GGUF as an aligned model: it is applied on the reference",
    "lora_base": "pass the LoRA adapter GGUF as an aligned model: it is applied on the reference",
}
# Every keyword llama_cpp.Llama names; Llama itself swallows unknown ones (**kwargs) without a word.
_LLAMA_KWARGS = [
    n for n, p in inspect.signature(Llama.__init__).parameters.items() if n != "self" and p.kind is not p.VAR_KEYWORD
]

_DONE = object()
MODES = ("blend", "weights")


@dataclass(frozen=True)
class Realign:
    """The realignment in effect: mixing weights on [reference, aligned_1, ...] and the mode."""

    weights: tuple
    mode: str = "blend"

    def __post_init__(self):
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))


class DeRaLlama(Llama):
    """Decoding-time realignment of a reference model by one or more aligned models.

    Samples from ``softmax((1 - sum(lam)) * h_ref + sum_i lam_i * h_aligned_i)``.

    Args:
        reference_model_path: GGUF file of the reference (SFT) model.
        aligned_model_path: GGUF file of the aligned model, or a list of them. A GGUF
            LoRA adapter (``general.type = adapter``) is applied on the reference model,
            whose weights are then loaded once and shared by both contexts.
        lam: realignment strength: 0 is the reference, 1 the aligned model, > 1
            extrapolates, < 0 moves away from the aligned model. One value per aligned
            model when there are several.
        mode: ``"blend"`` (DeRa: the models' logits blended) or ``"weights"`` (LoRA-aligned
            pairs only: the adapters applied on the reference at scale lam, one forward pass;
            an approximation of DeRa, the paper's weight-space alternative).
        concurrent: decode the contexts at the same time, each on its share of ``n_threads``
            (None: on a CPU with 2 threads or more; not when offloaded to a GPU). The logits
            are the same either way.
        speculative: draft tokens and verify them in one batch per model: ``"lookup"`` (copies
            of earlier text: edits, quotes, code), ``"model"`` (greedy drafts from the pair's
            model with the largest weight) or a llama_cpp ``LlamaDraftModel`` (``draft_model=``
            means the same); None: off. Outputs stay those of decoding without drafts, seed for
            seed, as far as llama.cpp's logits do not depend on the batch shape
            (:mod:`dera_gguf.speculative`). A draft is made only where, at the step costs this
            process has measured for the pair, it is expected to save time (none at first).
        **llama_kwargs: ``llama_cpp.Llama`` arguments (n_ctx, n_gpu_layers, n_threads,
            n_batch, seed, logits_all, verbose, ...), applied to every context. A keyword
            that ``llama_cpp.Llama`` does not name is refused. ``n_threads`` defaults to the
            physical cores (llama-cpp-python's default is half the logical CPUs).
    """

    def __init__(
        self,
        reference_model_path: PathLike,
        aligned_model_path: Union[PathLike, Sequence[PathLike]],
        lam: Lam = 1.0,
        mode: str = "blend",
        concurrent: Optional[bool] = None,
        speculative: Union[None, str, LlamaDraftModel] = None,
        **llama_kwargs: Any,
    ):
        _check_llama_kwargs(llama_kwargs)
        speculative = spec.check_kind(speculative, llama_kwargs.pop("draft_model", None))
        files = PairFiles.check(
            reference_model_path, as_path_list(aligned_model_path), llama_kwargs.get("verbose", True)
        )
        self._files = files
        self._realign = Realign(mixing_weights(lam, len(files.aligned)), self._check_mode(mode))
        self._init_args = (files.reference, list(files.aligned), mode, concurrent, speculative, dict(llama_kwargs))
        llama_kwargs = {**llama_kwargs}
        if llama_kwargs.get("n_threads") is None:  # llama-cpp-python's default is half the logical CPUs
            llama_kwargs["n_threads"] = physical_cores()
        if files.is_adapter[0]:  # this Llama is the reference with the adapter applied
            super().__init__(model_path=files.reference, lora_path=files.aligned[0], **llama_kwargs)
        else:
            super().__init__(model_path=files.aligned[0], **llama_kwargs)
        # llama.cpp may round the context up (to 256); Llama's token buffer keeps the size
        # asked for, so that is the real limit.
        self._n_ctx = min(self._n_ctx, len(self.input_ids))
        self._n_aligned = len(files.aligned)
        self._eval_realign: Optional[Realign] = None  # what made the logits buffers and scores
        self._lockstep = Lockstep(self._open_contexts(files), self.n_batch, self._thread_plan(concurrent))
        self._target: Context = self._lockstep.contexts[1]  # the context whose logits buffer holds the blend
        self._generation: Optional[object] = None  # the generate() call under way, if any
        self._every_row = False  # whether the next decode's every row will be sampled
        self._stop: Optional[Callable[[], bool]] = None  # asked before every decode (stopping())
        # Set after Llama's __init__, which would otherwise keep logits for every row of every decode.
        self.draft_model = self._speculation(speculative)

    @classmethod
    def from_pair(
        cls,
        name: Optional[str] = None,
        lam: Optional[Lam] = None,
        models: Optional[PathLike] = None,
        **llama_kwargs: Any,
    ) -> "DeRaLlama":
        """A DeRaLlama for a pair named in models.toml (``None``: its default pair).

        ``models`` (or ``$DERA_MODELS``) points at another models.toml. Hub files are
        fetched through huggingface_hub; missing local files raise a DeRaError that says
        how to make them.
        """
        from .registry import load_registry

        registry = load_registry(models)
        pair = registry.get(name) if name is not None else registry.default_pair()
        ref, aligned = pair.resolve()
        if lam is None:
            lam = pair.lam if pair.lam is not None else [1.0] * len(aligned)
        return cls(ref, aligned, lam=normalize_lam(lam, len(aligned)), **llama_kwargs)

    # ----------------------------------------------------------------- set-up

    def _thread_plan(self, concurrent: Optional[bool]) -> ThreadPlan:
        """All contexts share this Llama's threads; by default they decode at the same time on a CPU.

        Offloaded to a GPU they decode one after the other unless ``concurrent=True``: the
        overlap there has not been measured yet.
        """
        params = self.context_params
        if concurrent is None:
            offloaded = self.model_params.n_gpu_layers != 0 and llama_cpp.llama_supports_gpu_offload()
            concurrent = not offloaded and params.n_threads >= 2
        plan = ThreadPlan(params.n_threads, params.n_threads_batch, bool(concurrent))
        self._stack.callback(plan.close)
        return plan

    def _open_contexts(self, files: PairFiles) -> List[Context]:
        """Contexts in lockstep order: reference first, then the aligned models.

        Aligned model 1 is this Llama's own context; the others are made on the same
        loaded weights (an adapter's reference is loaded once).
        """
        adapter = {files.aligned[0]: self._lora_adapter} if files.is_adapter[0] else {}
        self._models = PairModels(
            files,
            self.model_params,
            self._stack,
            self.verbose,
            loaded={files.weights(0): self._model},
            adapters=adapter,
        )
        make = lambda m: self._models.context(m, self.context_params, self.n_batch, lora_scale=self.lora_scale)
        self._own_adapters = tuple((a, self.lora_scale) for a in adapter.values())  # its adapter in blend mode
        own = Context("aligned model 1", self._ctx, self._n_vocab, self._batch, self.n_batch, self._own_adapters)
        return [make(0), own] + [make(m) for m in range(2, len(files.aligned) + 1)]

    def _speculation(self, speculative: Any) -> Optional[spec.Speculation]:
        if speculative is None:
            return None
        if speculative == "lookup":
            source = spec.NgramLookup()
        elif speculative == "model":
            source = spec.ModelDraft(self._drafting_context, self._draft_on, self.n_batch)
        else:
            source = spec.from_draft_model(speculative)
        return spec.Speculation(source, room=lambda length: self.n_batch - (length - self.n_tokens), key=self._cost_key)

    def _cost_key(self) -> tuple:
        """What a step's cost depends on now (speculation times steps per key): the models and which of
        them decode, the thread plan, offloading and attention settings."""
        plan, params = self._lockstep.threads, self.context_params
        active = tuple(w != 0.0 for w in self._realign.weights) if self._realign.mode == "blend" else "weights"
        files = (self._files.reference, *self._files.aligned)
        threads = (plan.n_threads, plan.n_threads_batch, plan.concurrent)
        return files, active, threads, self.model_params.n_gpu_layers, params.flash_attn_type, params.type_k

    def _drafting_context(self) -> Optional[Context]:
        """The model that drafts in ``speculative="model"``: the one with the largest weight (blend mode only)."""
        if self._realign.mode != "blend":
            return None
        return spec.largest_weight(self._lockstep.contexts, self._realign.weights)

    def _known_rows(self):
        """The rows a model draft left in its context (verification need not decode them again)."""
        source = getattr(self.draft_model, "source", None)
        return source.take_known() if isinstance(source, spec.ModelDraft) else None

    def _draft_on(self, context: Context, work) -> None:
        self._lockstep.threads.run([context], work)

    @property
    def speculation_stats(self) -> Optional[spec.SpeculationStats]:
        """Drafted and accepted token counts so far (None without ``speculative``)."""
        return self.draft_model.stats if self.draft_model is not None else None

    # ------------------------------------------------------------ lam, mode

    @property
    def lam(self) -> Union[float, tuple]:
        """The default realignment strength (one float, or one per aligned model)."""
        return normalize_lam(self._realign.weights[1:], self._n_aligned)

    @lam.setter
    def lam(self, value: Lam) -> None:
        self._realign = Realign(mixing_weights(value, self._n_aligned), self._realign.mode)

    @property
    def mode(self) -> str:
        """The default mode: ``"blend"`` (DeRa) or ``"weights"`` (adapters at scale lam)."""
        return self._realign.mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._realign = Realign(self._realign.weights, self._check_mode(value))

    @property
    def weights(self) -> np.ndarray:
        """Mixing weights on [reference, aligned_1, ...] in effect now."""
        return np.array(self._realign.weights)

    def _check_mode(self, mode: Any) -> str:
        if mode not in MODES:
            raise DeRaError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "weights" and not all(self._files.is_adapter):
            raise DeRaError(
                "mode='weights' applies LoRA adapters on the reference at scale lam, but an aligned model here is a "
                "full GGUF model (interpolating two quantized GGUF files is not supported): use mode='blend'"
            )
        return mode

    @contextlib.contextmanager
    def _using(self, realign: "Realign"):
        """Realign with ``realign`` inside; a llama.cpp failure in llama-cpp-python becomes a DeRaError."""
        saved, self._realign = self._realign, realign
        try:
            yield
        except RuntimeError as e:  # llama-cpp-python raises RuntimeError for llama.cpp's failures
            raise DecodeError(f"llama.cpp failed during the call ({e})") from None
        finally:
            self._realign = saved

    def _realign_for(self, lam: Optional[Lam], mode: Optional[str]) -> "Realign":
        weights = self._realign.weights if lam is None else mixing_weights(lam, self._n_aligned)
        return Realign(weights, self._realign.mode if mode is None else self._check_mode(mode))

    def _run(self, realign: "Realign", call) -> Any:
        """Run ``call`` under ``realign``; a stream keeps it while it is consumed."""
        with self._using(realign):
            result = call()
        return self._stream(realign, result) if isinstance(result, Iterator) else result

    def _stream(self, realign: "Realign", chunks: Iterator) -> Iterator:
        while True:
            with self._using(realign):
                chunk = next(chunks, _DONE)
            if chunk is _DONE:
                return
            yield chunk

    # --------------------------------------------------------- public calls

    def create_completion(
        self, prompt: Union[str, List[int]], *args: Any, lam: Optional[Lam] = None, mode: Optional[str] = None, **kwargs
    ):
        """``llama_cpp.Llama.create_completion`` with ``lam=`` and ``mode=`` for this call."""
        realign = self._realign_for(lam, mode)
        bound = _bind(Llama.create_completion, self, prompt, *args, **kwargs)
        self._check_call(bound)
        self._check_prompt_length(prompt)
        return self._run(realign, lambda: super(DeRaLlama, self).create_completion(prompt, *args, **kwargs))

    def __call__(self, prompt: str, *args: Any, lam: Optional[Lam] = None, mode: Optional[str] = None, **kwargs: Any):
        """``llama_cpp.Llama.__call__`` with ``lam=`` and ``mode=`` for this call."""
        bound = _bind(Llama.__call__, self, prompt, *args, **kwargs)
        bound.pop("self")
        return self.create_completion(lam=lam, mode=mode, **bound)

    def create_chat_completion(
        self, messages, *args: Any, lam: Optional[Lam] = None, mode: Optional[str] = None, **kwargs: Any
    ):
        """``llama_cpp.Llama.create_chat_completion`` with ``lam=`` and ``mode=`` for this call."""
        realign = self._realign_for(lam, mode)
        bound = _bind(Llama.create_chat_completion, self, messages, *args, **kwargs)
        self._check_call(bound)
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise DeRaError("messages must be a list of {'role': ..., 'content': ...} dicts")
        return self._run(realign, lambda: super(DeRaLlama, self).create_chat_completion(messages, *args, **kwargs))

    def _check_call(self, bound: dict) -> None:
        """Sampling values and grammar, checked before anything reaches llama.cpp."""
        checks.check_sampling(bound, self._n_vocab, self._logits_all)
        if bound.get("grammar") is not None:
            checks.check_grammar(bound["grammar"], self._model.vocab)

    def _check_prompt_length(self, prompt: Any) -> None:
        if isinstance(prompt, str):
            n = len(self.tokenize(prompt.encode("utf-8"), add_bos=True, special=True))
        elif isinstance(prompt, list) and all(isinstance(t, (int, np.integer)) for t in prompt):
            n = len(prompt)
            if any(not 0 <= t < self._n_vocab for t in prompt):
                raise DeRaError(f"prompt token ids must lie in [0, {self._n_vocab})")
        else:
            raise DeRaError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if n >= self._n_ctx:
            raise ContextFullError(
                f"the prompt is {n} tokens but the context holds {self._n_ctx} (n_ctx): "
                "shorten the prompt or create the DeRaLlama with a larger n_ctx"
            )

    # ------------------------------------------------ llama-cpp-python seams

    def generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any):
        """``Llama.generate``, always refreshing the last prompt row through :meth:`eval`.

        llama-cpp-python would sample an exactly cached prompt from the logits buffer as
        it stands, but a context that caught up since may have overwritten it, and lam
        may have changed; replaying one token costs one decode and is always exact.
        After its first decode (the prompt: one row sampled) ``Llama.generate`` samples
        the row of every token it decodes (the sampled token, what ``send()`` gave, a
        draft), so :meth:`eval` blends them all from then on.
        """
        self._requires_eval = True
        generation = self._generation = object()
        self._every_row = False
        if self.draft_model is not None:
            self.draft_model.restart()
        if self._logits_all and self._eval_realign != self._realign:
            self.reset()  # the score rows of the cached prefix hold another blend: recompute them
        try:
            return (yield from super().generate(tokens, *args, **kwargs))
        finally:
            if self._generation is generation:  # (not if another generate() started since)
                self._generation, self._every_row = None, False

    @contextlib.contextmanager
    def stopping(self, when: Callable[[], bool]):
        """Within it, every decode (each batch of a long prompt too) first asks ``when()``, and a true
        answer ends the call with :class:`~dera_gguf.errors.Stopped` before that decode (the engine
        stays consistent: the next call goes on normally). dera-serve stops a request whose client
        went away so."""
        self._stop = when
        try:
            yield self
        finally:
            self._stop = None

    def _check_stop(self) -> None:
        if self._stop is not None and self._stop():
            raise Stopped("the call was stopped (DeRaLlama.stopping) before its next decode")

    def eval(self, tokens: Sequence[int]) -> None:
        """Decode ``tokens`` in lockstep and leave their blended logits for the sampler."""
        tokens = list(tokens)
        if not tokens and self.n_tokens:  # nothing new: refresh the last row instead
            self.n_tokens -= 1
            tokens = [int(self.input_ids[self.n_tokens])]
        start, n = self.n_tokens, len(tokens)
        if start + n > len(self.input_ids):
            raise ContextFullError(
                f"{start + n} tokens do not fit the context of {len(self.input_ids)} (n_ctx): "
                "create the DeRaLlama with a larger n_ctx or start a shorter conversation"
            )
        rows = n if self._every_row else 1
        if rows > self.n_batch:
            raise DeRaError(
                f"generate() is to sample {rows} rows of one decode (the tokens given to send() and a draft), "
                f"more than a batch holds (n_batch {self.n_batch}): send fewer tokens at a time"
            )
        scores = self.scores[start : start + n] if self._logits_all else None
        weights = self._prepare_contexts()
        known = self._known_rows()  # (taken by every decode: rows left by a model draft serve only the next)
        self._target = self._lockstep.eval(
            self.input_ids[:start], tokens, weights, scores, rows, self._check_stop, known
        )
        self.input_ids[start : start + n] = tokens
        self.n_tokens += n
        self._requires_eval = False
        self._every_row = self._generation is not None
        self._eval_realign = self._realign

    def _prepare_contexts(self) -> tuple:
        """Set this Llama's own context up for the mode; return the weights the lockstep blends with.

        In weight-space mode only the own context decodes, with every adapter at its lam;
        in blend mode it runs aligned model 1 (its adapter at ``lora_scale``, if any).
        """
        own = self._lockstep.contexts[1]
        if self._realign.mode == "weights":
            own.set_adapters(self._models.adapters_at(self._realign.weights[1:]))
            return (0.0, 1.0) + (0.0,) * (self._n_aligned - 1)
        own.set_adapters(self._own_adapters)
        return self._realign.weights

    def sample(self, *args: Any, **kwargs: Any) -> int:
        """``Llama.sample`` on the context whose logits buffer holds the blend."""
        saved, self._ctx = self._ctx, self._target.ctx
        try:
            return super().sample(*args, **kwargs)
        finally:
            self._ctx = saved

    def close(self) -> None:
        if hasattr(self, "_stack"):  # __init__ may have refused its arguments before Llama set up
            super().close()

    def set_cache(self, cache) -> None:
        if cache is not None:
            raise DeRaError(
                "DeRaLlama keeps no llama-cpp-python prompt cache: prefix reuse between calls "
                "is automatic in every context"
            )
        super().set_cache(cache)

    def save_state(self):
        raise DeRaError("save_state would capture one of the DeRa contexts only; it is not supported")

    def load_state(self, state) -> None:
        raise DeRaError("load_state would restore one of the DeRa contexts only; it is not supported")

    def __getstate__(self):
        ref, aligned, mode, concurrent, speculative, kwargs = self._init_args
        return {
            "reference_model_path": ref,
            "aligned_model_path": aligned,
            "lam": self.lam,
            "mode": self.mode,
            "concurrent": concurrent,
            "speculative": speculative,
            "llama_kwargs": kwargs,
        }

    def __setstate__(self, state):
        self.__init__(
            state["reference_model_path"],
            state["aligned_model_path"],
            state["lam"],
            mode=state["mode"],
            concurrent=state["concurrent"],
            speculative=state.get("speculative"),
            **state["llama_kwargs"],
        )


def _check_llama_kwargs(kwargs: dict) -> None:
    """Refuse keywords that would break the pair, and any that ``llama_cpp.Llama`` does not name."""
    for name, why in _REFUSED_KWARGS.items():
        if name in kwargs and kwargs[name] not in (None, False):
            raise DeRaError(f"DeRaLlama does not take {name}=: {why}")
    for name in kwargs:
        if name not in _LLAMA_KWARGS:
            raise DeRaError(
                f"DeRaLlama got an unknown keyword argument {name}={kwargs[name]!r}"
                f"{_closest(name, _LLAMA_KWARGS + ['lam', 'mode', 'concurrent', 'speculative'])}"
            )


def _bind(method, *args: Any, **kwargs: Any) -> dict:
    """The arguments of a call to ``method`` by name; an unknown keyword is refused by name."""
    signature = inspect.signature(method)
    try:
        return signature.bind(*args, **kwargs).arguments
    except TypeError as e:
        unknown = [k for k in kwargs if k not in signature.parameters]
        names = [n for n in signature.parameters if n != "self"] + ["lam"]
        hint = _closest(unknown[0], names) if unknown else ""
        raise DeRaError(f"{method.__name__}: {e}{hint}") from None


def _closest(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1)
    return f" (did you mean {close[0]}=?)" if close else ""
