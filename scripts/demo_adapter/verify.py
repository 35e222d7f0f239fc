"""Checks that the exported adapter is the one trained, and that it does something.

- llama.cpp base + adapter against transformers with the LoRA merged into the same
  dequantized weights: share of positions with the same argmax.
- llama.cpp with the adapter against llama.cpp without: the adapter must move the logits.
- Greedy answers at several lam, blending the two llama.cpp models' logits as DeRa does,
  to see the lengths fall.
"""

from __future__ import annotations

import numpy as np


def llama_logits(llm, tokens: list[int]) -> np.ndarray:
    """Logits of every position of ``tokens`` (``llm`` needs ``logits_all=True``)."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def torch_logits(model, tokens: list[int]) -> np.ndarray:
    """Logits of every position from a transformers causal LM."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens]))
    return out.logits[0].float().numpy()


def scored_positions(sequences: list[tuple[list[int], list[int]]], n_positions: int):
    """(sequence, positions) to compare: positions that predict response tokens, n in all."""
    picked, left = [], n_positions
    for prompt, response in sequences:
        if left <= 0:
            break
        start = len(prompt) - 1
        stop = min(start + len(response), start + left)
        picked.append((prompt + response, list(range(start, stop))))
        left -= stop - start
    return picked


def argmax_agreement(logits_a, logits_b, picked) -> float:
    """Share of the picked positions where two logit sources agree on the argmax."""
    same = total = 0
    for (_tokens, positions), la, lb in zip(picked, logits_a, logits_b):
        same += int(np.sum(la[positions].argmax(-1) == lb[positions].argmax(-1)))
        total += len(positions)
    return same / total


def max_abs_diff(logits_a, logits_b, picked) -> float:
    """Largest absolute logit difference over the picked positions."""
    return max(float(np.abs(la[pos] - lb[pos]).max()) for (_, pos), la, lb in zip(picked, logits_a, logits_b))


def shift_slope(lora_a, base_a, lora_b, base_b, picked) -> float:
    """Least-squares slope of the adapter's logit shift in source a against source b.

    Near 1 when both apply the adapter at the same scale (a wrong alpha/rank shows here).
    """
    xs, ys = [], []
    for (_, pos), la, ba, lb, bb in zip(picked, lora_a, base_a, lora_b, base_b):
        ys.append((la[pos] - ba[pos]).ravel())
        xs.append((lb[pos] - bb[pos]).ravel())
    x, y = np.concatenate(xs), np.concatenate(ys)
    return float(np.dot(x, y) / np.dot(x, x))


def _last_logits(llm) -> np.ndarray:
    return np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float32)


def dera_greedy(ref, aligned, prompt_tokens: list[int], lam: float, max_tokens: int) -> list[int]:
    """Greedy answer on argmax(lam * h_aligned + (1 - lam) * h_ref); only one model at lam 0 or 1."""
    import llama_cpp

    models = [m for m, w in ((ref, 1.0 - lam), (aligned, lam)) if w != 0.0]
    weights = [w for w in (1.0 - lam, lam) if w != 0.0]
    for m in models:
        m.reset()
        m.eval(prompt_tokens)
    vocab = ref._model.vocab
    answer: list[int] = []
    while len(answer) < max_tokens:
        z = sum(w * _last_logits(m) for m, w in zip(models, weights))
        token = int(np.argmax(z))
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            break
        answer.append(token)
        for m in models:
            m.eval([token])
    return answer
