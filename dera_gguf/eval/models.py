"""The model pair of a sweep: weights loaded once, tokenizer, chat template, contexts.

A sweep blends one reference and one aligned model (or a LoRA adapter on the
reference). Unlike :class:`~dera_gguf.DeRaLlama`, which holds one sequence, the
contexts made here hold several sequences on a unified KV cache.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import llama_cpp
from llama_cpp._logger import set_verbose
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from ..contexts import Context
from ..errors import DeRaError
from ..models import PairFiles, PairModels, as_path_list
from ..threads import ThreadPlan, physical_cores

MAX_SEQ = 256  # LLAMA_MAX_SEQ in llama.cpp
PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class PairSpec:
    """How to load an :class:`EvalPair`: its files and settings, loading nothing.

    What a sweep hands to other processes (Ray workers), each of which opens its own pair.
    """

    reference_model_path: str
    aligned_model_path: str
    n_ctx: int = 4096
    n_gpu_layers: int = 0
    n_threads: Optional[int] = None
    flash_attn: bool = False
    verbose: bool = False

    def files(self) -> PairFiles:
        """The checked files (GGUF, same tokenizer, adapter or model), without loading weights."""
        return PairFiles.check(self.reference_model_path, [self.aligned_model_path], self.verbose)

    def open(self) -> "EvalPair":
        return EvalPair(
            self.reference_model_path,
            self.aligned_model_path,
            n_ctx=self.n_ctx,
            n_gpu_layers=self.n_gpu_layers,
            n_threads=self.n_threads,
            flash_attn=self.flash_attn,
            verbose=self.verbose,
        )


def one_aligned(aligned_model_path: Union[PathLike, Sequence[PathLike]]) -> PathLike:
    """The one aligned model of a sweep (a path, or a list of one path)."""
    aligned = as_path_list(aligned_model_path)
    if len(aligned) != 1:
        raise DeRaError(
            f"a lam sweep blends one aligned model, got {len(aligned)}: give a single "
            "--aligned model (to sweep one of a pair's models: --ref REF --aligned THAT_ONE)"
        )
    return aligned[0]


def files_of(pair: Union["EvalPair", PairSpec]) -> PairFiles:
    """The checked files of an open pair or of a spec (checked now, nothing loaded)."""
    return pair.files() if isinstance(pair, PairSpec) else pair.files


def check_mode(mode: str, files: PairFiles) -> str:
    """``"blend"`` (DeRa) or ``"weights"`` (the adapter at scale λ: LoRA pairs only)."""
    if mode not in ("blend", "weights"):
        raise DeRaError(f"mode must be blend or weights, got {mode!r}")
    if mode == "weights" and not files.is_adapter[0]:
        raise DeRaError(
            f"mode weights applies a LoRA adapter at scale lam, but {files.aligned[0]} is a full GGUF model "
            "(interpolating two quantized GGUF files is not supported): use mode blend"
        )
    return mode


class EvalPair:
    """A reference model and an aligned model (GGUF, or GGUF LoRA adapter) for λ sweeps.

    Args:
        reference_model_path: GGUF of the reference (SFT) model.
        aligned_model_path: GGUF of the aligned model, or a LoRA adapter GGUF for the reference.
        n_ctx: tokens one sequence (prompt + response) may hold.
        n_gpu_layers: layers to offload (-1: all).
        n_threads: CPU threads (None: llama.cpp's default).
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
        aligned = [one_aligned(aligned_model_path)]
        self.files = PairFiles.check(reference_model_path, aligned, verbose)
        self.ref_path, self.aligned_path = self.files.reference, self.files.aligned[0]
        self.is_adapter = self.files.is_adapter[0]
        self.n_ctx, self.n_threads, self.flash_attn, self.verbose = n_ctx, n_threads, flash_attn, verbose
        self.n_gpu_layers = n_gpu_layers
        set_verbose(verbose)  # llama.cpp's log, as llama_cpp.Llama(verbose=...) does
        self._stack = contextlib.ExitStack()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers == -1 else n_gpu_layers
        self.models = PairModels(self.files, params, self._stack, verbose)
        self.ref_model = self.models.model(self.ref_path, "reference model")
        self.aligned_model = self.models.model(self.files.weights(0), "aligned model")
        self.n_vocab = self.ref_model.n_vocab()

    @property
    def spec(self) -> PairSpec:
        """What another process needs to load this same pair (see :class:`PairSpec`)."""
        return PairSpec(
            self.ref_path,
            self.aligned_path,
            n_ctx=self.n_ctx,
            n_gpu_layers=self.n_gpu_layers,
            n_threads=self.n_threads,
            flash_attn=self.flash_attn,
            verbose=self.verbose,
        )

    def check_mode(self, mode: str) -> str:
        """``"blend"`` (DeRa) or ``"weights"`` (the adapter at scale λ: LoRA pairs only)."""
        return check_mode(mode, self.files)

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
        """The aligned model's chat template applied to ``messages``, ready for a reply.

        The rendered text is tokenized like a plain prompt (BOS added by the model's
        rules), except that a template that writes the BOS text itself gets no second BOS.
        """
        model = self.aligned_model  # the reference's weights and metadata for an adapter
        template = model.metadata().get("tokenizer.chat_template")
        if not template:
            raise DeRaError(
                f"{self.aligned_path} has no chat template (tokenizer.chat_template): "
                'give "prompt" strings instead of "messages"'
            )
        text = lambda t: model.token_get_text(t) if t >= 0 else ""
        formatter = Jinja2ChatFormatter(template, eos_token=text(model.token_eos()), bos_token=text(model.token_bos()))
        try:
            prompt = formatter(messages=messages).prompt
        except Exception as e:  # jinja errors, raise_exception() in the template
            raise DeRaError(f"the chat template could not render these messages ({e})") from None
        bos = text(model.token_bos())
        return prompt[len(bos) :] if bos and prompt.startswith(bos) else prompt

    def prompt_text(self, prompt: Optional[str], messages: Optional[list]) -> str:
        """A row's prompt as text: the prompt itself, or its messages through the chat template."""
        return prompt if messages is None else self.render_chat(messages)

    # ----------------------------------------------------------- contexts

    def contexts(self, n_seq: int = 1, n_extra: int = 0, n_batch: int = 512) -> List[Context]:
        """Reference and aligned contexts for ``n_seq`` sequences on one unified KV cache.

        The cache holds n_ctx + n_extra cells: one sequence of n_ctx tokens plus the
        responses of the others (whose prompt cells are shared).
        """
        if not 1 <= n_seq <= MAX_SEQ:
            raise DeRaError(f"{n_seq} parallel sequences: llama.cpp allows 1 to {MAX_SEQ}; use fewer lams or samples")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx + n_extra
        params.n_batch = params.n_ubatch = max(min(n_batch, self.n_ctx), n_seq)
        params.n_seq_max = n_seq
        params.kv_unified = True
        # as llama_cpp.Llama (and so DeRaLlama) by default: the same logits as there
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        plan = self.thread_plan()
        params.n_threads, params.n_threads_batch = plan.n_threads, plan.n_threads_batch
        return [self.models.context(member, params, params.n_batch, n_seq) for member in (0, 1)]

    def thread_plan(self) -> ThreadPlan:
        """The contexts' threads, as DeRaLlama's: the physical cores (llama.cpp's own default, 4,
        oversubscribes small machines), and on a CPU with 2 or more the two contexts decode at the
        same time, each on its share (a step of 1 to 8 sequences took 1.16-1.19x less time so on 2
        cores, 32 sequences 1.05x); offloaded, one after the other."""
        n_threads = self.n_threads or physical_cores()
        offloaded = self.n_gpu_layers != 0 and llama_cpp.llama_supports_gpu_offload()
        return ThreadPlan(n_threads, self.n_threads or (os.cpu_count() or 1), not offloaded and n_threads >= 2)
