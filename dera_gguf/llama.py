"""DeRaLlama: a drop-in ``llama_cpp.Llama`` that samples from the realigned model.

``DeRaLlama`` *is* a ``llama_cpp.Llama`` for the (first) aligned model, so every public
method of llama-cpp-python (completions, chat with the GGUF's template, streaming,
stop strings, seeds, logprobs, grammars, JSON mode) keeps working. Only three seams
change:

* ``eval`` decodes the new tokens in every model with a non-zero weight (the
  :class:`~dera_gguf.contexts.Lockstep` group) and leaves the blended logits in a
  context's logits buffer (and in ``self.scores`` when ``logits_all`` is on);
* ``sample`` points llama.cpp's sampler chain at that buffer;
* the public calls take ``lam=`` to override the default for one call.

At lam 0 and 1 a single model decodes and its logits are left untouched, so outputs
equal those of plain ``llama_cpp.Llama`` on that model exactly. This leans on
llama-cpp-python internals (``_ctx``, ``_batch``, ``n_tokens``, ``input_ids``,
``scores``); pyproject.toml pins the release line the tests cover.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any, Iterator, List, Optional, Sequence, Union

import llama_cpp
import numpy as np
from llama_cpp import Llama
from llama_cpp import _internals as internals

from . import checks
from .blend import Lam, mixing_weights
from .contexts import Lockstep, Member, new_member
from .errors import DeRaError

PathLike = Union[str, "os.PathLike[str]"]

# Llama arguments that would break the lockstep or make no sense for a pair.
_REFUSED_KWARGS = {
    "model_path": "give the models as reference_model_path and aligned_model_path",
    "draft_model": "speculative decoding is not supported with DeRa",
    "embedding": "DeRa blends next-token logits; use a plain llama_cpp.Llama for embeddings",
    "lora_path": "pass the LoRA adapter GGUF as an aligned model: it is applied on the reference",
    "lora_base": "pass the LoRA adapter GGUF as an aligned model: it is applied on the reference",
}

_DONE = object()


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
        **llama_kwargs: ``llama_cpp.Llama`` arguments (n_ctx, n_gpu_layers, n_threads,
            n_batch, seed, logits_all, verbose, ...), applied to every context.
    """

    def __init__(self, reference_model_path: PathLike, aligned_model_path: Union[PathLike, Sequence[PathLike]],
                 lam: Lam = 1.0, **llama_kwargs: Any):
        for name, why in _REFUSED_KWARGS.items():
            if name in llama_kwargs and llama_kwargs[name] not in (None, False):
                raise DeRaError(f"DeRaLlama does not take {name}=: {why}")
        ref_path = checks.check_gguf_file(reference_model_path, "reference model")
        aligned = _as_path_list(aligned_model_path)
        aligned_paths = [checks.check_gguf_file(p, f"aligned model {i + 1}") for i, p in enumerate(aligned)]
        self._weights = mixing_weights(lam, len(aligned_paths))
        self._init_args = (ref_path, aligned_paths, lam, dict(llama_kwargs))
        verbose = llama_kwargs.get("verbose", True)
        is_adapter = [checks.gguf_general_type(p) == "adapter" for p in aligned_paths]
        checks.check_vocabularies(ref_path, [p for p, a in zip(aligned_paths, is_adapter) if not a], verbose)

        if is_adapter[0]:  # this Llama is the reference with the adapter applied
            super().__init__(model_path=ref_path, lora_path=aligned_paths[0], **llama_kwargs)
        else:
            super().__init__(model_path=aligned_paths[0], **llama_kwargs)
        # llama.cpp may round the context up (to 256); Llama's token buffer keeps the size
        # asked for, so that is the real limit.
        self._n_ctx = min(self._n_ctx, len(self.input_ids))
        self._n_aligned = len(aligned_paths)
        self._eval_weights: Optional[np.ndarray] = None
        members = self._build_members(ref_path, aligned_paths, is_adapter)
        self._lockstep = Lockstep(members, self.n_batch)
        self._lockstep.target = members[1]

    @classmethod
    def from_pair(cls, name: Optional[str] = None, lam: Optional[Lam] = None, models: Optional[PathLike] = None,
                  **llama_kwargs: Any) -> "DeRaLlama":
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
        lams = list(lam) if isinstance(lam, (list, tuple)) else [lam]
        return cls(ref, aligned, lam=lams if len(aligned) > 1 else lams[0], **llama_kwargs)

    # ----------------------------------------------------------------- set-up

    def _build_members(self, ref_path: str, aligned_paths: List[str], is_adapter: List[bool]) -> List[Member]:
        """Contexts in lockstep order: reference first, then the aligned models."""
        own = Member("aligned model 1", self._ctx, self._batch, self._n_ctx, self._n_vocab)
        models = {(ref_path if is_adapter[0] else aligned_paths[0]): self._model}

        def model_for(path: str) -> internals.LlamaModel:
            if path not in models:
                models[path] = internals.LlamaModel(path_model=path, params=self.model_params, verbose=self.verbose)
                self._stack.callback(models[path].close)
            return models[path]

        def member(name: str, path: str, adapter_path: Optional[str] = None) -> Member:
            model = model_for(path)
            adapter = self._load_adapter(model, adapter_path) if adapter_path else None
            m = new_member(name, model, self.context_params, self.n_batch, self.verbose, adapter, self.lora_scale)
            self._stack.callback(m.ctx.close)
            return m

        members = [member("reference model", ref_path), own]
        for i, (path, adapter) in enumerate(zip(aligned_paths[1:], is_adapter[1:]), start=2):
            name = f"aligned model {i}"
            members.append(member(name, ref_path, path) if adapter else member(name, path))
        return members

    def _load_adapter(self, model: internals.LlamaModel, path: str):
        adapter = llama_cpp.llama_adapter_lora_init(model.model, path.encode("utf-8"))
        if adapter is None:
            raise DeRaError(f"llama.cpp could not load the LoRA adapter {path} on the reference model: "
                            "was it made for this reference model?")
        self._stack.callback(llama_cpp.llama_adapter_lora_free, adapter)
        return adapter

    # ------------------------------------------------------------------ lam

    @property
    def lam(self) -> Union[float, tuple]:
        """The default realignment strength (one float, or one per aligned model)."""
        lams = tuple(float(w) for w in self._weights[1:])
        return lams[0] if len(lams) == 1 else lams

    @lam.setter
    def lam(self, value: Lam) -> None:
        self._weights = mixing_weights(value, self._n_aligned)

    @property
    def weights(self) -> np.ndarray:
        """Mixing weights on [reference, aligned_1, ...] in effect now."""
        return self._weights.copy()

    @contextlib.contextmanager
    def _using(self, weights: np.ndarray):
        saved, self._weights = self._weights, weights
        try:
            yield
        finally:
            self._weights = saved

    def _weights_for(self, lam: Optional[Lam]) -> np.ndarray:
        return self._weights if lam is None else mixing_weights(lam, self._n_aligned)

    def _run(self, weights: np.ndarray, call) -> Any:
        """Run ``call`` under ``weights``; a stream keeps them while it is consumed."""
        with self._using(weights):
            result = call()
        return self._stream(weights, result) if isinstance(result, Iterator) else result

    def _stream(self, weights: np.ndarray, chunks: Iterator) -> Iterator:
        while True:
            with self._using(weights):
                chunk = next(chunks, _DONE)
            if chunk is _DONE:
                return
            yield chunk

    # --------------------------------------------------------- public calls

    def create_completion(self, prompt: Union[str, List[int]], *args: Any, lam: Optional[Lam] = None, **kwargs: Any):
        """``llama_cpp.Llama.create_completion`` with ``lam=`` for this call."""
        weights = self._weights_for(lam)
        bound = inspect.signature(Llama.create_completion).bind(self, prompt, *args, **kwargs).arguments
        checks.check_sampling(bound, self._n_vocab, self._logits_all)
        self._check_prompt_length(prompt)
        return self._run(weights, lambda: super(DeRaLlama, self).create_completion(prompt, *args, **kwargs))

    def __call__(self, prompt: str, *args: Any, lam: Optional[Lam] = None, **kwargs: Any):
        """``llama_cpp.Llama.__call__`` with ``lam=`` for this call."""
        bound = inspect.signature(Llama.__call__).bind(self, prompt, *args, **kwargs).arguments
        bound.pop("self")
        return self.create_completion(lam=lam, **bound)

    def create_chat_completion(self, messages, *args: Any, lam: Optional[Lam] = None, **kwargs: Any):
        """``llama_cpp.Llama.create_chat_completion`` with ``lam=`` for this call."""
        weights = self._weights_for(lam)
        bound = inspect.signature(Llama.create_chat_completion).bind(self, messages, *args, **kwargs).arguments
        checks.check_sampling(bound, self._n_vocab, self._logits_all)
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise DeRaError("messages must be a list of {'role': ..., 'content': ...} dicts")
        return self._run(weights, lambda: super(DeRaLlama, self).create_chat_completion(messages, *args, **kwargs))

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
            raise DeRaError(f"the prompt is {n} tokens but the context holds {self._n_ctx} (n_ctx): "
                            "shorten the prompt or create the DeRaLlama with a larger n_ctx")

    # ------------------------------------------------ llama-cpp-python seams

    def generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any):
        """``Llama.generate``, made to recompute cached logits when lam changed since."""
        if self._eval_weights is not None and not np.array_equal(self._eval_weights, self._weights):
            self._requires_eval = True  # the buffered last logits hold another blend
            if self._logits_all:
                self.reset()  # so do the score rows of the cached prefix
        return (yield from super().generate(tokens, *args, **kwargs))

    def eval(self, tokens: Sequence[int]) -> None:
        """Decode ``tokens`` in lockstep and leave their blended logits for the sampler."""
        start, n = self.n_tokens, len(tokens)
        scores = self.scores[start : start + n] if self._logits_all else None
        self._lockstep.eval(self.input_ids[:start], tokens, self._weights, scores)
        self.input_ids[start : start + n] = tokens
        self.n_tokens += n
        self._requires_eval = False
        self._eval_weights = self._weights

    def sample(self, *args: Any, **kwargs: Any) -> int:
        """``Llama.sample`` on the context whose logits buffer holds the blend."""
        own, self._ctx = self._ctx, self._lockstep.target.ctx
        try:
            return super().sample(*args, **kwargs)
        finally:
            self._ctx = own

    def close(self) -> None:
        if hasattr(self, "_stack"):  # __init__ may have refused its arguments before Llama set up
            super().close()

    def set_cache(self, cache) -> None:
        if cache is not None:
            raise DeRaError("DeRaLlama keeps no llama-cpp-python prompt cache: prefix reuse between calls "
                            "is automatic in every context")
        super().set_cache(cache)

    def save_state(self):
        raise DeRaError("save_state would capture one of the DeRa contexts only; it is not supported")

    def load_state(self, state) -> None:
        raise DeRaError("load_state would restore one of the DeRa contexts only; it is not supported")

    def __getstate__(self):
        ref, aligned, lam, kwargs = self._init_args
        return {"reference_model_path": ref, "aligned_model_path": aligned, "lam": self.lam, "llama_kwargs": kwargs}

    def __setstate__(self, state):
        self.__init__(state["reference_model_path"], state["aligned_model_path"], state["lam"], **state["llama_kwargs"])


def _as_path_list(aligned: Any) -> List[Any]:
    if isinstance(aligned, (str, os.PathLike)):
        return [aligned]
    if isinstance(aligned, (list, tuple)) and aligned:
        return list(aligned)
    raise DeRaError(f"aligned_model_path must be a path or a non-empty list of paths, got {aligned!r}")
