"""The pace of prompt-lookup drafts on real texts and a machine's measured step costs, simulated: for tuning the
pace (dera_gguf/speculation/pace.py) without the noise of timing every change on a shared CPU.

    python scripts/simulate_pace.py texts --pair qwen --lam 1.5 [--tokens 128]      # once: the greedy replies
    python scripts/simulate_pace.py run --texts FILE --costs 2:1.51,3:2.38,5:3.11,9:4.6 [--noise 0.05]

``texts``: DeRa's greedy replies without drafts to the tuning half of scripts/bench_prompts (the
held-out half is never read here), each reply's prompt and reply tokens, written to a JSON file in the
benchmark cache folder. Greedy replies with drafts are the same tokens (exact speculation), so which
drafts would pass is known from them without running the models again.

``run``: the engine's own speculation (:class:`~dera_gguf.speculation.verify.Speculation`, its pace, its
cost table) drafts for those texts, prompt by prompt as in scripts/bench_decode.py (one engine through
``--rounds`` rounds, then a fresh engine per prompt, its first reply), on a clock that advances by a
step's cost: a step verifying k rows costs ``--costs``'s k-row cost in one-row steps (linear between the
sizes given, and one whole step per row past the largest), each multiplied by a random factor of spread
``--noise``. Reported per category: time without drafts / time with them (the speed-up), drafted tokens
that passed, probes. The costs come from ``scripts/bench_verify.py --pair`` (the better plan per size)
or from the step costs a benchmark's engines measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_decode import CACHE, OPEN, chat_tokens, load_prompts, pair_files, run  # noqa: E402

from dera_gguf.speculation import costs, verify  # noqa: E402


def write_texts(args) -> None:
    from dera_gguf import DeRaLlama

    reference, aligned = pair_files(args.pair, args)
    llm = DeRaLlama(reference, aligned, lam=args.lam, n_ctx=1024, flash_attn=True, verbose=False)
    rows = []
    for i, p in enumerate(load_prompts("tuning")):
        prompt = chat_tokens(llm, p["prompt"])
        _, reply, _ = run(llm, prompt, args.tokens)
        rows.append({"category": p["category"], "prompt": prompt, "reply": [int(t) for t in reply]})
        print(f"  {i + 1}: {p['category']} {len(reply)} tokens", file=sys.stderr, flush=True)
    out = Path(args.out or CACHE / f"pace-texts-{args.pair}-lam{args.lam:g}.json")
    out.write_text(json.dumps(rows))
    print(f"wrote {out}")


class Clock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def step_cost(table: dict, noise: float, rng: np.random.Generator):
    """``cost(k)``: a k-row step's seconds (a one-row step: 1), linear between the sizes of ``table``."""
    sizes = sorted({1: 1.0, **table}.items())
    ks, vs = [k for k, _ in sizes], [v for _, v in sizes]

    def cost(k: int) -> float:
        base = float(np.interp(k, ks, vs)) if k <= ks[-1] else vs[-1] + (k - ks[-1])
        return base * (float(rng.lognormal(0.0, noise)) if noise else 1.0)

    return cost


def one_reply(spec, clock: Clock, prompt: list, reply: list, cost) -> tuple:
    """Simulated ``generate()`` of ``reply`` after ``prompt`` (timed from its first token, as bench_decode):
    (seconds with the speculation drafting, its drafted tokens, those that passed)."""
    text = np.array(prompt + reply, dtype=np.intc)
    spec.restart()
    pos, end = len(prompt) + 1, len(text)  # the first draft call follows the first token (sampled after the prompt)
    start, drafted, passed = clock.now, spec.stats.drafted, spec.stats.accepted
    while pos < end:
        draft = spec(text[:pos])
        got = text[pos : pos + len(draft)]
        ok = int(np.cumprod(draft[: len(got)] == got).sum()) if len(draft) else 0
        clock.now += cost(1 + len(draft))
        pos += ok + 1
    spec(text[:end])  # the call that times the last step
    return clock.now - start, spec.stats.drafted - drafted, spec.stats.accepted - passed


