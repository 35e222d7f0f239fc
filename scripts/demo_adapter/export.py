"""Write a peft LoRA as a llama.cpp LoRA adapter (GGUF), with gguf-py.

llama.cpp finds an adapter's tensors by the base tensor's GGUF name plus ``.lora_a`` /
``.lora_b``. In ggml order it wants lora_a as [n_in, rank] and lora_b as [rank, n_out],
which in numpy's (row-major, reversed) order is exactly peft's ``lora_A.weight``
(rank, n_in) and ``lora_B.weight`` (n_out, rank): no transpose. It scales the product by
``adapter.lora.alpha / rank``, as peft does with ``lora_alpha / r``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from dera_gguf.errors import DeRaError

# transformers module path (inside a Llama decoder layer) -> GGUF tensor name stem.
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_KEY = re.compile(r"layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])\.weight$")


def gguf_tensor_name(peft_key: str) -> str:
    """``...layers.3.mlp.up_proj.lora_A.weight`` -> ``blk.3.ffn_up.weight.lora_a``."""
    match = _KEY.search(peft_key)
    if not match:
        raise DeRaError(f"unexpected LoRA tensor name {peft_key!r}")
    layer, module, side = match.groups()
    if module in ("self_attn.q_proj", "self_attn.k_proj"):
        raise DeRaError(f"{peft_key}: q/k adapters need llama.cpp's row permutation; train on other projections")
    return f"blk.{layer}.{GGUF_NAMES[module]}.weight.lora_{side.lower()}"


def _as_numpy(tensor) -> np.ndarray:
    """A torch tensor (detached to float32 on the CPU) or an array, as numpy."""
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().float().cpu().numpy()
    return np.asarray(tensor, dtype=np.float32)


def export_lora_gguf(
    lora_state: dict, alpha: float, out_path: Path, *, arch: str = "llama", name: str = "", dtype=np.float16
) -> dict:
    """Write ``lora_state`` (peft's adapter state dict) to ``out_path``; return name -> shape."""
    import gguf

    writer = gguf.GGUFWriter(str(out_path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    if name:
        writer.add_name(name)
    shapes = {}
    for key in sorted(lora_state):
        tensor = _as_numpy(lora_state[key]).astype(dtype)
        gname = gguf_tensor_name(key)
        writer.add_tensor(gname, np.ascontiguousarray(tensor))
        shapes[gname] = tuple(tensor.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return shapes
