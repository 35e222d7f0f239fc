"""Text where speculative decoding has something to copy, and llama.cpp's batch-shape drift measured on it.

llama.cpp's logits depend slightly on the batch shape, and a verification batch is another
shape than one token; a greedy case here is one whose top-2 margins are far above that drift
(measured on the test models), so that drafted and undrafted decoding must pick the same tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as R


def weights_of(lam: float) -> list:
    return [1.0 - lam, lam]


def batch_drift(models, tokens) -> float:
    """How far llama.cpp's logits move between one-token decodes and 5-token batches, here."""
    drift = 0.0
    for m in models:
        m.reset()
        single = [R.step_logits([m], [t])[0] for t in tokens]
        m.reset()
        batched = [R.step_logits([m], tokens[:1])[0]] + [
            R.step_logits([m], tokens[i : i + 5])[0] for i in range(1, len(tokens), 5)
        ]
        drift = max(drift, float(np.abs(np.concatenate(single) - np.concatenate(batched)).max()))
    return drift


def min_margin(logits) -> float:
    return min(float(np.diff(np.partition(z, -2)[-2:])[0]) for z in logits)


def repeated_prompt(n_vocab: int, seed: int = 0) -> list:
    """BOS, then a random phrase three times: prompt lookup has something to copy."""
    rng = np.random.default_rng(seed)
    phrase = [int(t) for t in rng.integers(3, n_vocab, 10)]
    return [1] + phrase * 3


def copying_prompt(models, weights, seed: int) -> list:
    """A phrase three times, the blend's greedy continuation of it, the phrase again: text that
    invites the blend to repeat its continuation, so that prompt lookup's drafts can pass."""
    phrases = repeated_prompt(models[0].n_vocab(), seed)
    continuation, _ = R.greedy(models, weights, phrases, 24)
    return phrases + continuation + phrases[1:11]


def clear_greedy_case(models, weights, n: int = 40) -> tuple:
    """A prompt and its 40 greedy blend tokens whose every top-2 margin is far above what llama.cpp's
    batch shapes can move a blended logit by here (measured), so that batched verification must agree."""
    prompt, (expected,) = clear_greedy_cases(models, [weights], n)
    return prompt, expected


def clear_greedy_cases(models, weight_sets, n: int = 40, seeds: int = 8) -> tuple:
    """One prompt and, for each set of weights, its n greedy blend tokens, every top-2 margin clear
    (see :func:`clear_greedy_case`); the prompt invites the first blend to copy."""
    for seed in range(seeds):
        prompt = copying_prompt(models, weight_sets[0], seed)
        cases = [R.greedy(models, weights, prompt, n) for weights in weight_sets]
        drift = batch_drift(models, prompt + max((tokens for tokens, _ in cases), key=len))
        bound = 2 * drift * max(sum(abs(w) for w in weights) for weights in weight_sets)  # most a margin can move
        if all(min_margin(logits) > 2 * bound for _, logits in cases):
            return prompt, [tokens for tokens, _ in cases]
    message = f"no prompt has top-2 margins above twice the batch-shape bound {bound:.2g} (drift {drift:.2g})"
    if R.ON_GPU:
        pytest.skip(message + " on this backend")
    pytest.fail(message)