def simulate(rows: list, args) -> None:
    clock = Clock()
    verify.time = SimpleNamespace(perf_counter=clock.perf_counter)  # the speculation reads this clock
    table = {int(k): float(v) for k, v in (x.split(":") for x in args.costs.split(","))}
    rng = np.random.default_rng(args.seed)
    cost = step_cost(table, args.noise, rng)
    new = lambda: verify.Speculation(verify.NgramLookup(), room=lambda n: 64, key=lambda: "simulated")  # noqa: E731
    costs.forget()
    if args.known_costs:  # every size measured already (no probes needed): what the decisions alone give
        table_ = costs.step_costs(("simulated", "lookup"))
        for _ in range(10):
            for k in range(1, 18):
                table_.record(k, cost(k) if k > 1 else 1.0)
    if args.keep_acceptance:  # acceptance carried from one text to the next instead of learned again
        verify.Pace.new_text = lambda self: None
    spec, results = new(), []
    for r in range(args.rounds):
        for row in rows:
            seconds, drafted, passed = one_reply(spec, clock, row["prompt"], row["reply"], cost)
            plain = sum(cost(1) for _ in range(len(row["reply"]) - 1))
            results.append((r, row["category"], plain, seconds, drafted, passed))
    fresh = []
    for row in rows:
        costs.forget()
        seconds, drafted, passed = one_reply(new(), clock, row["prompt"], row["reply"], cost)
        plain = sum(cost(1) for _ in range(len(row["reply"]) - 1))
        fresh.append((row["category"], plain, seconds, drafted))
    report(results, fresh, args)


def report(results: list, fresh: list, args) -> None:
    categories = list(dict.fromkeys(c for _, c, *_ in results))
    groups = {c: [c] for c in categories}
    groups["open-ended"] = [c for c in categories if c in OPEN]
    groups["copy-heavy"] = [c for c in categories if c not in OPEN]
    print(f"costs {args.costs}, noise {args.noise}, {args.rounds} round(s); speed-up = time without drafts / with")
    for group, members in groups.items():
        per_round = []
        for r in range(args.rounds):
            pick = [x for x in results if x[0] == r and x[1] in members]
            per_round.append(sum(x[2] for x in pick) / sum(x[3] for x in pick))
        pick = [x for x in results if x[1] in members]
        passed, drafted = sum(x[5] for x in pick), sum(x[4] for x in pick)
        first = [x for x in fresh if x[0] in members]
        fresh_ratio = sum(x[1] for x in first) / sum(x[2] for x in first)
        rounds = " ".join(f"{x:.3f}" for x in per_round)
        print(
            f"  {group:12s} x{statistics.median(per_round):.3f} (rounds {rounds})  {passed}/{drafted} passed"
            f"  fresh x{fresh_ratio:.3f} ({sum(x[3] for x in first)} drafted)"
        )
    for key, table in costs.measured().items():
        print(f"  measured {key}: {{{', '.join(f'{k}: {v:.2f} ({n})' for k, (v, n) in table.sizes().items())}}}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["texts", "run"])
    parser.add_argument("--pair", default="qwen", help="texts: a pair of scripts/bench_decode.py")
    parser.add_argument("--lam", type=float, default=1.5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", default=None)
    parser.add_argument("--texts", default=None, help="run: the texts file")
    parser.add_argument("--costs", default="2:2,9:9", help="run: k-row step costs in one-row steps, k:cost,...")
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--known-costs", action="store_true", help="every batch size measured from the start")
    parser.add_argument("--keep-acceptance", action="store_true", help="acceptance not learned again per text")
    args = parser.parse_args()
    args.model = args.aligned = None
    if args.what == "texts":
        return write_texts(args)
    simulate(json.loads(Path(args.texts).read_text()), args)


if __name__ == "__main__":
    main()
