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
from typing import Any, Callable, Dict, Iterator, List, Optional, Union
from typing import Sequence as Tokens

import numpy as np

from ..batch.sequence import LookupDrafts, Sequence
from ..batch.together import continue_in_slots, decode_together
from ..blend import mixing_weights
from ..errors import DeRaError
from ..runtime.pair import Realign, check_mode
from ..sampling.settings import Sampling
from ..speculation.verify import NgramIndex
from .batch import ParallelSequences
from .chains import check_sweep_sampling, new_chain, recorded, sequence_seed
from .data import Dataset, Row, RowProblem, read_rows
from .executors import row_executor
from .judges import Judge, Judging
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
    """One record per (λ, sample) of this prompt (of this conversation, for a row of ``turns``).

    Blend mode decodes every (λ, sample) together; weight-space mode one batch per λ (the
    adapter's scale is per context), each sampled from the adapted model alone. With
    ``speculative="lookup"`` the records also count the drafted tokens and those that passed.
    """
    if row.turns is not None:
        return Conversation(pair, decoder, row, params, speculative).records(lams, samples, seed, reward, mode)
    prompt_text = pair.prompt_text(row.prompt, row.messages)
    prompt = checked_prompt(pair, prompt_text, params)
    # matches of 2 tokens or more: in a batch of many sequences a drafted token that fails costs a
    # batch entry, and one-token matches fail most often
    lookup = NgramIndex(prompt, min_ngram=2) if speculative == "lookup" else None
    jobs = [
        new_sample(lam, s, sequence_seed(seed, row.id, float(lam), s), params) for lam in lams for s in range(samples)
    ]
    for group in realigned_groups(decoder, jobs, mode):
        decode_batch(pair, decoder, prompt, group, params.max_tokens, lookup)
    records = []
    for job in jobs:
        response = pair.detokenize(job.tokens)
        where = f"line {row.line} (lam {job.lam})"
        records.append(
            {
                **record_head(row, job),
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


def checked_prompt(pair: EvalPair, prompt_text: str, params: Sampling) -> List[int]:
    """The prompt's tokens, refused (a :class:`RowProblem`) when empty or too long for n_ctx with its answer."""
    prompt = pair.tokenize(prompt_text)
    if not prompt:
        raise RowProblem("the prompt has no tokens (and the model adds no BOS): nothing to condition on")
    if len(prompt) + params.max_tokens > pair.n_ctx:
        raise RowProblem(
            f"the prompt is {len(prompt)} tokens: with max {params.max_tokens} new tokens it needs "
            f"more than n_ctx {pair.n_ctx}; raise --n-ctx or lower --max-tokens"
        )
    return prompt


def record_head(row: Row, job: Sample) -> Dict[str, Any]:
    """The fields that identify a record: row, line, λ, sample, seed (and the row's category, if any)."""
    head = {"row": row.id, "line": row.line, "lam": job.lam, "sample": job.sample, "seed": job.seed}
    return {**head, "category": row.category} if row.category is not None else head


def realigned_groups(decoder: ParallelSequences, jobs: List[Sample], mode: str) -> Iterator[List[Sample]]:
    """The jobs in the groups that decode together, the contexts set up for each: all of them in blend
    mode; one λ at a time in weight-space mode (its adapter scale, the aligned context's weights)."""
    if mode == "blend":
        yield jobs
        return
    for lam in dict.fromkeys(job.lam for job in jobs):
        weights = np.array(decoder.runtime.prepare(Realign(mixing_weights(lam), "weights")))
        group = [job for job in jobs if job.lam == lam]
        for job in group:
            job.weights = weights
        yield group


class Conversation:
    """A row of ``turns`` answered turn after turn at every (λ, sample), each in one conversation of its own.

    The first turn is one prompt shared by every sequence (:func:`decode_batch`); then each sequence's
    next prompt is the chat template over its own history and the next user message, continued in the
    slot that holds that history (:func:`~dera_gguf.batch.together.continue_in_slots`), which keeps the
    longest prefix of the new prompt it holds: what the template wrote of the earlier turns, as the
    sequence decoded them.
    """

    def __init__(
        self, pair: EvalPair, decoder: ParallelSequences, row: Row, params: Sampling, speculative: Optional[str]
    ):
        self.pair, self.decoder, self.row, self.params = pair, decoder, row, params
        self.speculative = speculative

    def records(self, lams: Tokens[float], samples: int, seed: int, reward, mode: str) -> List[Dict[str, Any]]:
        firsts = [
            new_sample(lam, s, sequence_seed(seed, self.row.id, float(lam), s), self.params)
            for lam in lams
            for s in range(samples)
        ]
        turns: Dict[int, List[Sample]] = {id(job): [] for job in firsts}  # each conversation's answers
        for group in realigned_groups(self.decoder, firsts, mode):
            self._answer(group, turns, seed)
        return [self._record(job, turns[id(job)], reward, mode) for job in firsts]

    def _answer(self, group: List[Sample], turns: Dict[int, List[Sample]], seed: int) -> None:
        """Every turn of the group's conversations, the first shared, the next ones in their own slots."""
        first = self._messages([], 0)
        prompt = checked_prompt(self.pair, self.pair.render_chat(first), self.params)
        lookup = NgramIndex(prompt, min_ngram=2) if self.speculative == "lookup" else None
        decode_batch(self.pair, self.decoder, prompt, group, self.params.max_tokens, lookup)
        for job in group:
            turns[id(job)].append(job)
        for t in range(1, len(self.row.turns)):
            nexts = []
            for job in group:
                text = self.pair.render_chat(self._messages(turns[id(job)], t))
                seq = new_sample(
                    job.lam, job.sample, sequence_seed(seed, f"{self.row.id}#{t}", job.lam, job.sample), self.params
                )
                seq.weights, seq.prompt, seq.slot = job.weights, checked_prompt(self.pair, text, self.params), job.slot
                if self.speculative == "lookup":
                    seq.drafts = LookupDrafts(NgramIndex(seq.prompt, min_ngram=2))
                turns[id(job)].append(seq)
                nexts.append(seq)
            for _ in continue_in_slots(self.decoder.runtime, nexts, self.pair.is_eog):
                pass

    def _messages(self, answered: List[Sample], t: int) -> List[Dict[str, str]]:
        """The chat up to user turn ``t``: the earlier turns with this conversation's answers."""
        messages = []
        for user, answer in zip(self.row.turns[:t], answered):
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": self._text(answer)}]
        return messages + [{"role": "user", "content": self.row.turns[t]}]

    def _text(self, answer: Sample) -> str:
        return self.pair.detokenize(answer.tokens)

    def _record(self, job: Sample, answers: List[Sample], reward, mode: str) -> Dict[str, Any]:
        """The conversation's record: each turn's answer, tokens, finish and reused prompt; length and KL over
        all answers; the reward of the last answer (after the whole conversation as its prompt)."""
        responses = [self._text(a) for a in answers]
        kl = [k for a in answers for k in a.kl]
        last_prompt = self.pair.render_chat(self._messages(answers[:-1], len(answers) - 1))
        where = f"line {self.row.line} (lam {job.lam}, turn {len(answers)})"
        record = {
            **record_head(self.row, job),
            "prompt": last_prompt,
            "response": responses[-1],
            "tokens": answers[-1].tokens,
            "length_tokens": sum(len(a.tokens) for a in answers),
            "finish_reason": answers[-1].finish,
            "kl_sum": float(np.sum(kl)),
            "kl_mean": float(np.mean(kl)),
            "reward": reward_of(reward, last_prompt, responses[-1], len(answers[-1].tokens), where),
            "turns": list(self.row.turns),
            "responses": responses,
            "turn_tokens": [a.tokens for a in answers],
            "finish_reasons": [a.finish for a in answers],
            "reused_tokens": [a.reused for a in answers],
        }
        if self.speculative == "lookup":
            record["drafted"] = sum(a.drafted for a in answers)
            record["accepted"] = sum(a.accepted for a in answers)
        return record


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
    conversations: bool = False  # rows of several turns: each sequence may come to hold n_ctx tokens of its own

    def open(self, pair: EvalPair) -> RowWork:
        """``work(row, lams) -> records`` on ``pair``, decoding up to every λ of the sweep at once.

        The KV cache holds one prompt and every sequence's answer; with conversations, every
        sequence's whole conversation (n_ctx cells each: size --n-ctx to the longest one)."""
        n_seq = self.n_lams * self.samples
        own = pair.n_ctx if self.conversations else self.params.max_tokens
        decoder = ParallelSequences(pair, n_seq=n_seq, n_extra=(n_seq - 1) * own)

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
    judge: Optional[Judge] = None,
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
        judge: a :class:`~dera_gguf.eval.judges.Judge` that grades every answer, or compares it with the
            answer at its baseline λ (added to ``lams`` if missing), while the sweep runs; its replies
            go to judgments.jsonl, its outcomes into the summary (``mean_rating`` or
            ``win_rate_vs_<λ>`` / ``tie_rate_vs_<λ>`` / ``loss_rate_vs_<λ>``, and the counts ``judged``
            and ``judge_failed``).
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
    lams = [float(x) for x in lams]
    if judge is not None and any(b not in lams for b in judge.baselines):  # (in order, if the sweep's lams are)
        ordered = lams == sorted(lams)
        lams += [b for b in judge.baselines if b not in lams]
        lams = sorted(lams) if ordered else lams
    conversations = any(row.turns is not None and len(row.turns) > 1 for row in data.rows)
    task = GenerateTask(len(lams), samples, params, seed, reward, mode, speculative, conversations)
    judging = Judging(judge, data.rows, out_dir) if judge is not None else None
    with row_executor(pair, task, ray, workers, log) as execute:
        return run_sweep(
            data,
            lams,
            per_lam=samples,
            metrics=GENERATE_METRICS,
            results_name=SAMPLES_FILE,
            out_dir=out_dir,
            settings=settings,
            progress=progress,
            label="generating",
            execute=execute,
            judging=judging,
        )
