"""The demo adapter's GGUF export: llama.cpp's tensor names, shapes and adapter metadata.

Checked with gguf-py's reader on a tiny made-up LoRA (no torch, no model needed).
"""

import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from demo_adapter.export import export_lora_gguf, gguf_tensor_name  # noqa: E402 (path set above)

from dera_gguf.errors import DeRaError  # noqa: E402

PREFIX = "base_model.model.model.layers"


def test_names_follow_the_base_gguf_tensor_names():
    assert gguf_tensor_name(f"{PREFIX}.3.mlp.up_proj.lora_A.weight") == "blk.3.ffn_up.weight.lora_a"
    assert gguf_tensor_name(f"{PREFIX}.12.self_attn.o_proj.lora_B.weight") == "blk.12.attn_output.weight.lora_b"


def test_q_and_k_are_refused():
    with pytest.raises(DeRaError, match="permutation"):
        gguf_tensor_name(f"{PREFIX}.0.self_attn.q_proj.lora_A.weight")


def test_written_adapter_reads_back_in_llama_cpp_layout(tmp_path):
    rng = np.random.default_rng(0)
    rank, n_in, n_out = 4, 16, 8
    a = rng.standard_normal((rank, n_in)).astype(np.float32)
    b = rng.standard_normal((n_out, rank)).astype(np.float32)
    state = {f"{PREFIX}.0.self_attn.v_proj.lora_A.weight": a, f"{PREFIX}.0.self_attn.v_proj.lora_B.weight": b}
    path = tmp_path / "lora.gguf"
    export_lora_gguf(state, alpha=8.0, out_path=path)

    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(8.0)
    tensors = {t.name: t for t in reader.tensors}
    # ggml order: lora_a is [n_in, rank], lora_b is [rank, n_out]
    assert list(tensors["blk.0.attn_v.weight.lora_a"].shape) == [n_in, rank]
    assert list(tensors["blk.0.attn_v.weight.lora_b"].shape) == [rank, n_out]
    np.testing.assert_allclose(
        np.asarray(tensors["blk.0.attn_v.weight.lora_a"].data, dtype=np.float32).reshape(rank, n_in),
        a,
        rtol=1e-3,
        atol=1e-3,
    )
