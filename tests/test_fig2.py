"""scripts/reproduce_fig2.py: its KL between methods, checked against plain llama_cpp.Llama
logits and numpy; the shipped retrained adapters on SmolLM2."""

from __future__ import annotations

import sys
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import reference as R
from tiny_models import write_tiny_lora

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from fig2 import crosskl  # noqa: E402 (path set above)

from dera_gguf.eval.batch import ParallelSequences  # noqa: E402
from dera_gguf.pairs.registry import load_registry  # noqa: E402

PROMPT = "please write about the rain"
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "dera_gguf" / "data"  # what the checkout ships
RETRAINED = {
    "smollm2-demo-beta0.2": ("smollm2-demo-dpo-lora-beta0.2.gguf", 0.2),
    "smollm2-demo-beta0.05": ("smollm2-demo-dpo-lora-beta0.05.gguf", 0.05),
}


@pytest.fixture(scope="module")
def adapter_path(models_dir):
    return write_tiny_lora(models_dir / "fig2-aligned.gguf", seed=21)


@pytest.fixture(scope="module")
def retrained_path(models_dir):
    return write_tiny_lora(models_dir / "fig2-retrained.gguf", seed=22)


def numpy_kl(zp: np.ndarray, zq: np.ndarray) -> np.ndarray:
    """KL(softmax zp || softmax zq) per row, float64."""
    lp, lq = R.log_softmax(zp.astype(np.float64)), R.log_softmax(zq.astype(np.float64))
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def plain_rows(path, tokens, first, n, **kwargs) -> np.ndarray:
    """Rows first..first+n-1 of a plain Llama's logits over ``tokens`` (float64)."""
    llm = R.plain(path, **kwargs)
    llm.eval(list(tokens))
    return np.array(llm.scores[first : first + n], dtype=np.float64)


@pytest.mark.parametrize("lam", [0.5, 2.0])
@pytest.mark.parametrize("finish", ["stop", "length"])
def test_cross_kl_equals_numpy_over_plain_llama_logits(ref_path, adapter_path, retrained_path, lam, finish):
    plain = R.plain(ref_path)
    prompt = plain.tokenize(PROMPT.encode(), add_bos=True, special=True)
    response = plain.tokenize(b" the dog runs in the rain and the sun", add_bos=False, special=False)
    record = {"row": "1:k", "sample": 0, "prompt": PROMPT, "tokens": response, "finish_reason": finish}
    with (
        crosskl.scoring_pair(str(ref_path), str(adapter_path), str(retrained_path), lam, n_ctx=256) as pair,
        ParallelSequences(pair) as decoder,
    ):
        got = crosskl.score_record(decoder, pair, record, lam)

    # rows predicting each response token, and the end of the response when the model stopped
    n = len(response) + (finish == "stop")
    tokens, first = prompt + response, len(prompt) - 1
    h_ref = plain_rows(ref_path, tokens, first, n)
    h_aligned = plain_rows(ref_path, tokens, first, n, lora_path=str(adapter_path))
    h_retrained = plain_rows(ref_path, tokens, first, n, lora_path=str(retrained_path))
    h_weights = plain_rows(ref_path, tokens, first, n, lora_path=str(adapter_path), lora_scale=lam)
    h_dera = (1 - lam) * h_ref + lam * h_aligned
    expected = {
        "kl_retrained_vs_dera": numpy_kl(h_retrained, h_dera).mean(),
        "kl_retrained_vs_weights": numpy_kl(h_retrained, h_weights).mean(),
        "kl_retrained_vs_aligned": numpy_kl(h_retrained, h_aligned).mean(),
        "kl_retrained_vs_reference": numpy_kl(h_retrained, h_ref).mean(),
        "kl_dera_vs_retrained": numpy_kl(h_dera, h_retrained).mean(),
        "kl_weights_vs_retrained": numpy_kl(h_weights, h_retrained).mean(),
    }
    assert got["positions"] == n and (got["row"], got["lam"], got["sample"]) == ("1:k", lam, 0)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-3, abs=R.backend_atol(2e-4)), name
    # guards: the methods really differ here, so equal numbers above are not an accident
    assert min(expected.values()) > 0.01
    assert abs(expected["kl_retrained_vs_dera"] - expected["kl_retrained_vs_weights"]) > 1e-3


@pytest.mark.parametrize("name", sorted(RETRAINED))
def test_shipped_retrained_adapters_load_on_smollm2_and_change_it(smollm2_path, name):
    file, beta = RETRAINED[name]
    registry = load_registry(ROOT / "models.toml")
    pair = registry.get(name)
    assert pair.beta == beta and pair.reference.spec == registry.get("smollm2-demo").reference.spec
    assert pair.aligned[0].spec["package"] == "dera_gguf" and pair.aligned[0].spec["file"] == f"data/{file}"
    adapter = DATA / file
    assert adapter.stat().st_size <= 8 * 2**20
    kw = dict(model_path=str(smollm2_path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    text = b"<|im_start|>user\nExplain what a rainbow is.<|im_end|>\n<|im_start|>assistant\n"
    logits = {}
    for key, extra in {
        "base": {},
        "beta0.1": {"lora_path": str(DATA / "smollm2-demo-dpo-lora.gguf")},
        "retrained": {"lora_path": str(adapter)},
    }.items():
        llm = llama_cpp.Llama(**kw, **extra)
        llm.eval(llm.tokenize(text, add_bos=False, special=True))
        logits[key] = np.array(llm.scores[: llm.n_tokens], dtype=np.float64)
    assert np.abs(logits["retrained"] - logits["base"]).max() > 1.0
    assert np.abs(logits["retrained"] - logits["beta0.1"]).max() > 0.1  # another adapter, not a copy
