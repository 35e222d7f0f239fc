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
from typing import Any, Callable, Dict, List, Optional, Union
from typing import Sequence as Tokens

import numpy as np

from ..batch.sequence import LookupDrafts, Sequence
from ..batch.together import decode_together
from ..blend import mixing_weights
from ..errors import DeRaError
from ..runtime.pair import Realign, check_mode
from ..sampling.settings import Sampling
from ..speculation.verify import NgramIndex
from .batch import ParallelSequences
from .chains import check_sweep_sampling, new_chain, recorded, sequence_seed
from .data import Dataset, Row, RowProblem, read_rows
from .executors import row_executor
from .models import EvalPair, PairSpec
from .rewards import LengthReward, describe_reward, reward_of
from .runner import Progress, SweepResult, run_sweep
from .summary import GENERATE_METRICS
from .tasks import RowWork

SAMPLES_FILE = "samples.jsonl"


@dataclass(eq=False)
class Sample(Sequence):
    """One (λ, sample) of a sweep's row: the generator's record of it, with its KL to the reference kept."""

    lam: float = 1.0
    sample: int = 0
    seed: int = 0

    @property
    def drafted(self) -> int:
        return self.drafts.drafted if self.drafts is not None else 0

    @property
    def accepted(self) -> int:
        return self.drafts.accepted if self.drafts is not None else 0


def new_sample(lam: float, sample: int, seed: int, params: Sampling) -> Sample:
    """The sequence of sample ``sample`` at ``lam``, drawn by a chain seeded with ``seed``."""
    lam = float(lam)
    return Sample(
        mixing_weights(lam), new_chain(params, seed), params.max_tokens, kl=[], lam=lam, sample=sample, seed=seed
    )


def decode_batch(
    pair: EvalPair,
    decoder: ParallelSequences,
    prompt: Tokens[int],
    jobs: List[Sample],
    max_tokens: int,
    lookup: Optional[NgramIndex] = None,
) -> None:
    """Generate every job's response on ``prompt``, all in one batch per model and step
    (:func:`~dera_gguf.batch.together.decode_together`).

    With ``lookup`` (the prompt's index), each sequence also decodes what prompt lookup drafts after
    its last token; its chain samples row after row while it picks the drafted token (one draw per
    emitted token, as without drafts), and the caches drop the drafted tokens it did not pick, so
    sequences move on at positions of their own.
    """
    for job in jobs:
        job.max_tokens = max_tokens
        job.drafts = LookupDrafts(lookup) if lookup is not None else None
    for _ in decode_together(decoder.runtime, prompt, jobs, pair.is_eog):
        pass


def generate_row(
    pair: EvalPair,
    decoder: ParallelSequences,
    row: Row,
    lams: Tokens[float],
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
        new_sample(lam, s, sequence_seed(seed, row.id, float(lam), s), params) for lam in lams for s in range(samples)
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
    lams: Tokens[float],
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
