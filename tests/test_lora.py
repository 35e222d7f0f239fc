"""An aligned model given as a LoRA adapter on the reference: one set of weights, two contexts."""

from __future__ import annotations

import pytest
import reference as R
from tiny_models import write_tiny_lora

from dera_gguf import DeRaLlama

PROMPT = "please write about the rain"


@pytest.fixture(scope="module")
def adapter_path(models_dir):
    return write_tiny_lora(models_dir / "adapter.gguf", seed=9)


@pytest.fixture(scope="module")
def adapter2_path(models_dir):
    return write_tiny_lora(models_dir / "adapter2.gguf", seed=10)


@pytest.mark.parametrize("lam", [-0.5, 0.5, 1.0, 2.0])
def test_adapter_pair_equals_independent_blend(ref_path, adapter_path, lam):
    llm = DeRaLlama(str(ref_path), str(adapter_path), lam=lam, n_ctx=256, verbose=False, n_gpu_layers=R.N_GPU_LAYERS)
    models = [R.plain(ref_path), R.plain(ref_path, lora_path=str(adapter_path))]
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
    expected, _ = R.greedy(models, [1 - lam, lam], prompt, 10)
    assert R.generated(llm, prompt, len(expected), temp=0.0) == expected


def test_adapter_changes_the_model(ref_path, adapter_path):
    """Guard for the test above: with the adapter, the model must really differ."""
    prompt = R.plain(ref_path).tokenize(PROMPT.encode(), add_bos=True, special=True)
    base = R.greedy([R.plain(ref_path)], [1.0], prompt, 10)[0]
    adapted = R.greedy([R.plain(ref_path, lora_path=str(adapter_path))], [1.0], prompt, 10)[0]
    assert base != adapted


def test_mixed_full_model_and_adapter(ref_path, aligned_path, adapter_path, adapter2_path):
    lams = [0.4, 0.8, -0.3]
    llm = DeRaLlama(
        str(ref_path),
        [str(adapter_path), str(aligned_path), str(adapter2_path)],
        lam=lams,
        n_ctx=256,
        verbose=False,
        n_gpu_layers=R.N_GPU_LAYERS,
    )
    models = [
        R.plain(ref_path),
        R.plain(ref_path, lora_path=str(adapter_path)),
        R.plain(aligned_path),
        R.plain(ref_path, lora_path=str(adapter2_path)),
    ]
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
    expected, _ = R.greedy(models, [1 - sum(lams), *lams], prompt, 8)
    assert R.generated(llm, prompt, len(expected), temp=0.0) == expected


def test_adapter_detection_agrees_with_gguf_py(ref_path, adapter_path, smollm2_path, tmp_path):
    """Our header scan for general.type against gguf-py's full reader."""
    import gguf

    from dera_gguf import DeRaError
    from dera_gguf.checks import gguf_general_type

    for path in (ref_path, adapter_path, smollm2_path):
        field = gguf.GGUFReader(str(path)).get_field("general.type")
        assert gguf_general_type(str(path)) == (field.contents() if field is not None else "model")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(adapter_path.read_bytes()[:60])
    with pytest.raises(DeRaError, match="cut.gguf"):
        gguf_general_type(str(cut))


# ------------------------------------------------------------ weight-space mode

WEIGHT_SAMPLING = [dict(temperature=0.0), dict(temperature=0.9, top_k=40, top_p=0.95, seed=11)]


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 2.0, -0.5])
@pytest.mark.parametrize("sampling", WEIGHT_SAMPLING)
def test_weight_space_mode_is_plain_llama_with_the_adapter_at_scale_lam(ref_path, adapter_path, lam, sampling):
    plain = R.plain(ref_path, lora_path=str(adapter_path), lora_scale=lam, logits_all=False)
    llm = DeRaLlama(
        str(ref_path), str(adapter_path), lam=lam, mode="weights", n_ctx=256, verbose=False, n_gpu_layers=R.N_GPU_LAYERS
    )
    kw = dict(max_tokens=12, **sampling)
    assert (
        llm.create_completion(PROMPT, **kw)["choices"][0]["text"]
        == plain.create_completion(PROMPT, **kw)["choices"][0]["text"]
    )
    messages = [{"role": "user", "content": "tell me about the dog"}]
    got = llm.create_chat_completion(messages, **kw)["choices"][0]["message"]
    assert got == plain.create_chat_completion(messages, **kw)["choices"][0]["message"]


def test_modes_and_lams_switched_between_calls_stay_exact(ref_path, adapter_path):
    """One engine, calls alternating blend and weight-space at several lams, prompts that share a prefix:
    every answer equals the independent computation for that call alone."""
    llm = DeRaLlama(
        str(ref_path), str(adapter_path), n_ctx=512, verbose=False, logits_all=True, n_gpu_layers=R.N_GPU_LAYERS
    )
    ref, aligned = R.plain(ref_path), R.plain(ref_path, lora_path=str(adapter_path))
    prompts = [PROMPT, PROMPT + " and the sun", PROMPT, PROMPT + " and the cat"]
    calls = [("blend", 1.5), ("weights", 0.5), ("blend", 0.5), ("weights", 2.0), ("weights", 0.5), ("blend", 1.0)]
    for i, (mode, lam) in enumerate(calls):
        prompt = prompts[i % len(prompts)]
        out = llm.create_completion(prompt, max_tokens=6, temperature=0.0, lam=lam, mode=mode, logprobs=1)
        tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        if mode == "weights":
            expected, logits = R.greedy(
                [R.plain(ref_path, lora_path=str(adapter_path), lora_scale=lam)], [1.0], tokens, 6
            )
        else:
            expected, logits = R.greedy([ref, aligned], [1 - lam, lam], tokens, 6)
        assert out["choices"][0]["text"] == llm.detokenize(expected).decode(errors="ignore")
        lps = out["choices"][0]["logprobs"]["token_logprobs"]
        assert lps == pytest.approx([R.log_softmax(z)[t] for z, t in zip(logits, expected)], abs=R.LOGPROB_ATOL)
    assert llm.mode == "blend" and llm.lam == 1.0  # per-call settings leave the defaults alone


def test_weight_space_mode_is_refused_for_full_model_pairs(ref_path, aligned_path, adapter_path):
    from dera_gguf import DeRaError

    with pytest.raises(DeRaError, match="full GGUF model"):
        DeRaLlama(str(ref_path), str(aligned_path), mode="weights", n_ctx=256, verbose=False)
    llm = DeRaLlama(str(ref_path), str(aligned_path), n_ctx=256, verbose=False)
    with pytest.raises(DeRaError, match="full GGUF model"):
        llm.create_completion(PROMPT, max_tokens=2, mode="weights")
    with pytest.raises(DeRaError, match="mode must be one of"):
        DeRaLlama(str(ref_path), str(adapter_path), mode="weight", n_ctx=256, verbose=False)
