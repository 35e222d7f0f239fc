"""The model pair of a sweep: checked files, weights loaded once, tokenizer, chat template, runtimes.

A sweep blends one reference and one aligned model (or a LoRA adapter on the
reference). Unlike :class:`~dera_gguf.DeRaLlama`, which holds one sequence, the
runtimes made here hold several sequences on a unified KV cache.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import llama_cpp
from llama_cpp._logger import set_verbose

from ..errors import DeRaError
from ..runtime.contexts import Context
from ..runtime.pair import PairRuntime, sequence_params, thread_plan
from ..runtime.prompts import jinja_formatter
from ..runtime.threads import ThreadPlan
from ..runtime.weights import PairFiles, PairModels, as_path_list

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class PairSpec:
    """How to load an :class:`EvalPair`: its checked files and settings, loading nothing.

    What a sweep hands to other processes (Ray workers), each of which opens its own pair.
    The files are checked once, where the spec is made (:meth:`check`), not again per process.
    """

    files: PairFiles
    n_ctx: int = 4096
    n_gpu_layers: int = 0
    n_threads: Optional[int] = None
    flash_attn: bool = False
    verbose: bool = False
    chat_template: Optional[str] = None  # Jinja text a pair names, instead of the GGUF's

    @classmethod
    def check(
        cls,
        reference_model_path: PathLike,
        aligned_model_path: Union[PathLike, Sequence[PathLike]],
        n_ctx: int = 4096,
        n_gpu_layers: int = 0,
        n_threads: Optional[int] = None,
        flash_attn: bool = False,
        verbose: bool = False,
        chat_template: Optional[str] = None,
    ) -> "PairSpec":
        """The spec of these files (GGUF, same tokenizer, adapter or model), checked now; nothing is loaded."""
        files = PairFiles.check(reference_model_path, [one_aligned(aligned_model_path)], verbose)
        return cls(files, n_ctx, n_gpu_layers, n_threads, flash_attn, verbose, chat_template)

    @property
    def reference_model_path(self) -> str:
        return self.files.reference

    @property
    def aligned_model_path(self) -> str:
        return self.files.aligned[0]

    def open(self) -> "EvalPair":
        return EvalPair.from_spec(self)


def one_aligned(aligned_model_path: Union[PathLike, Sequence[PathLike]]) -> PathLike:
    """The one aligned model of a sweep (a path, or a list of one path)."""
    aligned = as_path_list(aligned_model_path)
    if len(aligned) != 1:
        raise DeRaError(
            f"a lam sweep blends one aligned model, got {len(aligned)}: give a single "
            "--aligned model (to sweep one of a pair's models: --ref REF --aligned THAT_ONE)"
        )
    return aligned[0]


class EvalPair:
    """A reference model and an aligned model (GGUF, or GGUF LoRA adapter) for λ sweeps.

    Args:
        reference_model_path: GGUF of the reference (SFT) model.
        aligned_model_path: GGUF of the aligned model, or a LoRA adapter GGUF for the reference.
        n_ctx: tokens one sequence (prompt + response) may hold.
        n_gpu_layers: layers to offload (-1: all).
        n_threads: CPU threads (None: the physical cores, as in DeRaLlama).
        flash_attn: use flash attention (off by default, as in llama_cpp.Llama).
    """

    def __init__(
        self,
        reference_model_path: PathLike,
        aligned_model_path: Union[PathLike, Sequence[PathLike]],
        n_ctx: int = 4096,
        n_gpu_layers: int = 0,
        n_threads: Optional[int] = None,
        flash_attn: bool = False,
        verbose: bool = False,
    ):
        spec = PairSpec.check(
            reference_model_path, aligned_model_path, n_ctx, n_gpu_layers, n_threads, flash_attn, verbose
        )
        self._load(spec)

    @classmethod
    def from_spec(cls, spec: PairSpec) -> "EvalPair":
        """The pair of ``spec``, whose files were checked when it was made."""
        pair = cls.__new__(cls)
        pair._load(spec)
        return pair

    def _load(self, spec: PairSpec) -> None:
        self.spec, self.files, self.n_ctx = spec, spec.files, spec.n_ctx
        self.ref_path, self.aligned_path = self.files.reference, self.files.aligned[0]
        self.is_adapter = self.files.is_adapter[0]
        set_verbose(spec.verbose)  # llama.cpp's log, as llama_cpp.Llama(verbose=...) does
        self._stack = contextlib.ExitStack()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0x7FFFFFFF if spec.n_gpu_layers == -1 else spec.n_gpu_layers
        self.models = PairModels(self.files, params, self._stack, spec.verbose)
        self.ref_model = self.models.model(self.ref_path, "reference model")
        self.aligned_model = self.models.model(self.files.model_file(0), "aligned model")
        self.n_vocab = self.ref_model.n_vocab()

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "EvalPair":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------- tokens

    def tokenize(self, text: str) -> List[int]:
        """Tokens of ``text`` with BOS (as the model adds it) and special tokens parsed."""
        return self.aligned_model.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.aligned_model.detokenize(list(tokens), special=False).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.aligned_model.vocab, token))

    def render_chat(self, messages: list) -> str:
        """The pair's chat template applied to ``messages``, ready for a reply.

        The template is DeRaLlama's: the one the pair names, else the aligned model's,
        else the reference's. The rendered text is tokenized like a plain prompt (BOS added
        by the model's rules), except that a template that writes the BOS text itself gets
        no second BOS.
        """
        model = self.aligned_model  # the reference's weights and metadata for an adapter
        template = self.spec.chat_template or model.metadata().get("tokenizer.chat_template") or self.files.template
        if not template:
            raise DeRaError(
                f"{self.aligned_path} has no chat template (tokenizer.chat_template), nor has the reference: "
                'give "prompt" strings instead of "messages", or name a chat_template for the pair in models.toml'
            )
        formatter = jinja_formatter(template, model)
        try:
            prompt = formatter(messages=messages).prompt
        except Exception as e:  # jinja errors, raise_exception() in the template
            raise DeRaError(f"the chat template could not render these messages ({e})") from None
        bos = model.token_get_text(model.token_bos()) if model.token_bos() >= 0 else ""
        return prompt[len(bos) :] if bos and prompt.startswith(bos) else prompt

    def prompt_text(self, prompt: Optional[str], messages: Optional[list]) -> str:
        """A row's prompt as text: the prompt itself, or its messages through the chat template."""
        return prompt if messages is None else self.render_chat(messages)

    # ------------------------------------------------------------ runtime

    def runtime(self, n_seq: int = 1, n_extra: int = 0) -> PairRuntime:
        """The pair's :meth:`contexts` for ``n_seq`` sequences, on :meth:`thread_plan`'s threads."""
        contexts = self.contexts(n_seq, n_extra)
        return PairRuntime(self.models, contexts, contexts[0].batch_size, self.thread_plan(), owned=contexts)

    def contexts(self, n_seq: int = 1, n_extra: int = 0, n_batch: int = 512) -> List[Context]:
        """Reference and aligned contexts for ``n_seq`` sequences on one unified KV cache.

        The cache holds n_ctx + n_extra cells: one sequence of n_ctx tokens plus the
        responses of the others (whose prompt cells are shared).
        """
        params = llama_cpp.llama_context_default_params()
        params.n_batch = params.n_ubatch = min(n_batch, self.n_ctx)
        # as llama_cpp.Llama (and so DeRaLlama) by default: the same logits as there
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if self.spec.flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        plan = self.thread_plan()
        params.n_threads, params.n_threads_batch = plan.n_threads, plan.n_threads_batch
        params = sequence_params(params, self.n_ctx + n_extra, n_seq)
        return [self.models.context(member, params, params.n_batch, n_seq) for member in (0, 1)]

    def thread_plan(self) -> ThreadPlan:
        """The contexts' threads, by DeRaLlama's rule (:func:`~dera_gguf.runtime.pair.thread_plan`)."""
        return thread_plan(self.spec.n_gpu_layers, self.spec.n_threads, self.spec.n_threads)
