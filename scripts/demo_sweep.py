"""The demo table of docs/demo-pair.md: greedy answers of the smollm2-demo pair to the held-out prompts.

    python scripts/demo_sweep.py [--lams 0,0.5,1,2] [--out runs/demo] [--limit N]
    python scripts/demo_sweep.py --write-prompts heldout.jsonl   # only the prompts, for dera-eval

For each lam: mean answer length in tokens, the share of answers whose length lies
in the adapter's training range [L_min, L_max] (the length reward of eq. 10 is 0
there, -1 outside) and the mean per-token KL to the reference. Prints a Markdown
table and an example answer at the smallest and the largest lam. Runs through
``dera_gguf.eval.generate``, so an interrupted run resumes from --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from dera_gguf.eval import EvalPair, LengthReward, SamplingParams, generate
from dera_gguf.eval.data import read_rows
from dera_gguf.pairs.registry import load_registry

DATA = Path(__file__).parents[1] / "dera_gguf" / "data"


def heldout_prompts(path: Path) -> Path:
    """Write the held-out prompts as chat messages (the pair is an instruct model)."""
    rows = [json.loads(line) for line in (DATA / "demo_prompts.jsonl").read_text().splitlines() if line.strip()]
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            if row["split"] == "heldout":
                f.write(json.dumps({"messages": [{"role": "user", "content": row["prompt"]}]}) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lams", default="0,0.5,1,2")
    parser.add_argument("--out", default="runs/demo-sweep")
    parser.add_argument("--limit", type=int, default=None, help="only the first N held-out prompts")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--write-prompts",
        metavar="PATH",
        default=None,
        help="only write the held-out prompts (chat messages, one per line) to PATH and stop",
    )
    args = parser.parse_args()
    if args.write_prompts:
        print(heldout_prompts(Path(args.write_prompts)))
        return
    card = json.loads((DATA / "smollm2-demo-dpo-lora.json").read_text())
    l_min, l_max = card["length_range"]
    lams = [float(x) for x in args.lams.split(",")]
    os.makedirs(args.out, exist_ok=True)
    prompts = heldout_prompts(Path(args.out) / "heldout_prompts.jsonl")
    ref, aligned = load_registry().get("smollm2-demo").resolve()
    start = time.perf_counter()
    with EvalPair(ref, aligned, n_ctx=1024, n_threads=args.threads) as pair:
        result = generate(
            pair,
            read_rows(str(prompts), "generate", args.limit),
            lams,
            out_dir=args.out,
            params=SamplingParams(temperature=0.0, max_tokens=args.max_tokens),
            reward=LengthReward(l_min, l_max),
            progress=True,
        )
    print(
        f"\n{result.summary[0]['n']} held-out prompts, greedy, "
        f"max {args.max_tokens} new tokens, {time.perf_counter() - start:.0f} s on {platform.machine()} "
        f"with {os.cpu_count()} CPUs\n"
    )
    print(f"| λ | mean length (tokens) | share in [{l_min}, {l_max}] | mean KL to reference (per token) |")
    print("|---|---|---|---|")
    for row in result.summary:
        share = 1.0 + row["mean_reward"]  # the reward is 0 inside the range, -1 outside
        print(
            f"| {row['lam']:g} | {row['mean_length_tokens']:.1f} ± {row['mean_length_tokens_stderr']:.1f} "
            f"| {share:.2f} | {row['mean_kl_to_reference']:.3f} |"
        )
    samples = [json.loads(line) for line in open(Path(args.out) / "samples.jsonl", encoding="utf-8")]
    first = samples[0]["row"]
    for lam in (min(lams), max(lams)):
        answer = next(s for s in samples if s["row"] == first and s["lam"] == lam)
        print(f"\nλ = {lam:g} ({answer['length_tokens']} tokens): {answer['response'].strip()}")


if __name__ == "__main__":
    main()
