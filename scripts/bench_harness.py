"""Cost of a `dera-eval harness` λ sweep against one λ, side by side.

    python scripts/bench_harness.py [--rounds 2] [--docs 40] [--gen-docs 6] [--lams 11]

Two tasks written here (local JSON data and task YAMLs in a temporary folder) from the demo pair's
training prompts (dera_gguf/data/demo_prompts.jsonl): a multiple-choice task (log-likelihoods, four
choices each) and a generation task (greedy, up to 48 tokens). Each is run through
:func:`dera_gguf.eval.harness_run.harness` on the demo pair (smollm2-demo, loaded once) at one λ
(1.5) and at ``--lams`` values spread over [0, 2], in alternating order round by round so that
machine noise hits both alike; medians are reported.

Targets (issue 31): an 11-λ sweep of a log-likelihood task costs at most 1.3x one λ's run; an
11-λ generation sweep costs less than 11 single runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from dera_gguf.eval import EvalPair
from dera_gguf.eval.harness_run import harness
from dera_gguf.pairs.registry import load_registry

HERE = Path(__file__).resolve().parent
CHOICES = ["yes", "no", "maybe", "it depends"]


def write_tasks(folder: Path, n_docs: int, n_gen: int) -> None:
    lines = (HERE.parent / "dera_gguf" / "data" / "demo_prompts.jsonl").read_text().splitlines()
    prompts = [row["prompt"] for row in map(json.loads, lines) if row["split"] == "train"]
    mc = [{"question": p, "choices": CHOICES, "answer": i % len(CHOICES)} for i, p in enumerate(prompts * 4)][:n_docs]
    gen = [{"question": p, "answer": ""} for p in prompts[:n_gen]]
    for name, rows in (("mc", mc), ("gen", gen)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (folder / "b_mc.yaml").write_text(
        "task: b_mc\n" + head.format(folder / "mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    (folder / "b_gen.yaml").write_text(
        "task: b_gen\n" + head.format(folder / "gen.jsonl") + "output_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: 48\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )


def timed(pair, lams, task, folder) -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        harness(pair, lams, [task], out, include_path=str(folder))
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--docs", type=int, default=40, help="multiple-choice documents")
    parser.add_argument("--gen-docs", type=int, default=6, help="generation documents")
    parser.add_argument("--lams", type=int, default=11, help="λ values of the sweep, spread over [0, 2]")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sweep = [round(2 * i / (args.lams - 1), 3) for i in range(args.lams)]
    ref, aligned = load_registry().get("smollm2-demo").resolve()
    print(f"pair smollm2-demo; machine: {platform.machine()}, {os.cpu_count()} CPUs; {args.lams} λ vs λ 1.5")
    with tempfile.TemporaryDirectory() as folder, EvalPair(ref, aligned[0], n_ctx=1024) as pair:
        write_tasks(Path(folder), args.docs, args.gen_docs)
        for task, target in (("b_mc", "<= 1.3x one λ"), ("b_gen", f"< {args.lams}x one λ")):
            one, many = [], []
            for r in range(args.rounds):
                order = [("one", [1.5]), ("many", sweep)][:: 1 if r % 2 == 0 else -1]
                for name, lams in order:
                    (one if name == "one" else many).append(timed(pair, lams, task, Path(folder)))
            ratio = statistics.median(m / o for m, o in zip(many, one))
            print(
                f"{task}: one λ {statistics.median(one):.1f} s, {args.lams} λ {statistics.median(many):.1f} s, "
                f"ratio {ratio:.2f} (target {target}; median of {args.rounds} rounds)"
            )


if __name__ == "__main__":
    main()
