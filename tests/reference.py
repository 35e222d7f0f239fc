"""The independent computation the engine is checked against.

Plain ``llama_cpp.Llama`` instances, one per model, each evaluates the tokens on its
own; their logits are blended here in float64 numpy. Nothing from ``dera_gguf`` is
used, so a bug in the engine cannot hide in the reference.
"""

from __future__ import annotations

import ctypes
import os
from typing import Callable, List, Sequence

import llama_cpp
import numpy as np

# Set on a GPU machine to run every test model offloaded (CUDA / Metal builds).
N_GPU_LAYERS = int(os.environ.get("DERA_TEST_N_GPU_LAYERS", "0"))

# The tests' per-backend tolerance policy, stated here only (see docs/gpu.md).
# Greedy tokens are compared exactly on every backend. A log-prob, KL or score computed by
# dera_gguf may lie from the independent one by LOGPROB_ATOL:
# - CPU (N_GPU_LAYERS == 0): 2e-4, for tests whose engine and reference decode in the same batch
#   shapes (only float32 blending differs). CPU kernels round differently per batch shape too:
#   with prefix reuse and n_batch=4 a LoRA pair's last prompt row differed by up to 3.1e-4, so
#   tests/test_engine_state.py, which mixes batch shapes on purpose, uses backend_atol(1e-3).
# - GPU (layers offloaded): llama.cpp's CUDA kernels differ with the batch shape (one row or
#   many), so the same token's logits differ between the engine's batches and the reference's.
#   On an H200 (CUDA 13.0, 2026-11-27) echoed log-probs were off by up to 0.041 at logits near
#   -20 and scores by up to 6e-4; with n_batch=4 and a LoRA pair (tests/test_engine_state.py) a
#   greedy token's log-prob by 0.091. 0.15 covers that and still catches a wrong λ or blend (a λ
#   off by 0.1 moves the tiny test models' mean log-probs and KLs by 0.6 or more).
ON_GPU = N_GPU_LAYERS != 0
LOGPROB_ATOL = 0.15 if ON_GPU else 2e-4


def backend_atol(cpu_atol: float) -> float:
    """A test's own CPU tolerance, kept exactly on the CPU; widened to LOGPROB_ATOL offloaded."""
    return max(cpu_atol, LOGPROB_ATOL) if ON_GPU else cpu_atol


def plain(path, n_ctx: int = 256, **kwargs) -> llama_cpp.Llama:
    kwargs.setdefault("verbose", False)
    kwargs.setdefault("n_gpu_layers", N_GPU_LAYERS)
    kwargs.setdefault("logits_all", True)
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, **kwargs)


def step_logits(models: Sequence[llama_cpp.Llama], tokens: Sequence[int]) -> List[np.ndarray]:
    """Evaluate ``tokens`` in every model; return each model's logits for them (float64)."""
    out = []
    for m in models:
        start = m.n_tokens
        m.eval(list(tokens))
        out.append(np.array(m.scores[start : m.n_tokens], dtype=np.float64))
    return out


def blend(rows: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    return sum(w * r for w, r in zip(weights, rows))


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def greedy(
    models: Sequence[llama_cpp.Llama], weights: Sequence[float], prompt: Sequence[int], n: int, stop: Sequence[int] = ()
) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decoding of the blend; returns the tokens and the blended logits of each step."""
    for m in models:
        m.reset()
    rows = [r[-1] for r in step_logits(models, prompt)]
    tokens, logits = [], []
    for _ in range(n):
        z = blend(rows, weights)
        token = int(np.argmax(z))
        tokens.append(token)
        logits.append(z)
        if token in stop:
            break
        rows = [r[-1] for r in step_logits(models, [token])]
    return tokens, logits


def generated(llm: llama_cpp.Llama, prompt: Sequence[int], n: int, **sampling) -> list[int]:
    """The first ``n`` tokens ``llm.generate(prompt, **sampling)`` yields (greedy by default); the
    generator is then dropped, as a caller that stops reading drops it."""
    got = []
    for token in llm.generate(prompt, **(sampling or dict(temp=0.0, top_k=1))):
        got.append(token)
        if len(got) == n:
            break
    return got


def sampled(
    models: Sequence[llama_cpp.Llama],
    weights: Sequence[float],
    prompt: Sequence[int],
    n: int,
    seed: int,
    stop: Callable[[int], bool] = lambda token: False,
    **sampling,
) -> list[int]:
    """Up to ``n`` tokens drawn from the blend by llama.cpp's own chain, built and seeded by the last
    model (plain llama-cpp-python), one sequence at a time; a token where ``stop(token)`` ends it, unkept."""
    for m in models:
        m.reset()
    owner = models[-1]
    owner.set_seed(seed)
    rows = [r[-1] for r in step_logits(models, prompt)]
    chain, tokens = None, []
    for _ in range(n):
        token, chain = sample_with_chain(owner, blend(rows, weights), chain=chain, **sampling)
        if stop(token):
            break
        tokens.append(token)
        rows = [r[-1] for r in step_logits(models, [token])]
    return tokens


def sample_with_chain(chain_owner: llama_cpp.Llama, logits: np.ndarray, **sampling) -> tuple:
    """One token from llama.cpp's own sampler chain (built by plain llama-cpp-python) on ``logits``.

    Returns ``(token, chain)``; pass ``chain=`` back in ``sampling`` to keep its state.
    """
    chain = sampling.pop("chain", None) or chain_owner._init_sampler(**sampling)
    n = len(logits)
    data = (llama_cpp.llama_token_data * n)()
    for i in range(n):
        data[i].id, data[i].logit, data[i].p = i, float(np.float32(logits[i])), 0.0
    arr = llama_cpp.llama_token_data_array(data=data, size=n, selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(chain.sampler, ctypes.byref(arr))
    token = int(arr.data[arr.selected].id)
    llama_cpp.llama_sampler_accept(chain.sampler, token)
    return token, chain
