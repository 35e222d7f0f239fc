"""A pair of random-weight llama models of a real model's size, for timing where weights, not arithmetic, bound a step.

    python scripts/make_random_pair.py OUT_DIR --shape mistral-7b --quant Q4_K_M --drafter tinyllama-1b
    python scripts/make_random_pair.py OUT_DIR [--n-embd 2048] [--n-layer 16] [--n-ff 5632] [--quant Q4_0]

The demo pair (SmolLM2-135M) fits a CPU's caches, so its steps are bound by arithmetic
and a batch of 4 tokens costs about 4 tokens there. A 7B model is bound by reading its
weights, where a batch costs far less than its tokens. Nothing of that size can be
downloaded here, so this writes two random models of a chosen shape (a preset with
``--shape``, e.g. Mistral-7B's: 32 layers 4096 wide, 32 query and 8 KV heads, 14336 FFN,
32000 tokens), quantized with llama.cpp's quantizer, and ``OUT_DIR/models.toml`` naming them
pair ``random`` (and, with ``--drafter``, ``random-draft``: the same pair with a random model
of the drafter's shape drafting).

Each model is written tensor by tensor (gguf-py's writer, streaming: one tensor in memory at
a time) as F16 (norms F32) into a temporary file beside the output, then quantized; the F16
file (~14.5 GB for the 7B shape) is removed once quantized, so the disk must hold it once.
The two models have different random weights (seeds 1 and 2), in two files: their contexts
read twice the weights, as a real pair's do.

    DERA_MODELS=OUT_DIR/models.toml python scripts/bench_serve.py --pair random

The vocabulary is the tests' tiny SentencePiece one padded with filler words to the shape's
size, with a ChatML template. Their text is noise; only timings and memory mean anything
(no acceptance figures from a drafter of random weights).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from bench_decode import quiet_stderr  # noqa: E402
from tiny_models import CHAT_TEMPLATE, TinyVocab  # noqa: E402

from dera_gguf.convert.quantize import quantize_gguf  # noqa: E402

# name -> (n_embd, n_layer, n_head, n_head_kv, n_ff, n_vocab, n_ctx_train)
SHAPES = {
    "mistral-7b": (4096, 32, 32, 8, 14336, 32000, 32768),  # Mistral-7B-v0.1/v0.2
    "tinyllama-1b": (2048, 22, 32, 4, 5632, 32000, 2048),  # TinyLlama-1.1B: a drafter of the same vocabulary
    "small": (2048, 16, 32, 4, 5632, 0, 4096),  # ~0.7B, the tests' vocabulary (the earlier default)
}


def write_random_llama(path: Path, seed: int, shape: tuple, name: str) -> None:
    """A random llama model of ``shape`` (see :data:`SHAPES`) into ``path`` as F16, one tensor in memory at a time."""
    n_embd, n_layer, n_head, n_head_kv, n_ff, n_vocab, n_ctx_train = shape
    vocab = TinyVocab.default(n_vocab)
    head_dim = n_embd // n_head
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_bos_token_id(vocab.bos)
    w.add_eos_token_id(vocab.eos)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    n_vocab = len(vocab.tokens)
    tensors = [("token_embd.weight", (n_vocab, n_embd), np.sqrt(n_embd))]
    for i in range(n_layer):
        tensors += [
            (f"blk.{i}.attn_norm.weight", (n_embd,), None),
            (f"blk.{i}.attn_q.weight", (n_embd, n_embd), 1.0),
            (f"blk.{i}.attn_k.weight", (n_head_kv * head_dim, n_embd), 1.0),
            (f"blk.{i}.attn_v.weight", (n_head_kv * head_dim, n_embd), 1.0),
            (f"blk.{i}.attn_output.weight", (n_embd, n_embd), 1.0),
            (f"blk.{i}.ffn_norm.weight", (n_embd,), None),
            (f"blk.{i}.ffn_gate.weight", (n_ff, n_embd), 1.0),
            (f"blk.{i}.ffn_up.weight", (n_ff, n_embd), 1.0),
            (f"blk.{i}.ffn_down.weight", (n_embd, n_ff), 1.0),
        ]
    tensors += [("output_norm.weight", (n_embd,), None), ("output.weight", (n_vocab, n_embd), 3.0)]
    for tensor, dims, scale in tensors:
        dtype = np.float32 if scale is None else np.float16
        w.add_tensor_info(tensor, dims, np.dtype(dtype), int(np.prod(dims)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for _name, dims, scale in tensors:
        if scale is None:
            w.write_tensor_data(np.ones(dims, dtype=np.float32))
            continue
        data = rng.standard_normal(dims, dtype=np.float32)
        data *= np.float32(scale / np.sqrt(dims[-1]))
        w.write_tensor_data(data.astype(np.float16))
        del data
    w.close()


def make_model(out: Path, label: str, seed: int, shape: tuple, quant: str) -> Path:
    """``out/random-<label>-<quant>.gguf``: written as F16 beside it, quantized, the F16 removed."""
    final = out / f"random-{label}-{quant.lower()}.gguf"
    if final.exists():
        return final
    raw = out / f"random-{label}-f16.gguf.part"
    start = time.perf_counter()
    write_random_llama(raw, seed, shape, f"random-{label}")
    print(f"  {raw.name}: {raw.stat().st_size / 1e9:.2f} GB F16 in {time.perf_counter() - start:.0f} s", flush=True)
    start = time.perf_counter()
    partial = out / (final.name + ".part")
    with quiet_stderr():  # llama.cpp's quantizer logs every tensor
        quantize_gguf(raw, partial, quant)
    partial.rename(final)
    raw.unlink()
    print(f"  {final.name}: {final.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s", flush=True)
    return final


def f16_bytes(shape: tuple) -> int:
    """The F16 file's size (weights only) of a shape."""
    n_embd, n_layer, n_head, n_head_kv, n_ff, n_vocab, _ = shape
    n_vocab = n_vocab or len(TinyVocab.default().tokens)
    kv = n_head_kv * (n_embd // n_head)
    per_layer = 2 * n_embd * n_embd + 2 * kv * n_embd + 3 * n_ff * n_embd
    return 2 * (n_layer * per_layer + 2 * n_vocab * n_embd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES), help="a preset shape (else the options)")
    parser.add_argument("--n-embd", type=int, default=2048)
    parser.add_argument("--n-layer", type=int, default=16)
    parser.add_argument("--n-head-kv", type=int, default=4)
    parser.add_argument("--n-ff", type=int, default=5632)
    parser.add_argument("--n-vocab", type=int, default=0, help="tokens (0: the tests' tiny vocabulary)")
    parser.add_argument("--quant", default="Q4_0")
    parser.add_argument("--drafter", default=None, choices=sorted(SHAPES), help="also a random drafter of this shape")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[args.shape] if args.shape else (
        args.n_embd, args.n_layer, args.n_embd // 64, args.n_head_kv, args.n_ff, args.n_vocab, 4096
    )  # fmt: skip
    need, free = f16_bytes(shape), shutil.disk_usage(args.out).free
    print(f"shape {shape}: F16 file {need / 1e9:.1f} GB at a time; {free / 1e9:.1f} GB free on {args.out}", flush=True)
    if need > free * 0.9:
        raise SystemExit("not enough disk for the F16 file: free some, or pick another OUT_DIR")
    files = {}
    for role, seed in [("reference", 1), ("aligned", 2)]:
        files[role] = make_model(args.out, role, seed, shape, args.quant)
        print(f"{role}: {files[role]} ({files[role].stat().st_size / 1e9:.2f} GB)", flush=True)
    label = args.shape or f"{shape[1]} layers of {shape[0]}"
    toml = args.out / "models.toml"
    text = (
        "[pairs.random]\n"
        f'description = "random weights, {label} shape, {args.quant} (timing only)"\n'
        f'reference = {{ path = "{files["reference"]}" }}\n'
        f'aligned = [{{ path = "{files["aligned"]}" }}]\n'
    )
    if args.drafter:
        if SHAPES[args.drafter][5] != shape[5]:
            raise SystemExit("the drafter's vocabulary must be the pair's: pick a shape with as many tokens")
        drafter = make_model(args.out, f"drafter-{args.drafter}", 3, SHAPES[args.drafter], args.quant)
        print(f"drafter: {drafter} ({drafter.stat().st_size / 1e9:.2f} GB)")
        text += (
            "\n[pairs.random-draft]\n"
            f'description = "the random pair, a random {args.drafter} drafting (timing only)"\n'
            f'reference = {{ path = "{files["reference"]}" }}\n'
            f'aligned = [{{ path = "{files["aligned"]}" }}]\n'
            f'draft = {{ path = "{drafter}" }}\n'
        )
    toml.write_text(text)
    print(f"pairs in {toml}")


if __name__ == "__main__":
    main()
