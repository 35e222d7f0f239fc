"""The thread plan chosen by measurement against the two fixed plans, on a pair, in one run.

    python scripts/bench_threads.py --pairs qwen [--lam 1.5] [--tokens 64] [--rounds 2] [--prompts 6]
    python scripts/bench_threads.py --model REFERENCE --aligned ALIGNED

Three engines of one pair: ``concurrent=True`` (the contexts decode at the same time, each on its
share of the threads), ``concurrent=False`` (one after the other, each on all threads) and the
default, ``concurrent=None``, which times both per batch size and runs the faster
(dera_gguf/runtime/threads.py). Two workloads, each prompt's contenders run one after the other in
an order reversed every other prompt and round (noise hits all alike):

* one reply (greedy, timed from its first token): one-row steps;
* four answers of one prompt at four λ decoded together (the path of a request with a λ list and of
  dera-serve's slots): four-row steps.

Reported: tokens per second of each plan, and the measured plan over the better fixed plan (the
target: never more than 3 % slower); then what the measured plan chose per batch size. Prompts: the
first ``--prompts`` of the tuning half of scripts/bench_prompts (any text does: the plan does not
depend on it).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import chat_tokens, load_prompts, pair_files, progress, run  # noqa: E402

from dera_gguf import DeRaLlama  # noqa: E402
from dera_gguf.batch.sequence import Sequence  # noqa: E402
from dera_gguf.batch.together import decode_together  # noqa: E402
from dera_gguf.blend import mixing_weights  # noqa: E402
from dera_gguf.sampling.chains import new_chain  # noqa: E402
from dera_gguf.sampling.settings import Sampling  # noqa: E402

PLANS = {"concurrent": True, "sequential": False, "measured": None}
CHOICE_LAMS = (0.5, 1.0, 1.5, 2.0)


def together(llm: DeRaLlama, prompt: list, tokens: int) -> tuple:
    """(seconds after the first step, tokens after it): four greedy answers at CHOICE_LAMS decoded together."""
    runtime = llm.sequences(len(CHOICE_LAMS), len(prompt) + len(CHOICE_LAMS) * tokens + 64)
    try:
        seqs = [Sequence(mixing_weights(lam), new_chain(Sampling(temperature=0.0), 0)) for lam in CHOICE_LAMS]
        for seq in seqs:
            seq.max_tokens = tokens
        start, steps = None, 0
        for _ in decode_together(runtime, prompt, seqs, llm.is_eog):
            if start is None:
                start, steps = time.perf_counter(), 0
            else:
                steps += 1
        made = sum(len(seq.tokens) for seq in seqs) - len(seqs)
        return time.perf_counter() - start, made
    finally:
        runtime.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="qwen", help="a pair of scripts/bench_decode.py")
    parser.add_argument("--model", default=None)
    parser.add_argument("--aligned", default=None)
    parser.add_argument("--lam", type=float, default=1.5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None, help="n_threads (default: the physical cores)")
    args = parser.parse_args()
    reference, aligned = pair_files("custom" if args.model else args.pairs, args)
    kw = dict(n_ctx=1024, flash_attn=True, verbose=False, n_threads=args.threads)
    llms = {name: DeRaLlama(reference, aligned, lam=args.lam, concurrent=c, **kw) for name, c in PLANS.items()}
    prompts = load_prompts("tuning")
    step = max(1, len(prompts) // args.prompts)
    prompts = [chat_tokens(llms["measured"], p["prompt"]) for p in prompts[::step][: args.prompts]]
    print(
        f"{Path(reference).name} + {Path(aligned).name}, lam {args.lam:g}, {args.tokens} tokens, {len(prompts)} "
        f"prompts x {args.rounds} rounds; {platform.machine()}, {os.cpu_count()} CPUs, "
        f"threads {llms['measured'].runtime.threads.n_threads}"
    )
    for llm in llms.values():  # warm-up (page weights in, build graphs)
        run(llm, chat_tokens(llm, "Say hello."), 8)
    work = {"one reply": lambda llm, p: run(llm, p, args.tokens)[:2], "4 lams together": None}
    work["4 lams together"] = lambda llm, p: together(llm, p, args.tokens)
    for name, job in work.items():
        times = {plan: [] for plan in PLANS}
        for r in range(args.rounds):
            for i, prompt in enumerate(prompts):
                order = list(PLANS) if (r + i) % 2 == 0 else list(PLANS)[::-1]
                for plan in order:
                    seconds, out = job(llms[plan], prompt)
                    made = out if isinstance(out, int) else len(out) - 1
                    times[plan].append((seconds, made))
                progress(f"{name}: round {r + 1}, prompt {i + 1}")
        rate = {plan: sum(t for _, t in v) / sum(s for s, _ in v) for plan, v in times.items()}
        paired = statistics.median(
            (m[1] / m[0]) / max(c[1] / c[0], s[1] / s[0])
            for m, c, s in zip(times["measured"], times["concurrent"], times["sequential"])
        )
        cells = "  ".join(f"{plan} {rate[plan]:.2f} tok/s" for plan in PLANS)
        best = max(rate["concurrent"], rate["sequential"])
        print(f"{name:16s} {cells}  measured / better fixed: {rate['measured'] / best:.3f} (paired {paired:.3f})")
    for (contexts, rows), (plan, conc, seq) in llms["measured"].runtime.threads.chosen().items():
        fmt = lambda x: "-" if x is None else f"{x * 1e3:.1f}"  # noqa: E731
        print(
            f"  measured plan, {contexts} contexts, batches of <= {rows} rows: "
            f"{'concurrent' if plan else 'sequential'} (ms per row: concurrent {fmt(conc)}, sequential {fmt(seq)})"
        )
    for llm in llms.values():
        llm.close()


if __name__ == "__main__":
    main()
