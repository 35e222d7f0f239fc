"""The one real model: SmolLM2-135M-Instruct paired with itself equals the model alone at any lam."""

from __future__ import annotations

import llama_cpp
import pytest

from dera_gguf import DeRaLlama

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Name three colours of the rainbow."},
]


@pytest.fixture(scope="module")
def alone(smollm2_path):
    return llama_cpp.Llama(model_path=str(smollm2_path), n_ctx=512, n_threads=1, verbose=False)


@pytest.fixture(scope="module")
def self_pair(smollm2_path):
    return DeRaLlama(str(smollm2_path), str(smollm2_path), n_ctx=512, n_threads=1, verbose=False)


@pytest.mark.parametrize("lam", [-1.0, 0.5, 2.0])
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.7, top_k=50, top_p=0.95, seed=5)])
def test_self_pair_equals_model_alone_through_chat_template(alone, self_pair, lam, sampling):
    expected = alone.create_chat_completion(MESSAGES, max_tokens=24, **sampling)["choices"][0]["message"]["content"]
    got = self_pair.create_chat_completion(MESSAGES, max_tokens=24, lam=lam, **sampling)
    assert got["choices"][0]["message"]["content"] == expected
    assert got["object"] == "chat.completion" and got["usage"]["completion_tokens"] > 0


def test_self_pair_scores_are_the_model_log_probs(smollm2_path, tmp_path):
    """dera-eval score on SmolLM2 paired with itself: at every lam the chosen response's mean
    per-token log-prob is the model's own (numpy over plain Llama logits) and the KL is zero."""
    import json

    import numpy as np

    from dera_gguf.eval import EvalPair, score

    row = {"prompt": "The capital of France is", "chosen": " Paris, a city on the Seine.", "rejected": " blue."}
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps(row) + "\n")
    plain = llama_cpp.Llama(model_path=str(smollm2_path), n_ctx=512, n_threads=1, logits_all=True, verbose=False)
    prompt = plain.tokenize(row["prompt"].encode(), add_bos=True, special=True)
    full = plain.tokenize((row["prompt"] + row["chosen"]).encode(), add_bos=True, special=True)
    assert full[: len(prompt)] == prompt
    plain.eval(full)
    logits = np.array(plain.scores[: len(full)], dtype=np.float64)
    logp = logits - logits.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    expected = np.mean([logp[i - 1, full[i]] for i in range(len(prompt), len(full))])
    with EvalPair(str(smollm2_path), str(smollm2_path), n_ctx=512, n_threads=1) as pair:
        summary = score(pair, str(data), lams=[-1.0, 0.5, 2.0]).summary
    for entry in summary:
        assert entry["mean_logprob_chosen"] == pytest.approx(expected, abs=1e-3)
        assert abs(entry["mean_kl_to_reference"]) < 1e-4
