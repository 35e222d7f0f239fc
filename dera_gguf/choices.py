"""Several answers to one prompt, decoded together, each at its own realignment with its own sampler.

The prompt is evaluated once per model and shared by every answer's sequence
(:mod:`dera_gguf.sequences`); each step is then one llama.cpp batch per model holding
one token per live answer. Each answer blends its rows at its own mixing weights and
draws from its own seeded llama.cpp chain (:mod:`dera_gguf.samplers`), so an answer
does not depend on the others beside it, up to llama.cpp's batch-shape rounding.
dera-serve's ``n`` and ``lam`` lists run on this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from llama_cpp import _internals as internals

from .blend import blend_logits, log_softmax
from .engine import PairRuntime
from .errors import ContextFullError, DeRaError
from .models import PairModels
from .samplers import RowSampler
from .sequences import Run, batch_of, models_of, prefill, rows_by_seq
from .threads import ThreadPlan

MAX_SEQ = 256  # LLAMA_MAX_SEQ in llama.cpp


@dataclass
class Choice:
    """One answer being generated: its mixing weights on [reference, aligned_1, ...], its chain, its tokens.

    ``finish`` is ``"stop"`` (end of text, or a stop string its caller found), ``"length"``
    (``max_tokens`` reached) or None while it runs; a caller may set it between steps.
    ``bias``: ``{token: added logit}``, added to the blended row before the chain samples it
    (llama-cpp-python's ``logit_bias``, which it also applies first). ``logprobs``: how many of
    the most likely tokens to keep with each token drawn (0: its own log-prob only; None: none),
    kept in ``scored``: the log-softmax of the blend before bias and sampler, as llama-cpp-python's.
    """

    weights: np.ndarray
    chain: internals.LlamaSampler
    bias: Optional[dict] = None
    tokens: List[int] = field(default_factory=list)
    finish: Optional[str] = None
    logprobs: Optional[int] = None
    scored: List["Scored"] = field(default_factory=list)


class Scored(NamedTuple):
    """One token's log-prob under the blend and the ``k`` most likely tokens' ``(id, log-prob)``."""

    logprob: float
    top: List[Tuple[int, float]]


def choice_runtime(
    models: PairModels,
    context_params,
    n_ctx: int,
    n_batch: int,
    n_seq: int,
    threads: ThreadPlan,
    unified: bool = True,
) -> PairRuntime:
    """New contexts of the pair for ``n_seq`` sequences on a KV cache of ``n_ctx`` cells in all.

    ``unified``: one cache that the sequences share (a prompt's cells shared by copying);
    else one cache of ``n_ctx / n_seq`` cells per sequence, each laid out as in a context of
    its own, so that a sequence's numbers do not depend on where the others' cells lie.
    ``context_params`` (a ``llama_context_params``, copied) and ``threads`` are those of the
    pair's one-sequence engine, so a prompt decodes in the same batch shapes as there.
    """
    if not 1 <= n_seq <= MAX_SEQ:
        raise DeRaError(f"{n_seq} parallel sequences: llama.cpp allows 1 to {MAX_SEQ}")
    params = type(context_params).from_buffer_copy(context_params)
    params.n_ctx, params.n_seq_max, params.kv_unified = n_ctx, n_seq, unified
    params.n_batch = max(params.n_batch, n_seq)
    params.n_ubatch = max(params.n_ubatch, n_seq)
    members = range(len(models.files.aligned) + 1)
    contexts = [models.context(m, params, params.n_batch, n_seq) for m in members]
    plan = ThreadPlan(threads.n_threads, threads.n_threads_batch, threads.concurrent)
    return PairRuntime(models, contexts, params.n_batch, plan, owned=contexts)


def room(runtime: PairRuntime) -> int:
    """KV cells the runtime's contexts hold (llama.cpp may round n_ctx up)."""
    return int(runtime.contexts[0].ctx.n_ctx())


def decode_choices(
    runtime: PairRuntime,
    prompt: Sequence[int],
    choices: Sequence[Choice],
    max_tokens: int,
    is_eog: Callable[[int], bool],
    before_decode: Callable[[], None] = lambda: None,
) -> Iterator[List[int]]:
    """Generate every choice in lockstep; after each step, yield the indices of the choices that moved
    (a token appended, or finished). Choice i is sequence i of the runtime's contexts.

    ``before_decode()`` runs before the prompt and before each step's batch (it may raise to stop).
    A choice whose caller set its ``finish`` between steps leaves the batch.
    """
    if len(prompt) + len(choices) * max_tokens > room(runtime):
        raise ContextFullError(
            f"{len(choices)} answers of up to {max_tokens} tokens after a prompt of {len(prompt)} need "
            f"{len(prompt) + len(choices) * max_tokens} KV cells; the pair's several-answer contexts hold "
            f"{room(runtime)}: ask for fewer tokens or answers"
        )
    sampler = RowSampler(runtime.n_vocab)
    models = [models_of(c.weights) for c in choices]  # a model weighted 0 in a choice never decodes it
    before_decode()
    first = prefill(runtime, prompt, len(choices), sorted(set().union(*models)))
    rows = {i: {m: first[m] for m in models[i]} for i in range(len(choices))}
    live = list(range(len(choices)))
    while live:
        for i in live:
            row = blend_logits(list(rows[i].values()), [choices[i].weights[m] for m in rows[i]])
            scores = logprobs_of(choices[i], row)
            if choices[i].bias:
                add_bias(row, choices[i].bias)
            emit(choices[i], sampler.sample(choices[i].chain, row), max_tokens, is_eog, scores)
        yield list(live)
        live = [i for i in live if choices[i].finish is None]
        if live:
            before_decode()
            next_runs = {i: Run(i, len(prompt) + len(choices[i].tokens) - 1, [choices[i].tokens[-1]]) for i in live}
            step = [[next_runs[i] for i in live if m in models[i]] for m in range(len(runtime.contexts))]
            rows = rows_by_seq(step, runtime.decode_each([batch_of(runs) for runs in step]))


def add_bias(row: np.ndarray, bias: dict) -> None:
    ids = np.fromiter(bias, dtype=np.intp, count=len(bias))
    row[ids] = row[ids] + np.fromiter(bias.values(), dtype=np.float64, count=len(bias))


def logprobs_of(choice: Choice, row: np.ndarray) -> Optional[np.ndarray]:
    """The log-probs of a blended row when the choice keeps them (taken before any bias is added)."""
    return log_softmax(row) if choice.logprobs is not None else None


def emit(
    choice: Choice, token: int, max_tokens: int, is_eog: Callable[[int], bool], scores: Optional[np.ndarray] = None
) -> None:
    """Append a drawn token (an end-of-text token ends the choice instead), with its log-probs if kept."""
    if is_eog(token):
        choice.finish = "stop"
        return
    choice.tokens.append(token)
    if scores is not None:
        top = np.argsort(-scores, kind="stable")[: choice.logprobs]
        choice.scored.append(Scored(float(scores[token]), [(int(t), float(scores[t])) for t in top]))
    if len(choice.tokens) >= max_tokens:
        choice.finish = "length"
