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


def greedy_tokens(llm, prompt, n):
    got = []
    for token in llm.generate(prompt, temp=0.0):
        got.append(token)
        if len(got) == n:
            return got


@pytest.mark.parametrize("lam", [-0.5, 0.5, 1.0, 2.0])
def test_adapter_pair_equals_independent_blend(ref_path, adapter_path, lam):
    llm = DeRaLlama(str(ref_path), str(adapter_path), lam=lam, n_ctx=256, verbose=False, n_gpu_layers=R.N_GPU_LAYERS)
    models = [R.plain(ref_path), R.plain(ref_path, lora_path=str(adapter_path))]
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
    expected, _ = R.greedy(models, [1 - lam, lam], prompt, 10)
    assert greedy_tokens(llm, prompt, len(expected)) == expected


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
    assert greedy_tokens(llm, prompt, len(expected)) == expected


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
