"""λ sweeps on validation data, as the paper uses DeRa to pick a KL strength.

    from dera_gguf.eval import EvalPair, score, generate, Sampling, LengthReward
    with EvalPair("sft.gguf", "dpo.gguf", n_ctx=2048) as pair:
        result = score(pair, "prefs.jsonl", lams=[0, 0.5, 1, 1.5, 2], out_dir="runs/score")
        result.summary  # one dict per λ: pairwise_accuracy, mean_logprob_*, ... with *_stderr

``out_dir`` is optional (results stay in memory without it); with it, an interrupted
sweep resumes where it stopped.
"""

from ..sampling.settings import Sampling
from .data import Dataset, read_rows
from .generate import generate
from .judges import Judge
from .models import EvalPair, PairSpec
from .rewards import LengthReward, load_reward
from .runner import SweepResult
from .score import score
from .summary import GENERATE_METRICS, SCORE_METRICS, best_lam

SamplingParams = Sampling  # the name dera-eval's sampling settings had before all fronts shared one type

__all__ = [
    "EvalPair",
    "PairSpec",
    "score",
    "generate",
    "Judge",
    "Sampling",
    "SamplingParams",
    "LengthReward",
    "load_reward",
    "read_rows",
    "Dataset",
    "SweepResult",
    "best_lam",
    "SCORE_METRICS",
    "GENERATE_METRICS",
]
