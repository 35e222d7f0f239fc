"""The one real model: SmolLM2-135M-Instruct paired with itself equals the model alone at any lam."""

from __future__ import annotations

import llama_cpp
import pytest

from dera_gguf import DeRaLlama

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Name three colours of the rainbow."}]


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
