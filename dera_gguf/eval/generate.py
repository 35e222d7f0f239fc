"""dera-eval generate: sample responses at every λ, with length, KL to the reference and reward.

All (λ, sample) sequences of one prompt decode together: the prompt is evaluated once
per model and shared through the KV cache, then each step is one llama.cpp batch per
model holding one token per live sequence. Each sequence blends its rows at its own
λ and draws from its own seeded llama.cpp sampler chain. With ``speculative="lookup"`` a
sequence's entry also holds what prompt lookup drafts for it, verified row by row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from ..blend import blend_logits, kl_divergence, mixing_weights
from ..engine import Realign, check_mode
from ..errors import DeRaError
from ..sampling import Sampling
from ..speculative import EMPTY, Gate, NgramIndex
from .batch import ParallelSequences, Run
from .chains import RowSampler, check_sweep_sampling, new_chain, recorded, sequence_seed
from .data import Dataset, Row, RowProblem, read_rows
from .executors import row_executor
from .models import EvalPair, PairSpec
from .rewards import LengthReward, describe_reward, reward_of
from .runner import Progress, SweepResult, run_sweep
from .summary import GENERATE_METRICS
from .tasks import RowWork

SAMPLES_FILE = "samples.jsonl"


class _Sequence:
    """One response being generated: its λ, sample index, chain and what it produced."""

    def __init__(self, lam: float, sample: int, seed: int, params: Sampling):
        self.lam, self.sample, self.seed = lam, sample, seed
        self.weights = mixing_weights(lam)
        self.chain = new_chain(params, seed)
        self.tokens: List[int] = []
        self.kl: List[float] = []
        self.finish: Optional[str] = None
        self.gate = Gate()  # how much to draft next (speculation only)
        self.lookup: Optional[NgramIndex] = None  # prompt lookup over its prompt and tokens (speculation only)
        self.drafted = self.accepted = 0


def decode_batch(
    pair: EvalPair,
    decoder: ParallelSequences,
    prompt: Sequence[int],
    jobs: List[_Sequence],
    max_tokens: int,
    lookup: Optional[NgramIndex] = None,
) -> None:
    """Generate every job's response in lockstep (one batch per model and step).

    With ``lookup`` (the prompt's index), each sequence's batch entry is its last token and the
    tokens prompt lookup drafts after it; its chain samples row after row while it picks the
    drafted token (one draw per emitted token, as without drafts), and the caches drop the
    drafted tokens it did not pick, so sequences move on at positions of their own.
    """
    sampler = RowSampler(pair.n_vocab)
    for job in jobs:
        job.lookup = lookup.fork() if lookup is not None else None
    first = decoder.prefill(prompt, len(jobs))
    rows = np.repeat(first[:, None, :], len(jobs), axis=1)  # (n_models, n_rows, n_vocab)
    runs = [(i, EMPTY) for i in range(len(jobs))]  # (job, its draft): 1 + len(draft) rows each, in order
    while runs:
        weights = np.concatenate([np.repeat(jobs[i].weights[:, None], 1 + len(d), axis=1) for i, d in runs], axis=1)
        blended = blend_logits([rows[0], rows[1]], weights)  # every row at its own sequence's lam
        kls = kl_divergence(blended, rows[0])
        at = 0
        for i, draft in runs:
            job, n, before = jobs[i], 1 + len(draft), len(jobs[i].tokens)
            passed = _emit(pair, job, sampler, blended[at : at + n], kls[at : at + n], draft, max_tokens)
            at += n
            if job.lookup is not None:
                job.lookup.extend(job.tokens[before:])
            if len(draft):
                job.gate.record(len(prompt) + len(job.tokens), len(draft), passed)
                job.drafted, job.accepted = job.drafted + len(draft), job.accepted + passed
                if passed < len(draft) and job.finish is None:
                    decoder.drop_from(i, len(prompt) + len(job.tokens) - 1)
        live = [i for i, _ in runs if jobs[i].finish is None]
        runs = _drafts(jobs, live, len(prompt), decoder.n_batch - len(live), max_tokens)
        if runs:
            rows = decoder.advance(
                [Run(i, len(prompt) + len(jobs[i].tokens) - 1, [jobs[i].tokens[-1], *draft]) for i, draft in runs]
            )


def _emit(pair, job: _Sequence, sampler: RowSampler, rows, kls, draft: np.ndarray, max_tokens: int) -> int:
    """Sample the job's next tokens: from the row after its last token, then from the row after each
    drafted token its chain picked. Returns how many drafted tokens were picked."""
    for j, row in enumerate(rows):
        token = sampler.sample(job.chain, row)
        job.kl.append(float(kls[j]))
        if pair.is_eog(token):
            job.finish = "stop"
        else:
            job.tokens.append(token)
            if len(job.tokens) >= max_tokens:
                job.finish = "length"
        picked = j < len(draft) and token == draft[j]
        if job.finish is not None or not picked:
            return j + int(picked)
    return len(draft)


def _drafts(jobs, live: List[int], n_prompt: int, room: int, max_tokens: int) -> List[tuple]:
    """(job, draft) for every live job: drafts as long as each gate allows, within ``room`` batch
    entries in all and never past the job's last row (``max_tokens``)."""
    runs = []
    for i in live:
        job, draft = jobs[i], EMPTY
        if job.lookup is not None:
            n = min(job.gate.allows(n_prompt + len(job.tokens)), max_tokens - len(job.tokens) - 1, room)
            draft = job.lookup(n) if n > 0 else EMPTY
            room -= len(draft)
        runs.append((i, draft))
    return runs


def generate_row(
    pair: EvalPair,
    decoder: ParallelSequences,
    row: Row,
    lams: Sequence[float],
    samples: int,
    params: Sampling,
    seed: int,
    reward,
    mode: str = "blend",
    speculative: Optional[str] = None,
) -> List[Dict[str, Any]]:
    """One record per (λ, sample) of this prompt.

    Blend mode decodes every (λ, sample) together; weight-space mode one batch per λ (the
    adapter's scale is per context), each sampled from the adapted model alone. With
    ``speculative="lookup"`` the records also count the drafted tokens and those that passed.
    """
    prompt_text = pair.prompt_text(row.prompt, row.messages)
    prompt = pair.tokenize(prompt_text)
    if not prompt:
        raise RowProblem("the prompt has no tokens (and the model adds no BOS): nothing to condition on")
    if len(prompt) + params.max_tokens > pair.n_ctx:
        raise RowProblem(
            f"the prompt is {len(prompt)} tokens: with max {params.max_tokens} new tokens it needs "
            f"more than n_ctx {pair.n_ctx}; raise --n-ctx or lower --max-tokens"
        )
    # matches of 2 tokens or more: in a batch of many sequences a drafted token that fails costs a
    # batch entry, and one-token matches fail most often
    lookup = NgramIndex(prompt, min_ngram=2) if speculative == "lookup" else None
    jobs = [
        _Sequence(float(lam), s, sequence_seed(seed, row.id, float(lam), s), params)
        for lam in lams
        for s in range(samples)
    ]
    if mode == "blend":
        decode_batch(pair, decoder, prompt, jobs, params.max_tokens, lookup)
    else:
        for lam in lams:
            weights = np.array(decoder.runtime.prepare(Realign(mixing_weights(lam), "weights")))
            group = [job for job in jobs if job.lam == float(lam)]
            for job in group:
                job.weights = weights
            decode_batch(pair, decoder, prompt, group, params.max_tokens, lookup)
    records = []
    for job in jobs:
        response = pair.detokenize(job.tokens)
        where = f"line {row.line} (lam {job.lam})"
        records.append(
            {
                "row": row.id,
                "line": row.line,
                "lam": job.lam,
                "sample": job.sample,
                "seed": job.seed,
                "prompt": prompt_text,
                "response": response,
                "tokens": job.tokens,
                "length_tokens": len(job.tokens),
                "finish_reason": job.finish,
                "kl_sum": float(np.sum(job.kl)),
                "kl_mean": float(np.mean(job.kl)),
                "reward": reward_of(reward, prompt_text, response, len(job.tokens), where),
                **({"drafted": job.drafted, "accepted": job.accepted} if lookup else {}),
            }
        )
    return records


@dataclass(frozen=True)
class GenerateTask:
    """What a process needs to generate rows on its own pair (sent to Ray workers)."""

    n_lams: int
    samples: int
    params: Sampling
    seed: int
    reward: Any
    mode: str = "blend"
    speculative: Optional[str] = None

    def open(self, pair: EvalPair) -> RowWork:
        """``work(row, lams) -> records`` on ``pair``, decoding up to every λ of the sweep at once."""
        n_seq = self.n_lams * self.samples
        decoder = ParallelSequences(pair, n_seq=n_seq, n_extra=(n_seq - 1) * self.params.max_tokens)

        def work(row, todo):
            return generate_row(
                pair, decoder, row, todo, self.samples, self.params, self.seed, self.reward, self.mode, self.speculative
            )

        return RowWork(work, decoder.close)

    def user_code(self) -> tuple:
        """The reward: a function from the user's own module, which Ray workers may need sent by value."""
        return (self.reward,)


def generate(
    pair: Union[EvalPair, PairSpec],
    data,
    lams: Sequence[float],
    out_dir: Optional[str] = None,
    params: Sampling = Sampling(),
    seed: int = 0,
    reward=LengthReward(),
    samples: int = 1,
    limit: Optional[int] = None,
    progress: Optional[Progress] = None,
    mode: str = "blend",
    ray=None,
    workers: Optional[int] = None,
    log: Optional[Callable[[str], None]] = None,
    speculative: Optional[str] = None,
) -> SweepResult:
    """Sample ``samples`` responses per prompt and λ; summarize length, reward and KL per λ.

    Args:
        pair: the models: an open :class:`EvalPair`, or a :class:`PairSpec` (loaded here, or by
            each Ray worker).
        data: a prompts.jsonl path or a :class:`Dataset` from :func:`read_rows`.
        out_dir: where samples.jsonl, summary.json/csv and sweep.png go (None: in memory);
            an earlier run there with the same settings is resumed.
        params: sampling settings (default: the paper's; no repeat penalty, no seed of their own).
        seed: every (row, λ, sample) draws from its own chain seeded from this.
        reward: :class:`LengthReward` (eq. 10) or a callable ``f(prompt, response) -> float``
            (with Ray, it is pickled to the workers).
        progress: called as ``progress(label, rows_done, rows_total)`` (the CLI draws a bar).
        mode: ``"blend"`` (DeRa) or ``"weights"`` (a LoRA pair's adapter at scale λ: the paper's
            weight-space approximation; one batch per λ).
        ray, workers, log: shard rows over Ray workers, as in :func:`~dera_gguf.eval.score`.
        speculative: ``"lookup"``: every sequence also decodes what prompt lookup drafts after its
            last token, and its chain samples those rows while it picks the drafted tokens: the
            samples are the same (up to llama.cpp's batch-shape rounding), in fewer steps where
            responses copy their prompt. Drafts are sized by how many of a sequence's last draft
            passed, not by timing, so a run repeats itself exactly.
    """
    if speculative not in (None, "lookup"):
        raise DeRaError(f"speculative must be None or 'lookup' for generate (drafts per sequence), got {speculative!r}")
    files = pair.files
    check_mode(mode, files)
    check_sweep_sampling(params)
    if not isinstance(data, Dataset):
        data = read_rows(data, "generate", limit)
    if samples < 1:
        raise DeRaError(f"samples must be at least 1, got {samples}")
    settings = {
        "command": "generate",
        "reference": os.path.abspath(files.reference),
        "aligned": os.path.abspath(files.aligned[0]),
        "sampling": recorded(params),
        "seed": seed,
        "samples": samples,
        "reward": describe_reward(reward),
        **({"mode": mode} if mode != "blend" else {}),  # (runs from before modes existed resume as blend)
    }
    task = GenerateTask(len(lams), samples, params, seed, reward, mode, speculative)
    with row_executor(pair, task, ray, workers, log) as execute:
        return run_sweep(
            data,
            [float(x) for x in lams],
            per_lam=samples,
            metrics=GENERATE_METRICS,
            results_name=SAMPLES_FILE,
            out_dir=out_dir,
            settings=settings,
            progress=progress,
            label="generating",
            execute=execute,
        )
