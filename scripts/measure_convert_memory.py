#!/usr/bin/env python
"""Measure dera-convert's peak memory on a generated checkpoint with 7B-sized tensors.

    python scripts/measure_convert_memory.py [--layers 1] [--quant F16]

Writes a random bf16 checkpoint with Mistral-7B shapes (vocab 32000, hidden 4096,
GQA 32/8 heads, ffn 14336; the embedding and lm_head are the largest tensors of
the real model) and ``--layers`` blocks, then runs ``dera-convert`` in a child
process and prints that process's peak resident memory. Peak memory is set by
the largest tensor, not the number of layers, so one layer predicts a full 7B run.
No torch needed: the safetensors files and a byte-level tokenizer.json are
written directly.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

SHAPES = dict(vocab=32000, hidden=4096, heads=32, kv_heads=8, ff=14336)


def _tensor_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    v, h, ff = SHAPES["vocab"], SHAPES["hidden"], SHAPES["ff"]
    kv = h // SHAPES["heads"] * SHAPES["kv_heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (ff, h),
            p + "mlp.up_proj.weight": (ff, h),
            p + "mlp.down_proj.weight": (h, ff),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    return shapes


def _write_shard(path: Path, shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> None:
    """One bf16 safetensors file, written tensor by tensor in row chunks."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for shape in shapes.values():
            n = int(np.prod(shape))
            for begin in range(0, n, 1 << 22):
                chunk = rng.standard_normal(min(1 << 22, n - begin), dtype=np.float32) * 0.02
                f.write((chunk.view(np.uint32) >> 16).astype(np.uint16).tobytes())


def _tokenizer_json() -> dict:
    """A byte-fallback BPE tokenizer: <unk>, <s>, </s> and the 256 byte tokens."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    added = [{"id": i, "content": t, "special": True} for t, i in list(vocab.items())[:3]]
    model = {"type": "BPE", "byte_fallback": True, "vocab": vocab, "merges": [], "unk_token": "<unk>"}
    return {"added_tokens": added, "model": model}


def write_checkpoint(folder: Path, layers: int) -> int:
    """Generate the checkpoint (two shards + index); return its size in bytes."""
    shapes = _tensor_shapes(layers)
    names = list(shapes)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    rng = np.random.default_rng(0)
    for fname, members in shards.items():
        _write_shard(folder / fname, {n: shapes[n] for n in members}, rng)
    index = {"weight_map": {n: f for f, members in shards.items() for n in members}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {
        "architectures": ["MistralForCausalLM"],
        "vocab_size": SHAPES["vocab"],
        "hidden_size": SHAPES["hidden"],
        "intermediate_size": SHAPES["ff"],
        "num_hidden_layers": layers,
        "num_attention_heads": SHAPES["heads"],
        "num_key_value_heads": SHAPES["kv_heads"],
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text(json.dumps(_tokenizer_json()))
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# Runs dera-convert as its own child and reports only that child's peak RSS (KiB on Linux),
# so processes the caller started earlier (a test session's) do not count.
_WRAPPER = """
import resource, subprocess, sys
subprocess.run([sys.executable, "-m", "dera_gguf.cli.convert", *sys.argv[1:]], check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def measure(folder: Path, out: Path, quant: str) -> tuple[int, float]:
    """Convert in a fresh process tree; return (peak RSS of the converter in bytes, seconds)."""
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _WRAPPER, str(folder), str(out), "--quant", quant],
        check=True,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    seconds = time.perf_counter() - start
    return int(proc.stdout.strip().splitlines()[-1]) * 1024, seconds


@click.command()
@click.option("--layers", default=1, show_default=True, help="Transformer blocks to generate.")
@click.option("--quant", default="F16", show_default=True)
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
def main(layers: int, quant: str, work_dir: Path | None) -> None:
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        folder = Path(tmp) / "ckpt"
        folder.mkdir()
        size = write_checkpoint(folder, layers)
        peak, seconds = measure(folder, Path(tmp) / "out.gguf", quant)
        out_size = (Path(tmp) / "out.gguf").stat().st_size
        print(
            f"checkpoint {size / 2**30:.2f} GiB bf16 "
            f"(largest tensor 32000x4096 = {32000 * 4096 * 2 / 2**20:.0f} MiB) -> "
            f"{quant} {out_size / 2**30:.2f} GiB in {seconds:.1f} s; peak RSS {peak / 2**20:.0f} MiB"
        )
        print(json.dumps({"peak_rss_bytes": peak, "seconds": seconds, "quant": quant, "layers": layers}))


if __name__ == "__main__":
    main()
