"""The models of a DeRa pair: checked files, weights loaded once, LoRA adapters, new contexts.

A pair is a reference GGUF and one or more aligned models, each a full GGUF or a LoRA
adapter GGUF (``general.type = adapter``) applied on the reference. Both fronts,
:class:`~dera_gguf.DeRaLlama` and :class:`~dera_gguf.eval.EvalPair`, check and load
their models here and get their :class:`~dera_gguf.runtime.contexts.Context` objects from here.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import llama_cpp
from llama_cpp import _internals as internals

from .. import checks
from ..errors import DeRaError
from .contexts import Context

PathLike = Union[str, "os.PathLike[str]"]


TEMPLATE_KEY = "tokenizer.chat_template"


@dataclass(frozen=True)
class PairFiles:
    """The checked GGUF paths of a pair, which aligned models are LoRA adapters, and its chat template.

    ``template`` is the template to use when the model whose context formats chats (aligned
    model 1, or the reference under an adapter) has none of its own but the reference has
    (None otherwise: llama-cpp-python's own choice stands); ``notes`` say which template is
    used when the files disagree.
    """

    reference: str
    aligned: tuple
    is_adapter: tuple
    template: Optional[str] = None
    notes: tuple = ()

    @classmethod
    def check(cls, reference: PathLike, aligned: Sequence[PathLike], verbose: bool = False) -> "PairFiles":
        """Check every file, then refuse full models whose tokenizer differs from the reference's.

        Runs before any weights are loaded, so a bad pair fails in a second, not after minutes.
        """
        ref = checks.check_gguf_file(reference, "reference model")
        paths = tuple(checks.check_gguf_file(p, f"aligned model {i + 1}") for i, p in enumerate(aligned))
        is_adapter = tuple(checks.gguf_general_type(p) == "adapter" for p in paths)
        checks.check_vocabularies(ref, [p for p, a in zip(paths, is_adapter) if not a], verbose)
        template, notes = _choose_template(ref, paths[0] if not is_adapter[0] else None)
        return cls(ref, paths, is_adapter, template, notes)

    def model_file(self, i: int) -> str:
        """The GGUF model file aligned model ``i`` runs on (the reference's, for an adapter)."""
        return self.reference if self.is_adapter[i] else self.aligned[i]


def _choose_template(reference: str, aligned: Optional[str]) -> tuple:
    """``(template, notes)``: the aligned model's template rules; the reference's fills in for none.

    ``aligned`` is None when aligned model 1 is an adapter (its chats use the reference's template).
    """
    if aligned is None:
        return None, ()
    ref_t = checks.gguf_strings(reference, (TEMPLATE_KEY,)).get(TEMPLATE_KEY)
    own_t = checks.gguf_strings(aligned, (TEMPLATE_KEY,)).get(TEMPLATE_KEY)
    if own_t is None and ref_t is not None:
        return ref_t, (f"{aligned} has no chat template: using the reference model's ({reference})",)
    if own_t is not None and ref_t is not None and own_t != ref_t:
        return None, (f"the chat templates of the two models differ: using the aligned model's ({aligned})",)
    if own_t is None:
        return None, ("neither model has a chat template: llama-cpp-python guesses one (name one with chat_format=)",)
    return None, ()


def as_path_list(aligned: Any) -> List[Any]:
    """One aligned model path, or a non-empty list of them, as a list."""
    if isinstance(aligned, (str, os.PathLike)):
        return [aligned]
    if isinstance(aligned, (list, tuple)) and aligned:
        return list(aligned)
    raise DeRaError(f"aligned_model_path must be a path or a non-empty list of paths, got {aligned!r}")


class PairModels:
    """Each weight file of a pair loaded once, each adapter once, and contexts made on them.

    Args:
        files: the checked pair.
        params: llama.cpp model parameters (offloading, mmap, ...).
        stack: closes what is loaded here (the caller's, so one ``close`` frees everything).
        loaded: models the caller already holds, by path (closed by the caller).
        adapters: LoRA adapters the caller already holds, by path (freed by the caller).
    """

    def __init__(
        self,
        files: PairFiles,
        params,
        stack: contextlib.ExitStack,
        verbose: bool = False,
        loaded: Optional[Dict[str, internals.LlamaModel]] = None,
        adapters: Optional[Dict[str, Any]] = None,
    ):
        self.files, self.params, self.verbose = files, params, verbose
        self._stack = stack
        self._models: Dict[str, internals.LlamaModel] = dict(loaded or {})
        self._adapters: Dict[str, Any] = dict(adapters or {})

    def model(self, path: str, role: str = "model") -> internals.LlamaModel:
        """The loaded model of ``path`` (loaded now if it is not yet)."""
        if path not in self._models:
            try:
                model = internals.LlamaModel(path_model=path, params=self.params, verbose=self.verbose)
            except ValueError:
                raise DeRaError(f"llama.cpp could not load the {role} {path}: re-download or re-convert it") from None
            self._stack.callback(model.close)
            self._models[path] = model
        return self._models[path]

    def adapter(self, path: str):
        """The LoRA adapter of ``path``, loaded on the reference model."""
        if path not in self._adapters:
            reference = self.model(self.files.reference, "reference model")
            adapter = llama_cpp.llama_adapter_lora_init(reference.model, path.encode("utf-8"))
            if adapter is None:
                raise DeRaError(
                    f"llama.cpp could not load the LoRA adapter {path} on the reference model "
                    f"{self.files.reference}: was it made for this reference model?"
                )
            self._stack.callback(llama_cpp.llama_adapter_lora_free, adapter)
            self._adapters[path] = adapter
        return self._adapters[path]

    def context(self, member: int, context_params, n_batch: int, n_seq: int = 1, lora_scale: float = 1.0) -> Context:
        """A new context for ``member``: 0 the reference, i >= 1 aligned model i (1-based)."""
        if member == 0:
            name, model, adapter = "reference model", self.model(self.files.reference, "reference model"), None
        else:
            i = member - 1
            name = f"aligned model {member}"
            model = self.model(self.files.model_file(i), name)
            adapter = self.adapter(self.files.aligned[i]) if self.files.is_adapter[i] else None
        context = self._new_context(name, model, context_params, n_batch, n_seq)
        if adapter is not None:
            context.set_adapters(((adapter, lora_scale),))
        return context

    def draft_context(self, path: str, context_params, n_batch: int) -> Context:
        """A new context on the draft model ``path`` (:mod:`dera_gguf.speculation.small_model`), loaded with
        the pair's model parameters (offloading); a file of the pair is not loaded twice."""
        return self._new_context(f"draft model {path}", self.model(path, "draft model"), context_params, n_batch, 1)

    def _new_context(self, name: str, model: internals.LlamaModel, context_params, n_batch: int, n_seq: int):
        ctx = internals.LlamaContext(model=model, params=context_params, verbose=self.verbose)
        self._stack.callback(ctx.close)
        batch = internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=n_seq, verbose=self.verbose)
        self._stack.callback(batch.close)
        return Context(name, ctx, model.n_vocab(), batch, n_batch)

    def adapters_at(self, scales: Sequence[float]) -> tuple:
        """Every aligned adapter at its scale, ``((adapter, scale), ...)``: the weight-space model."""
        return tuple((self.adapter(path), s) for path, s in zip(self.files.aligned, scales))
