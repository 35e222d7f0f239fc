"""dera-serve's prompt cache: coming back to a long conversation after another one.

    python scripts/bench_sessions.py [--pair smollm2-demo] [--lam 1.5] [--words 700] [--rounds 3]

Two dera-serve processes (this checkout's code) on the same pair, one with its prompt cache
(the default, --cache-size 2GB) and one without (--cache-size 0). Each round sends both, in
alternating order, conversation A (about --words words of earlier turns, ~1,000 tokens),
then conversation B (as long), then A again with one new user turn, each streamed and greedy.
The time to the first streamed chunk of A's return is compared with that of A's first
visit (prompt processing plus one token), for each server, and whether the two servers gave
the same answers is counted: without the cache, A's earlier answer is recomputed in prompt
batches instead of token by token, and CPU logits differ in their last digits between batch
shapes, so a greedy near-tie may go the other way (as for a plain llama_cpp.Llama with or
without its cache). Every round writes new texts, so nothing is shared across rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import tempfile
import time

import httpx
from bench_serve import launch

WORDS = (
    "the river mountain city garden window morning evening letter journey harbor lantern forest "
    "village teacher student music silence winter summer bridge market story travel question answer "
    "quiet bright slowly carefully remember explain describe because although during between across"
).split()


def text(rng: random.Random, n_words: int) -> str:
    """Sentences of plain words: ``n_words`` words, no two rounds alike."""
    words = [rng.choice(WORDS) for _ in range(n_words)]
    sentences = [" ".join(words[i : i + 12]).capitalize() + "." for i in range(0, n_words, 12)]
    return " ".join(sentences)


def conversation(rng: random.Random, n_words: int) -> list:
    """Earlier turns of about ``n_words`` words in all, ending with a user message."""
    turns = []
    for _ in range(3):
        turns += [
            {"role": "user", "content": "Summarise this: " + text(rng, n_words // 6)},
            {"role": "assistant", "content": text(rng, n_words // 6)},
        ]
    return turns + [{"role": "user", "content": "What is the main idea?"}]


def start_server(pair: str, cache: str, n_ctx: int, threads, log) -> tuple[subprocess.Popen, str]:
    command = ["--pair", pair, "--n-ctx", str(n_ctx), "--cache-size", cache]
    return launch(command + (["--threads", str(threads)] if threads else []), log)


def ask(http: httpx.Client, body: dict) -> tuple[float, str, int]:
    """Seconds to the first streamed chunk, the whole answer, and the prompt's tokens."""
    start, first, pieces, prompt_tokens = time.perf_counter(), None, [], 0
    body = dict(body, stream=True, stream_options={"include_usage": True})
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                first = first or time.perf_counter() - start
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    pieces.append(chunk["choices"][0]["delta"].get("content") or "")
                if chunk.get("usage"):
                    prompt_tokens = chunk["usage"]["prompt_tokens"]
    return first, "".join(pieces), prompt_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", default="smollm2-demo")
    parser.add_argument("--lam", type=float, default=1.5)
    parser.add_argument("--words", type=int, default=700)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--n-ctx", type=int, default=4096)
    args = parser.parse_args()

    log = tempfile.NamedTemporaryFile("w", prefix="bench_sessions_", suffix=".log", delete=False)
    servers = {
        name: start_server(args.pair, size, args.n_ctx, args.threads, log)
        for name, size in (("cache", "2GB"), ("no cache", "0"))
    }
    ratios = {name: [] for name in servers}
    firsts = {name: [] for name in servers}
    same = []  # whether both servers gave the same answers in a round
    try:
        clients = {name: httpx.Client(base_url=url, timeout=600) for name, (_, url) in servers.items()}
        for i in range(args.rounds):
            rng = random.Random(i)
            a, b = conversation(rng, args.words), conversation(rng, args.words)
            body = dict(model=args.pair, lam=args.lam, temperature=0.0, max_tokens=args.tokens)
            answers = {}
            for name in sorted(clients, reverse=i % 2 == 1):  # alternate which server goes first
                http = clients[name]
                t_first, answer_a, n_tokens = ask(http, dict(body, messages=a))
                ask(http, dict(body, messages=b))
                back = a + [{"role": "assistant", "content": answer_a}, {"role": "user", "content": "And then?"}]
                t_back, answer_back, _ = ask(http, dict(body, messages=back))
                answers[name] = (answer_a, answer_back)
                ratios[name].append(t_back / t_first)
                firsts[name].append(t_first)
            same.append(len(set(answers.values())) == 1)
            print(
                f"round {i}: conversation of {n_tokens} tokens; return / first visit: "
                + ", ".join(f"{n} {ratios[n][-1]:.3f}" for n in ratios)
                + f"; same answers: {same[-1]}",
                flush=True,
            )
    finally:
        for process, _ in servers.values():
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    print(
        f"pair {args.pair}, lam {args.lam:g}, ~{args.words}-word conversations, {args.rounds} rounds, "
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(f"same answers with and without the cache: {sum(same)} of {len(same)} rounds")
    for name in ratios:
        print(
            f"{name:9s} first visit {statistics.median(firsts[name]):.2f} s to the first chunk; "
            f"return / first visit: median {statistics.median(ratios[name]):.3f}"
        )


if __name__ == "__main__":
    main()
