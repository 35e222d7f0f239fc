"""Map HF tensor names to GGUF names and apply the Q/K layout llama.cpp expects.

Hugging Face Llama/Mistral checkpoints store the query and key projections in
the "rotate half" layout (the two halves of each head's rotary pairs are split
into two blocks); llama.cpp's ``llama`` architecture applies rope on adjacent
pairs. Permuting the rows of ``q_proj`` (with ``n_head``) and ``k_proj`` (with
``n_head_kv``) reconciles the two. Skip it and every shape still fits but the
logits are garbage, so the tests compare against transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import gguf
import numpy as np

from ..errors import DeRaError
from .hparams import HParams
from .safetensors_reader import TensorEntry, read_raw, read_tensor

ARCH = gguf.MODEL_ARCH.LLAMA
# Buffers some older checkpoints saved alongside the weights; llama.cpp recomputes them.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


QType = gguf.GGMLQuantizationType
# numpy container for each output type; bf16 travels as its raw 16-bit patterns
_NP_DTYPES = {QType.F32: np.dtype(np.float32), QType.F16: np.dtype(np.float16), QType.BF16: np.dtype(np.uint16)}


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor to write: its source, output type and optional head permutation."""

    gguf_name: str
    source: TensorEntry
    out_type: gguf.GGMLQuantizationType  # F32 (norms), F16, or BF16 (copied bit for bit)
    permute_heads: int | None = None

    @property
    def np_dtype(self) -> np.dtype:
        return _NP_DTYPES[self.out_type]

    @property
    def nbytes(self) -> int:
        return self.source.n_elements * self.np_dtype.itemsize


def permute_qk(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder rows of a q/k projection from HF's rotate-half layout to interleaved pairs."""
    rows = weights.shape[0]
    if rows % (2 * n_heads):
        raise DeRaError(f"cannot permute a {weights.shape} projection into {n_heads} heads")
    return weights.reshape(n_heads, 2, rows // n_heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _gguf_name(name_map: gguf.TensorNameMap, hf_name: str) -> str:
    """GGUF name of an HF tensor, or a DeRaError naming the tensor."""
    mapped = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise DeRaError(
            f"tensor {hf_name!r} has no llama.cpp counterpart; this is not a plain Llama/Mistral checkpoint"
        )
    return mapped


def _permutation(gguf_name: str, hp: HParams) -> int | None:
    """Head count to permute with, for attn_q / attn_k weights only."""
    if gguf_name.endswith(".attn_q.weight"):
        return hp.n_head
    if gguf_name.endswith(".attn_k.weight"):
        return hp.n_head_kv
    return None


def _out_type(entry: TensorEntry, keep_bf16: bool) -> gguf.GGMLQuantizationType:
    """F32 for vectors (norms); matrices F16, or BF16 kept as is when allowed (exact, no overflow)."""
    if len(entry.shape) == 1:
        return QType.F32
    return QType.BF16 if keep_bf16 and entry.dtype == "BF16" else QType.F16


def _order(planned: PlannedTensor) -> tuple[int, str]:
    """llama.cpp's usual order: embedding, blocks by number, final norm and output."""
    name = planned.gguf_name
    if name.startswith("blk."):
        return 1 + int(name.split(".")[1]), name
    return (0 if name.startswith("token_embd") else 1 << 30), name


def plan_tensors(entries: dict[str, TensorEntry], hp: HParams, keep_bf16: bool = False) -> list[PlannedTensor]:
    """Decide every output tensor (name, type, permutation) from headers alone.

    ``keep_bf16`` writes bf16 matrices unchanged: the right intermediate for llama.cpp's
    quantizer (no rounding, no float16 overflow). The F16 output uses ``keep_bf16=False``.
    """
    name_map = gguf.get_tensor_name_map(ARCH, hp.n_layer)
    plan = []
    for hf_name in sorted(entries):
        if hf_name.endswith(_IGNORED_SUFFIXES):
            continue
        entry = entries[hf_name]
        gguf_name = _gguf_name(name_map, hf_name)
        if gguf_name == "output.weight" and hp.tie_embeddings:
            continue
        plan.append(PlannedTensor(gguf_name, entry, _out_type(entry, keep_bf16), _permutation(gguf_name, hp)))
    _check_complete(plan, hp)
    return sorted(plan, key=_order)


def _expected_names(hp: HParams) -> list[str]:
    """The tensors a llama-architecture model cannot run without."""
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    names = ["token_embd.weight", "output_norm.weight"]
    if not hp.tie_embeddings:
        names.append("output.weight")
    names += [f"blk.{i}.{n}.weight" for i in range(hp.n_layer) for n in per_layer]
    return names


def _check_complete(plan: list[PlannedTensor], hp: HParams) -> None:
    """Refuse checkpoints with missing tensors or an embedding that disagrees with vocab_size."""
    have = {p.gguf_name: p for p in plan}
    missing = [n for n in _expected_names(hp) if n not in have]
    if missing:
        raise DeRaError(f"checkpoint lacks tensors {missing[:5]} ({len(missing)} missing); is it complete?")
    embd = have["token_embd.weight"].source.shape
    if tuple(embd) != (hp.n_vocab, hp.n_embd):
        raise DeRaError(
            f"embedding has shape {embd} but config.json says vocab_size={hp.n_vocab}, hidden_size={hp.n_embd}"
        )


def load_planned(planned: PlannedTensor) -> np.ndarray:
    """Read one planned tensor from disk, converted and permuted, ready to write."""
    if planned.out_type == QType.BF16:
        data = read_raw(planned.source).reshape(planned.source.shape)
    else:
        data = read_tensor(planned.source, planned.np_dtype.type)
        if planned.out_type == QType.F16 and planned.source.dtype != "F16" and np.isinf(data).any():
            raise DeRaError(
                f"tensor {planned.source.name!r} has values beyond the float16 range; convert with a "
                "quantized type (e.g. --quant Q8_0), which keeps bf16 weights exact"
            )
    if planned.permute_heads is not None:
        data = permute_qk(data, planned.permute_heads)
    return data


def iter_tensors(plan: list[PlannedTensor]) -> Iterator[tuple[PlannedTensor, np.ndarray]]:
    """Yield tensors one by one, so only one is alive at a time."""
    for planned in plan:
        yield planned, load_planned(planned)
