"""dera-eval score: pairwise accuracy (paper eq. 14) and log-probs on preference data.

For each row the prompt + chosen and prompt + rejected texts pass once through each
model, with logits kept for every response position; every λ is then a blend of
those logits in numpy (:func:`dera_gguf.blend.sweep_stats`), so a λ sweep costs little more than one λ.
Response tokens are the tokens of prompt + response after the prompt's own tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from ..blend import mixing_weights, sweep_stats
from ..runtime.pair import Realign, check_mode
from .batch import ParallelSequences
from .data import Dataset, Row, RowProblem, read_rows
from .executors import row_executor
from .models import EvalPair, PairSpec
from .runner import Progress, SweepResult, run_sweep
from .summary import SCORE_METRICS
from .tasks import RowWork

RESULTS_FILE = "results.jsonl"


def response_tokens(pair: EvalPair, prompt_text: str, response: str) -> tuple[np.ndarray, int]:
    """``(tokens of prompt + response, number of prompt tokens)``; RowProblem if unusable."""
    n_prompt = len(pair.tokenize(prompt_text))
    tokens = np.asarray(pair.tokenize(prompt_text + response), dtype=np.intc)
    if n_prompt == 0:
        raise RowProblem("the prompt has no tokens (and the model adds no BOS): nothing to condition on")
    if len(tokens) <= n_prompt:
        raise RowProblem("the response adds no tokens after the prompt's")
    if len(tokens) > pair.n_ctx:
        raise RowProblem(
            f"prompt + response is {len(tokens)} tokens, more than n_ctx {pair.n_ctx}: raise --n-ctx or shorten the row"
        )
    return tokens, n_prompt


def response_stats(
    decoder: ParallelSequences, tokens: np.ndarray, n_prompt: int, lams: Sequence[float], mode: str = "blend"
) -> tuple[np.ndarray, np.ndarray]:
    """Mean per-token log-prob and mean per-token KL to the reference of the response, per λ.

    Blend mode: one forward pass of each model serves every λ. Weight-space mode: one pass of
    the adapted model per λ (its weights change with λ), whose logits are the distribution.
    """
    if mode == "blend":
        h_ref, h_aligned = decoder.rows_after(tokens, n_prompt - 1)
        logp, kl = sweep_stats(h_ref, h_aligned, lams, tokens[n_prompt:])
        return logp.mean(axis=1), kl.mean(axis=1)
    per_lam = []
    for lam in lams:
        weights = decoder.runtime.prepare(Realign(mixing_weights(lam), "weights"))
        h_ref, h_adapted = decoder.rows_after(tokens, n_prompt - 1)
        per_lam.append(sweep_stats(h_ref, h_adapted, weights[1:], tokens[n_prompt:]))  # the adapted model alone
    return (np.array([logp.mean() for logp, _ in per_lam]), np.array([kl.mean() for _, kl in per_lam]))


def score_row(
    pair: EvalPair, decoder: ParallelSequences, row: Row, lams: Sequence[float], mode: str = "blend"
) -> List[Dict[str, Any]]:
    """One record per λ: eq. (14)'s comparison and the quantities behind it."""
    prompt = pair.prompt_text(row.prompt, row.messages)
    decoder.clear()  # each row from an empty cache: its numbers do not depend on the rows before it
    chosen, n_prompt = response_tokens(pair, prompt, row.responses["chosen"])
    rejected, n_prompt_r = response_tokens(pair, prompt, row.responses["rejected"])
    lp_chosen, kl_chosen = response_stats(decoder, chosen, n_prompt, lams, mode)
    lp_rejected, _ = response_stats(decoder, rejected, n_prompt_r, lams, mode)
    return [
        {
            "row": row.id,
            "line": row.line,
            "lam": float(lam),
            "sample": 0,
            "correct": int(lp_chosen[j] > lp_rejected[j]),
            "logprob_chosen": float(lp_chosen[j]),
            "logprob_rejected": float(lp_rejected[j]),
            "kl_chosen": float(kl_chosen[j]),
            "n_chosen": int(len(chosen) - n_prompt),
            "n_rejected": int(len(rejected) - n_prompt_r),
        }
        for j, lam in enumerate(lams)
    ]


@dataclass(frozen=True)
class ScoreTask:
    """What a process needs to score rows on its own pair (sent to Ray workers)."""

    mode: str = "blend"

    def open(self, pair: EvalPair) -> RowWork:
        """``work(row, lams) -> records`` on ``pair``'s contexts."""
        decoder = ParallelSequences(pair, n_seq=1)
        return RowWork(lambda row, todo: score_row(pair, decoder, row, todo, self.mode), decoder.close)

    def user_code(self) -> tuple:
        return ()


def score(
    pair: Union[EvalPair, PairSpec],
    data,
    lams: Sequence[float],
    out_dir: Optional[str] = None,
    limit: Optional[int] = None,
    progress: Optional[Progress] = None,
    mode: str = "blend",
    ray=None,
    workers: Optional[int] = None,
    log: Optional[Callable[[str], None]] = None,
) -> SweepResult:
    """Score preference data at every λ.

    Args:
        pair: the models: an open :class:`EvalPair`, or a :class:`PairSpec` (loaded here, or by
            each Ray worker).
        data: a prefs.jsonl path or a :class:`Dataset` from :func:`read_rows`.
        lams: the λ values to sweep.
        out_dir: where results.jsonl, summary.json/csv and sweep.png go (None: keep in memory).
            An earlier run there is resumed: its finished (row, λ) results are reused.
        limit: score only the first ``limit`` usable rows.
        progress: called as ``progress(label, rows_done, rows_total)`` (the CLI draws a bar).
        mode: ``"blend"`` (DeRa) or ``"weights"`` (a LoRA pair's adapter at scale λ, one forward
            pass per λ: the paper's weight-space approximation).
        ray: shard rows over Ray workers: ``"local"`` (or True) starts a local Ray runtime (or uses
            the one this process already joined), ``"auto"`` / ``"ray://host:port"`` joins a cluster;
            a :class:`~dera_gguf.eval.cluster.RayOptions` sets more. None: this process.
        workers: Ray workers (default: one per GPU when offloading, else CPUs / threads per worker).
        log: called with a line per worker as it loads its pair (Ray only).
    """
    files = pair.files
    check_mode(mode, files)
    if not isinstance(data, Dataset):
        data = read_rows(data, "score", limit)
    settings = {
        "command": "score",
        "reference": os.path.abspath(files.reference),
        "aligned": os.path.abspath(files.aligned[0]),
        **({"mode": mode} if mode != "blend" else {}),  # (runs from before modes existed resume as blend)
    }
    with row_executor(pair, ScoreTask(mode), ray, workers, log) as execute:
        return run_sweep(
            data,
            [float(x) for x in lams],
            per_lam=1,
            metrics=SCORE_METRICS,
            results_name=RESULTS_FILE,
            out_dir=out_dir,
            settings=settings,
            progress=progress,
            label="scoring",
            execute=execute,
        )
