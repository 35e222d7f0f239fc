"""The cost of dera-serve: a 64-token answer over HTTP against the same call on DeRaLlama directly,
and one request with a λ list against one request per λ.

    python scripts/bench_serve.py [--pair smollm2-demo] [--lam 1.5] [--tokens 64] [--rounds 10]
                                  [--choices 0,1,1.5,2]

A dera-serve process (this checkout's code) and an in-process DeRaLlama load the same
pair with the same settings. Each round asks both for the same greedy answer, once as
one JSON response and once streamed (SSE through the server, the chunk iterator
directly), in alternating order so that machine noise hits both alike. End-of-text
tokens are banned with logit_bias, so every answer is exactly ``--tokens`` long. The
per-round ratio server / direct is reported as the median over rounds; the answers of
both sides are checked to be equal.

In the same rounds, ``"lam": [0, 1, 1.5, 2]`` (one request, its choices decoded together)
is timed against the four requests at those λ sent one after the other, and the
choices are compared with the separate answers (equal up to llama.cpp's batch-shape
rounding: differing choices are counted, not fatal). ``--choices ''`` leaves this out.

Concurrent clients (``--clients 4``; 0 leaves this out): a second server with
``--parallel 1`` (one request at a time, as before slots) runs beside the main one
(``--parallel``, default 4). Each round times one client alone on each server (the
latency a lone user sees, slots against one at a time) and ``--clients`` clients at
different λ, each with its own prompt, streamed at once from each server: aggregate
completion tokens per second against one client alone on the same server, and how long
the last of them waited for its first token.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import httpx
import llama_cpp

from dera_gguf import DeRaLlama

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
CLIENT_PROMPTS = [  # one per concurrent client (cycled)
    "Describe a busy market in a mountain town.",
    "Explain how bicycles stay upright.",
    "Write a letter from a sailor to his sister.",
    "List the steps to bake bread at home.",
]
CLIENT_LAMS = [0.5, 1.0, 1.5, 2.0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(serve_args: list, log) -> tuple[subprocess.Popen, str]:
    """dera-serve (this checkout's code) with ``serve_args`` on a free local port; returns once it
    answers /v1/models."""
    port = free_port()
    command = [sys.executable, "-m", "dera_gguf.cli.serve", *serve_args, "--port", str(port)]
    process = subprocess.Popen(
        command, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"dera-serve did not start; its log is {log.name}")


def start_server(args: argparse.Namespace, log, parallel: int) -> tuple[subprocess.Popen, str]:
    command = ["--pair", args.pair, "--n-ctx", str(args.n_ctx), "--max-tokens", str(args.tokens)]
    command += ["--parallel", str(parallel)]
    command += ["--cache-size", args.cache_size, "--n-gpu-layers", str(args.n_gpu_layers)] + (
        ["--threads", str(args.threads)] if args.threads else []
    )
    return launch(command, log)


def direct(llm: DeRaLlama, settings: dict, stream: bool) -> tuple[float, str]:
    start = time.perf_counter()
    if stream:
        chunks = llm.create_chat_completion(MESSAGES, stream=True, **settings)
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    else:
        text = llm.create_chat_completion(MESSAGES, **settings)["choices"][0]["message"]["content"]
    return time.perf_counter() - start, text


def served(http: httpx.Client, body: dict, stream: bool) -> tuple[float, str]:
    start = time.perf_counter()
    if stream:
        pieces = []
        with http.stream("POST", "/v1/chat/completions", json=dict(body, stream=True)) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    pieces.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
        text = "".join(pieces)
    else:
        text = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    return time.perf_counter() - start, text


def choices_at_once(http: httpx.Client, body: dict, lams: list) -> tuple[float, list]:
    """One request with a λ list: its time and its choices' texts."""
    start = time.perf_counter()
    answer = http.post("/v1/chat/completions", json=dict(body, lam=lams)).json()
    if "choices" not in answer:
        raise SystemExit(f"the request with a lam list failed: {answer}")
    return time.perf_counter() - start, [c["message"]["content"] for c in answer["choices"]]


def one_by_one(http: httpx.Client, body: dict, lams: list) -> tuple[float, list]:
    """One request per λ, one after the other: the time of all, and their texts."""
    start = time.perf_counter()
    texts = [served(http, dict(body, lam=lam), False)[1] for lam in lams]
    return time.perf_counter() - start, texts


def at_once(url: str, bodies: list) -> tuple[float, list]:
    """Stream ``bodies`` at the same time (one connection each): the seconds until the last answer
    ended, and each client's seconds until its first token."""
    firsts = [None] * len(bodies)
    start = time.perf_counter()

    def ask(i: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            with http.stream("POST", "/v1/chat/completions", json=dict(bodies[i], stream=True)) as r:
                for line in r.iter_lines():
                    if firsts[i] is None and line.startswith("data: {") and '"content"' in line:
                        firsts[i] = time.perf_counter() - start

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(f is None for f in firsts):
        raise SystemExit("a concurrent request failed")
    return time.perf_counter() - start, firsts


def client_bodies(body: dict, n: int) -> list:
    return [
        dict(body, lam=CLIENT_LAMS[i % len(CLIENT_LAMS)], messages=[{"role": "user", "content": CLIENT_PROMPTS[i % 4]}])
        for i in range(n)
    ]


def concurrency_round(urls: dict, body: dict, n_clients: int, i: int) -> dict:
    """One round on each server (order alternated): one client alone, then ``n_clients`` at once."""
    out = {}
    for name in list(urls) if i % 2 == 0 else list(urls)[::-1]:
        with httpx.Client(base_url=urls[name], timeout=600) as http:
            out[(name, "alone")] = served(http, client_bodies(body, 1)[0], False)[0]  # (the first client's request)
        out[(name, "together")], out[(name, "first")] = at_once(urls[name], client_bodies(body, n_clients))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", default="smollm2-demo")
    parser.add_argument("--lam", type=float, default=1.5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--n-ctx", type=int, default=1024)
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--cache-size", default="2GB", help="dera-serve --cache-size (0: no prompt cache)")
    parser.add_argument("--choices", default="0,1,1.5,2", help="the λ list of one request ('' to leave it out)")
    parser.add_argument("--parallel", type=int, default=4, help="dera-serve --parallel of the main server")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (0: leave this out)")
    args = parser.parse_args()
    lams = [float(x) for x in args.choices.split(",")] if args.choices else []

    kw = dict(n_ctx=args.n_ctx, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers, verbose=False)
    llm = DeRaLlama.from_pair(args.pair, **kw)
    eog = [i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(llm._model.vocab, i)]
    settings = dict(lam=args.lam, temperature=0.0, max_tokens=args.tokens, logit_bias={i: -100.0 for i in eog})
    body = dict(settings, model=args.pair, messages=MESSAGES, logit_bias={str(i): -100.0 for i in eog})
    log = tempfile.NamedTemporaryFile("w", prefix="bench_serve_", suffix=".log", delete=False)
    process, url = start_server(args, log, args.parallel)
    urls = {f"parallel {args.parallel}": url}
    if args.clients:
        single, urls["parallel 1"] = start_server(args, log, 1)
    conc = []
    modes = {"json": False, "stream": True}
    times = {(mode, side): [] for mode in modes for side in ("direct", "server")}
    together, apart, differing, unequal = [], [], 0, {mode: 0 for mode in modes}
    try:
        with httpx.Client(base_url=url, timeout=600) as http:
            for stream in modes.values():  # warm-up: first calls build graphs, page weights in
                direct(llm, settings, stream), served(http, body, stream)
            if lams:  # (the first request with several choices makes their contexts)
                choices_at_once(http, body, lams)
            if args.clients:
                concurrency_round(urls, body, args.clients, 0)
            for i in range(args.rounds):
                for mode, stream in modes.items():
                    calls = [
                        ("direct", partial(direct, llm, settings, stream)),
                        ("server", partial(served, http, body, stream)),
                    ]
                    results = {side: call() for side, call in (calls if i % 2 == 0 else calls[::-1])}
                    unequal[mode] += results["direct"][1] != results["server"][1]  # (near-ties of a random pair)
                    for side, (seconds, _) in results.items():
                        times[(mode, side)].append(seconds)
                if lams:
                    calls = {"together": partial(choices_at_once, http, body, lams)}
                    calls["apart"] = partial(one_by_one, http, body, lams)
                    runs = {k: calls[k]() for k in (calls if i % 2 == 0 else reversed(list(calls)))}
                    (t1, a), (t2, b) = runs["together"], runs["apart"]
                    together.append(t1), apart.append(t2)
                    differing += sum(x != y for x, y in zip(a, b))
            for i in range(args.rounds if args.clients else 0):  # after the rest: 5 prompts would churn 4 slots
                conc.append(concurrency_round(urls, body, args.clients, i))
    finally:
        for proc in [process, *([single] if args.clients else [])]:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    print(f"pair {args.pair}, lam {args.lam:g}, {args.tokens}-token greedy answers, median of {args.rounds} rounds")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, threads {args.threads or 'default'}")
    print(f"server answers that differ from the direct call's: {unequal} of {args.rounds} each")
    for mode in modes:
        d, s = times[(mode, "direct")], times[(mode, "server")]
        ratio = statistics.median(b / a for a, b in zip(d, s))
        print(
            f"{mode:7s} direct {statistics.median(d):.3f} s   server {statistics.median(s):.3f} s   "
            f"ratio {ratio:.3f} (overhead {100 * (ratio - 1):+.1f}%)"
        )
    if lams:
        ratio = statistics.median(a / b for a, b in zip(together, apart))
        print(
            f"lam {args.choices}: one request {statistics.median(together):.3f} s   {len(lams)} requests "
            f"{statistics.median(apart):.3f} s   ratio {ratio:.3f}   "
            f"({differing} of {len(lams) * args.rounds} choices differ from the request alone)"
        )
    if args.clients:
        report_concurrency(conc, list(urls), args.clients, args.tokens)


def report_concurrency(rounds: list, names: list, n_clients: int, tokens: int) -> None:
    slots, single = names
    alone = statistics.median(r[(slots, "alone")] / r[(single, "alone")] for r in rounds)
    print(f"one client alone: {slots} / parallel 1 latency {alone:.3f} (median of per-round ratios)")
    for name in names:
        together = [r[(name, "together")] for r in rounds]
        by_one = [r[(name, "alone")] for r in rounds]
        speedup = statistics.median(n_clients * a / t for a, t in zip(by_one, together))
        rate = statistics.median(n_clients * tokens / t for t in together)
        last_first = statistics.median(max(r[(name, "first")]) for r in rounds)
        print(
            f"{name}: {n_clients} clients at once {rate:.1f} tok/s in all, {speedup:.2f}x one client alone "
            f"({statistics.median(together):.2f} s for all, {statistics.median(by_one):.2f} s alone); "
            f"the last client's first token after {last_first:.2f} s"
        )


if __name__ == "__main__":
    main()
