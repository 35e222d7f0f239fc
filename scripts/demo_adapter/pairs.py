"""The length reward of the paper's toy task (eq. 10) and the DPO pairs built from it."""

from __future__ import annotations

import random
import statistics
from collections import defaultdict


def length_reward(n_tokens: int, stopped: bool, l_min: int, l_max: int) -> int:
    """Eq. 10: 0 when the response has between l_min and l_max tokens, -1 otherwise.

    A response cut at the sampling budget never ended, so its length is unknown but past
    the budget: it earns -1 (the budget is always above l_max).
    """
    if not stopped:
        return -1
    return 0 if l_min <= n_tokens <= l_max else -1


def length_stats(samples: list[dict]) -> dict:
    """Typical response length of the reference, to place [l_min, l_max] well below it."""
    lengths = [len(s["response_tokens"]) for s in samples]
    cut = sum(not s["stopped"] for s in samples)
    q = statistics.quantiles(lengths, n=10) if len(lengths) >= 10 else [0] * 9
    return {
        "n": len(lengths),
        "mean": statistics.fmean(lengths) if lengths else 0.0,
        "median": statistics.median(lengths) if lengths else 0.0,
        "p10": q[0],
        "p90": q[-1],
        "cut_at_budget": cut,
    }


def build_pairs(samples: list[dict], l_min: int, l_max: int, max_pairs_per_prompt: int, seed: int) -> list[dict]:
    """(chosen, rejected) pairs: a reward-0 response against a reward -1 one, same prompt.

    Prompts whose samples all earn the same reward give no pair. Each prompt gives at
    most ``max_pairs_per_prompt`` pairs, drawn by a seeded shuffle of all combinations,
    so a few prompts with many samples cannot dominate.
    """
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for s in samples:
        by_prompt[s["id"]].append(s)
    rng = random.Random(seed)
    pairs = []
    for pid in sorted(by_prompt):
        group = sorted(by_prompt[pid], key=lambda s: s["k"])
        good = [s for s in group if length_reward(len(s["response_tokens"]), s["stopped"], l_min, l_max) == 0]
        bad = [s for s in group if s not in good]
        combos = [(g, b) for g in good for b in bad]
        rng.shuffle(combos)
        for g, b in combos[:max_pairs_per_prompt]:
            pairs.append(
                {
                    "id": pid,
                    "prompt_tokens": g["prompt_tokens"],
                    "chosen": response_with_end(g),
                    "rejected": response_with_end(b),
                }
            )
    rng.shuffle(pairs)
    return pairs


def response_with_end(sample: dict) -> list[int]:
    """Response tokens plus the end token when the model ended the answer itself.

    The end token is what the policy must learn to emit earlier, so it belongs in the
    sequence DPO scores.
    """
    return sample["response_tokens"] + ([sample["end_token"]] if sample["stopped"] else [])
