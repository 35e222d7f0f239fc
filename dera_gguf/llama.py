"""DeRaLlama: a drop-in ``llama_cpp.Llama`` that samples from the realigned model.

``DeRaLlama`` *is* a ``llama_cpp.Llama`` for the (first) aligned model, so every public
method of llama-cpp-python (completions, chat with the GGUF's template, streaming,
stop strings, seeds, logprobs, grammars, JSON mode) keeps working. Only three seams
change:

* ``eval`` decodes the new tokens in every model with a non-zero weight (through the
  pair's :class:`~dera_gguf.runtime.pair.PairRuntime`) and leaves the blended logits in a
  context's logits buffer, for every row ``generate()`` samples (the last token's,
  and those of drafted or sent tokens; and in ``self.scores`` when ``logits_all`` is on);
* ``sample`` points llama.cpp's sampler chain at that buffer;
* the public calls take ``lam=`` and ``mode=`` to override the defaults for one call.

What a call runs with (its realignment, which rows to blend, where the blend lies) is
one :class:`Call` object, made where the call starts.

At lam 0 and 1 a single model decodes and its logits are left untouched, so outputs
equal those of plain ``llama_cpp.Llama`` on that model exactly. What each context
holds is read from llama.cpp at every call (:mod:`dera_gguf.runtime.contexts`), so whatever
llama-cpp-python does to its own context (it trims it inside ``generate``), the next
call is exact. This leans on llama-cpp-python internals (``_ctx``, ``_batch``, ``n_tokens``,
``input_ids``, ``scores``); pyproject.toml pins the release line the tests cover.

Why one sequence here does not run on the batch generator (:mod:`dera_gguf.batch`), which every
path with several sequences shares: llama-cpp-python's own ``generate()`` drives this loop (its
prompt cache, stop strings, grammars, logits processors, draft-model hook, its sampler chain with
its seed), and drawing from llama.cpp's chain on the context's own logits buffer is what makes
outputs equal plain llama-cpp-python's at λ 0 and 1, seed for seed. The methods under "for fronts
decoding apart" give the batch paths what they need of this engine (its prompt rules, its weights).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import llama_cpp
import numpy as np
from llama_cpp import Llama
from llama_cpp.llama_speculative import LlamaDraftModel

from . import checks
from .blend import Lam, mixing_weights, normalize_lam
from .errors import ContextFullError, DeRaError, Stopped
from .runtime.bytefallback import ByteFallback
from .runtime.calls import Call, CallScope
from .runtime.contexts import Context
from .runtime.pair import PairRuntime, Realign, check_mode, thread_plan
from .runtime.prompts import chat_tokens, completion_tokens, jinja_formatter
from .runtime.states import PairState, pair_owner
from .runtime.threads import ThreadPlan
from .runtime.weights import PairFiles, PairModels, as_path_list
from .speculation import verify as spec
from .speculation.small_model import check_draft_model, draft_kind, open_drafter

PathLike = Union[str, "os.PathLike[str]"]
_SAMPLE = inspect.signature(Llama.sample)  # its arguments: DeRaLlama.sample makes the same chain from them


class _Setup(NamedTuple):
    """What ``__init__`` was given besides lam and mode: a pickled DeRaLlama is made again from it."""

    reference_model_path: str
    aligned_model_path: list
    concurrent: Optional[bool]
    speculative: Any
    llama_kwargs: dict
    draft_model_path: Optional[str] = None


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
            (None: :func:`~dera_gguf.runtime.pair.thread_plan` decides). The logits are the same
            either way.
        speculative: draft tokens and verify them in one batch per model: ``"lookup"`` (copies
            of earlier text: edits, quotes, code), ``"model"`` (greedy drafts from the pair's
            model with the largest weight) or a llama_cpp ``LlamaDraftModel`` (``draft_model=``
            means the same); None: off. Outputs stay those of decoding without drafts, seed for
            seed, as far as llama.cpp's logits do not depend on the batch shape
            (:mod:`dera_gguf.speculation.verify`). A draft is made only where, at the step costs this
            process has measured for the pair, it is expected to save time (none at first).
        draft_model_path: a small GGUF model with the pair's vocabulary (e.g. a 1B model of the
            8B pair's family) that drafts greedily in a context of its own (:mod:`dera_gguf.speculation.small_model`).
            It implies ``speculative="model"``, which then means its drafts; another ``speculative``
            beside it is refused. A vocabulary unlike the pair's is refused before loading.
        chat_template: a Jinja chat template that formats chats instead of the GGUF's own.
            Without it (and without ``chat_format`` / ``chat_handler``) the aligned model's
            template is used, or the reference's when the aligned model has none.
        **llama_kwargs: ``llama_cpp.Llama`` arguments (n_ctx, n_gpu_layers, n_threads,
            n_batch, seed, logits_all, verbose, ...), applied to every context. A keyword
            that ``llama_cpp.Llama`` does not name is refused. ``n_threads`` defaults to the
            physical cores (:func:`~dera_gguf.runtime.pair.thread_plan`).
    """

    def __init__(
        self,
        reference_model_path: PathLike,
        aligned_model_path: Union[PathLike, Sequence[PathLike]],
        lam: Lam = 1.0,
        mode: str = "blend",
        concurrent: Optional[bool] = None,
        speculative: Union[None, str, LlamaDraftModel] = None,
        chat_template: Optional[str] = None,
        draft_model_path: Optional[PathLike] = None,
        **llama_kwargs: Any,
    ):
        own = ["lam", "mode", "concurrent", "speculative", "chat_template", "draft_model_path"]
        checks.check_llama_kwargs(llama_kwargs, own)
        checks.check_chat_template(chat_template, llama_kwargs)
        speculative = draft_kind(spec.check_kind(speculative, llama_kwargs.pop("draft_model", None)), draft_model_path)
        verbose = llama_kwargs.get("verbose", True)
        files = PairFiles.check(reference_model_path, as_path_list(aligned_model_path), verbose)
        if draft_model_path is not None:
            draft_model_path = check_draft_model(draft_model_path, files.reference, verbose)
        self._files = files
        self._calls = CallScope(Realign.of(lam, mode, files), files)
        self._setup = _Setup(
            files.reference,
            list(files.aligned),
            concurrent,
            speculative,
            dict(llama_kwargs, chat_template=chat_template),
            draft_model_path,
        )
        threads = thread_plan(
            llama_kwargs.get("n_gpu_layers", 0),
            llama_kwargs.get("n_threads"),
            llama_kwargs.get("n_threads_batch"),
            concurrent,
        )
        llama_kwargs = {**llama_kwargs, "n_threads": threads.n_threads, "n_threads_batch": threads.n_threads_batch}
        if files.is_adapter[0]:  # this Llama is the reference with the adapter applied
            super().__init__(model_path=files.reference, lora_path=files.aligned[0], **llama_kwargs)
        else:
            super().__init__(model_path=files.aligned[0], **llama_kwargs)
        self._template: Optional[str] = None  # the Jinja text formatting chats, when one does
        if not (llama_kwargs.get("chat_format") or llama_kwargs.get("chat_handler")):
            self._use_template(chat_template or files.template)
        # llama.cpp may round the context up (to 256); Llama's token buffer keeps the size
        # asked for, so that is the real limit.
        self._n_ctx = min(self._n_ctx, len(self.input_ids))
        self.runtime = self._open_runtime(files, threads)
        self._fallback = ByteFallback.of(self.model, self.metadata)  # None: every text tokenizes
        self._scored: Optional[Realign] = None  # the realignment of the rows in self.scores
        self._stop: Optional[Callable[[], bool]] = None  # set by stopping(): the caller's scope, across calls
        self._owner_cache: Optional[tuple] = None  # _owner(), computed on first use
        # Set after Llama's __init__, which would otherwise keep logits for every row of every decode.
        # The decode batch holds the draft too, and the context the whole text.
        room = lambda length: min(self.n_batch - (length - self.n_tokens), self._n_ctx - length)
        settings = (self.model_params.n_gpu_layers, self.context_params.flash_attn_type, self.context_params.type_k)
        drafter = open_drafter(self.runtime.models, draft_model_path, self.context_params, self.n_batch)
        # A draft is made inside a generate() step, with that call in effect: its realignment and trail are the draft's.
        trail = lambda: getattr(self._calls.open(), "trail", None)
        self.draft_model = self.runtime.drafting(speculative, room, self._calls.realign, settings, drafter, trail)

    @classmethod
    def from_pair(
        cls,
        name: Optional[str] = None,
        lam: Optional[Lam] = None,
        models: Optional[PathLike] = None,
        draft: Optional[bool] = None,
        **llama_kwargs: Any,
    ) -> "DeRaLlama":
        """A DeRaLlama for a pair named in models.toml (``None``: its default pair).

        ``models`` (or ``$DERA_MODELS``) adds another models.toml to the shipped one and the
        user's. Nothing is downloaded here: a pair whose files are missing raises a DeRaError
        naming the command that gets them (``dera-pull NAME``, or :func:`dera_gguf.pairs.pull`).
        The pair's chat template (models.toml's ``chat_format`` / ``chat_template``) is used
        unless the call names one. ``draft``: the pair's drafter (models.toml's ``draft``) drafts
        when it is pulled (None), always (True: a DeRaError when it is missing) or never (False);
        a ``draft_model_path=``, or a ``speculative=`` other than ``"model"``, replaces it. Other
        keywords (``n_ctx=``, ...) are :class:`DeRaLlama`'s.
        """
        from .pairs.registry import load_registry

        pair, _ = load_registry(models).pick(name)
        args = pair.engine_args(lam, draft, **llama_kwargs)
        return cls(args.reference, args.aligned, lam=args.lam, **args.llama_kwargs)

    # ----------------------------------------------------------------- set-up

    def _open_runtime(self, files: PairFiles, threads: ThreadPlan) -> PairRuntime:
        """The pair's runtime on this Llama's loaded weights: its own context is aligned model 1's.

        The other contexts are made on the same loaded weights (an adapter's reference is loaded once).
        """
        adapters = {files.aligned[0]: self._lora_adapter} if files.is_adapter[0] else {}
        loaded = {files.model_file(0): self._model}
        models = PairModels(files, self.model_params, self._stack, self.verbose, loaded=loaded, adapters=adapters)
        own_adapters = tuple((a, self.lora_scale) for a in adapters.values())
        own = Context("aligned model 1", self._ctx, self._n_vocab, self._batch, self.n_batch, own_adapters)
        runtime = PairRuntime.open(
            models, self.context_params, self.n_batch, threads, aligned_context=own, lora_scale=self.lora_scale
        )
        self._stack.callback(runtime.close)
        return runtime

    def _use_template(self, template: Optional[str]) -> None:
        """Format chats with ``template`` (Jinja text), with this model's BOS / EOS as llama-cpp-python does."""
        if template is None:
            return
        self._template = template
        self.chat_format = None
        self.chat_handler = jinja_formatter(template, self._model).to_chat_handler()

    @property
    def pair_files(self) -> PairFiles:
        """The pair's checked files: paths, which are adapters, the chat template and its notes."""
        return self._files

    @property
    def chat_template(self) -> Optional[str]:
        """The Jinja chat template that formats chats (None when a named ``chat_format`` or a handler does)."""
        if self._template is None and self.chat_format == "chat_template.default":  # llama-cpp-python's pick
            return self.metadata.get("tokenizer.chat_template")
        return self._template

    # ------------------------------------------- for fronts decoding apart

    @property
    def context_size(self) -> int:
        """The most tokens a prompt and its answer may hold here (n_ctx as llama-cpp-python keeps it)."""
        return self._n_ctx

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends the text (the vocabulary's end-of-generation tokens)."""
        return bool(llama_cpp.llama_vocab_is_eog(self._model.vocab, token))

    def prompt_tokens(self, prompt: str) -> List[int]:
        """The tokens ``create_completion(prompt)`` decodes (:func:`~dera_gguf.runtime.prompts.completion_tokens`)."""
        return completion_tokens(self, prompt)

    def chat_prompt(self, messages: list, stop: Sequence[str] = (), **context: Any) -> Tuple[List[int], List[str]]:
        """The prompt tokens and stop strings ``create_chat_completion(messages, stop=stop, **context)`` uses
        (``context``: tools and the like; :func:`~dera_gguf.runtime.prompts.chat_tokens`)."""
        return chat_tokens(self, messages, stop, **context)

    def sequences(self, n_seq: int, n_ctx: int, unified: bool = True) -> PairRuntime:
        """New contexts of the pair for ``n_seq`` sequences (``n_ctx`` KV cells in all), on this engine's
        loaded weights, context settings and threads (:meth:`PairRuntime.for_sequences`); the caller closes it."""
        return PairRuntime.for_sequences(
            self.runtime.models, self.context_params, n_ctx, n_seq, self.runtime.threads, unified
        )

    @property
    def state_owner(self) -> tuple:
        """``(fingerprint, name)`` of the pair's files, which a saved state must match."""
        return self._owner()

    @property
    def speculation_stats(self) -> Optional[spec.SpeculationStats]:
        """Drafted and accepted token counts so far (None without ``speculative``)."""
        return self.draft_model.stats if self.draft_model is not None else None

    # ------------------------------------------------------------ lam, mode

    @property
    def lam(self) -> Union[float, tuple]:
        """The default realignment strength (one float, or one per aligned model)."""
        return normalize_lam(self._calls.default.lams, len(self.runtime.files.aligned))

    @lam.setter
    def lam(self, value: Lam) -> None:
        default = self._calls.default
        self._calls.default = Realign(mixing_weights(value, len(self.runtime.files.aligned)), default.mode)

    @property
    def mode(self) -> str:
        """The default mode: ``"blend"`` (DeRa) or ``"weights"`` (adapters at scale lam)."""
        return self._calls.default.mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._calls.default = Realign(self._calls.default.weights, check_mode(value, self.runtime.files))

    @property
    def weights(self) -> np.ndarray:
        """Mixing weights on [reference, aligned_1, ...] in effect now."""
        return np.array(self._calls.realign().weights)

    # --------------------------------------------------------- public calls

    def create_completion(
        self, prompt: Union[str, List[int]], *args: Any, lam: Optional[Lam] = None, mode: Optional[str] = None, **kwargs
    ):
        """``llama_cpp.Llama.create_completion`` with ``lam=`` and ``mode=`` for this call."""
        call = self._calls.new(lam, mode)
        bound = checks.bind(Llama.create_completion, self, prompt, *args, **kwargs)
        self._check_call(bound)
        checks.check_prompt(prompt, self._n_vocab, self._n_ctx, self.tokenize)
        return self._calls.run(call, lambda: super(DeRaLlama, self).create_completion(prompt, *args, **kwargs))

    def __call__(self, prompt: str, *args: Any, lam: Optional[Lam] = None, mode: Optional[str] = None, **kwargs: Any):
        """``llama_cpp.Llama.__call__`` with ``lam=`` and ``mode=`` for this call."""
        bound = checks.bind(Llama.__call__, self, prompt, *args, **kwargs)
        bound.pop("self")
        return self.create_completion(lam=lam, mode=mode, **bound)

    def create_chat_completion(
        self, messages, *args: Any, lam: Optional[Lam] = None, mode: Optional[str] = None, **kwargs: Any
    ):
        """``llama_cpp.Llama.create_chat_completion`` with ``lam=`` and ``mode=`` for this call."""
        call = self._calls.new(lam, mode)
        bound = checks.bind(Llama.create_chat_completion, self, messages, *args, **kwargs)
        self._check_call(bound)
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise DeRaError("messages must be a list of {'role': ..., 'content': ...} dicts")
        return self._calls.run(call, lambda: super(DeRaLlama, self).create_chat_completion(messages, *args, **kwargs))

    def _check_call(self, bound: dict) -> None:
        """Sampling values and grammar, checked before anything reaches llama.cpp."""
        checks.check_sampling(bound, self._n_vocab, self._logits_all)
        if bound.get("grammar") is not None:
            checks.check_grammar(bound["grammar"], self._model.vocab)

    # ------------------------------------------------ llama-cpp-python seams

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> List[int]:
        """``Llama.tokenize``, refusing (DeRaError) text llama.cpp would abort the process on
        (:mod:`dera_gguf.runtime.bytefallback`). Every call of llama-cpp-python's that tokenizes comes here."""
        if self._fallback is not None and isinstance(text, bytes):
            self._fallback.check(text)
        return super().tokenize(text, add_bos, special)

    def generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any):
        """``Llama.generate``, always refreshing the last prompt row through :meth:`eval`.

        llama-cpp-python would sample an exactly cached prompt from the logits buffer as
        it stands, but a context that caught up since may have overwritten it, and lam
        may have changed; replaying one token costs one decode and is always exact.
        Runs in the public call that started it, else in a call of its own at the default
        lam and mode, in effect while each of its steps runs.
        """
        call = self._calls.open()
        if call is None or call.generating:
            call = Call(self._calls.realign())
        call.generating, call.every_row = True, False
        self._requires_eval = True
        if self.draft_model is not None:
            call.trail = self.draft_model.new_text()
        if self._logits_all and self._scored != call.realign:
            self.reset()  # the score rows of the cached prefix hold another blend: recompute them
        steps = super().generate(tokens, *args, **kwargs)
        sent = None
        try:
            while True:
                with self._calls.in_effect(call):
                    try:
                        token = steps.send(sent)
                    except StopIteration as end:
                        return end.value
                sent = yield token
        finally:
            call.generating = call.every_row = False
            steps.close()

    @contextlib.contextmanager
    def stopping(self, when: Callable[[], bool]):
        """Within it, every decode (each batch of a long prompt too) first asks ``when()``, and a true
        answer ends the call with :class:`~dera_gguf.errors.Stopped` before that decode (the engine
        stays consistent: the next call goes on normally). dera-serve stops a request whose client
        went away so. Scopes nest: leaving one restores the check of the scope around it."""
        outer, self._stop = self._stop, when
        try:
            yield self
        finally:
            self._stop = outer

    def _check_stop(self) -> None:
        if self._stop is not None and self._stop():
            raise Stopped("the call was stopped (DeRaLlama.stopping) before its next decode")

    def eval(self, tokens: Sequence[int]) -> None:
        """Decode ``tokens`` in lockstep and leave their blended logits for the sampler."""
        call = self._calls.open() or self._calls.lone()
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
        rows = n if call.every_row else 1
        if rows > self.n_batch:
            raise DeRaError(
                f"generate() is to sample {rows} rows of one decode (the tokens given to send() and a draft), "
                f"more than a batch holds (n_batch {self.n_batch}): send fewer tokens at a time"
            )
        scores = self.scores[start : start + n] if self._logits_all else None
        call.target = self.runtime.eval(self.input_ids[:start], tokens, call.realign, scores, rows, self._check_stop)
        self.input_ids[start : start + n] = tokens
        self.n_tokens += n
        self._requires_eval = False
        call.every_row = call.generating
        self._scored = call.realign

    def sample(self, *args: Any, **kwargs: Any) -> int:
        """``Llama.sample``, run on the context whose logits buffer holds the blend.

        llama-cpp-python's own ``sample`` runs its sampler chain on ``self._ctx`` (aligned model 1's
        context), but the blend lies in the first active context's buffer (the reference's at lam 0,
        say): the call in effect names it (:attr:`~dera_gguf.runtime.calls.Call.target`; aligned model 1's
        before any decode). This is that method's body with the context named instead of changing
        ``self._ctx``: the chain in use (``generate()``'s), else one made from these arguments (its
        defaults for those not given) for this draw, sampling row ``idx`` (None: the last).
        """
        bound = _SAMPLE.bind(self, *args, **kwargs)
        bound.apply_defaults()
        settings = {name: value for name, value in bound.arguments.items() if name not in ("self", "idx")}
        idx = bound.arguments["idx"]
        assert self.n_tokens > 0
        chain = self._sampler if self._sampler is not None else self._init_sampler(**settings)
        call = self._calls.current
        context = call.target.ctx if call is not None and call.target is not None else self._ctx
        return chain.sample(context, -1 if idx is None else idx - self.n_tokens)

    def close(self) -> None:
        if hasattr(self, "_stack"):  # __init__ may have refused its arguments before Llama set up
            super().close()

    # -------------------------------------------------------------- states

    def save_state(self) -> PairState:
        """The state of every context (llama.cpp's KV cells and positions of each), the tokens, and the
        scores where ``logits_all`` keeps them: ``load_state`` (in this or another process, an engine
        on the same files) goes on exactly from here. No KV cache depends on lam: it serves every lam.

        llama-cpp-python's prompt caches (:meth:`set_cache`) hold these states.
        """
        n = self.n_tokens
        scores = self.scores[:n].copy() if self._logits_all else np.zeros((0, self._n_vocab), dtype=np.single)
        state = PairState(self.input_ids[:n].copy(), scores, n, self._seed, self.runtime.save(), *self._owner())
        state.scored = self._scored if self._logits_all else None
        return state

    def load_state(self, state: PairState) -> None:
        """Restore a state from :meth:`save_state` into every context; a state of another pair (or
        one that does not fit ``n_ctx``) is refused with a DeRaError and changes nothing."""
        if not isinstance(state, PairState):
            raise DeRaError(
                f"DeRaLlama.load_state takes a state from DeRaLlama.save_state, got {type(state).__name__} "
                "(a plain llama_cpp.Llama's state holds one model's context)"
            )
        state.check_owner(*self._owner(), self._n_ctx)
        self.runtime.restore(state.sequences)
        n = state.n_tokens
        self.input_ids[:n] = state.input_ids[:n]
        self.n_tokens = n
        if self._logits_all and len(state.scores) == n:
            self.scores[:n] = state.scores
            self._scored = getattr(state, "scored", None)
        else:
            self._scored = None  # no rows kept: the next generate() recomputes them
        self._seed = state.seed
        self._requires_eval = True

    def _owner(self) -> tuple:
        """``(fingerprint, name)`` of this pair's files, which a state must match (computed once)."""
        if self._owner_cache is None:
            files = self._files
            self._owner_cache = pair_owner(files.reference, files.aligned, files.is_adapter)
        return self._owner_cache

    def __getstate__(self):
        return {**self._setup._asdict(), "lam": self.lam, "mode": self.mode}

    def __setstate__(self, state):
        state = dict(state)
        self.__init__(**state.pop("llama_kwargs"), **state)
