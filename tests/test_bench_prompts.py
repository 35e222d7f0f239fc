"""The benchmark's prompts (issue 23): two fixed halves, and the held-out half never read by tuning.

The pace (:mod:`dera_gguf.speculation.pace`) is tuned on scripts/bench_prompts/tuning.jsonl; every speed
claim about speculation is made on held_out.jsonl. These tests keep the halves apart: alike in
categories, no prompt near-copied across them, and nothing but the benchmark's reporting naming
the held-out file.
"""

from __future__ import annotations

import difflib
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "scripts" / "bench_prompts"
OPEN = {"chat", "explain", "creative"}
COPY = {"spelling", "quote", "reformat", "list-edit", "code-comment", "json-csv"}

sys.path.insert(0, str(ROOT / "scripts"))


def read(split: str) -> list:
    with open(PROMPTS / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_the_halves_hold_every_category_alike():
    tuning, held_out = read("tuning"), read("held_out")
    assert len(tuning) + len(held_out) >= 40
    per_category = lambda rows: Counter(r["category"] for r in rows)
    assert per_category(tuning) == per_category(held_out)
    assert set(per_category(tuning)) == OPEN | COPY
    for row in tuning + held_out:
        assert row["group"] == ("open" if row["category"] in OPEN else "copy")
        assert row["prompt"].strip()


def test_no_prompt_of_one_half_is_a_near_copy_of_one_in_the_other():
    tuning, held_out = read("tuning"), read("held_out")
    for a in tuning:
        for b in held_out:
            similarity = difflib.SequenceMatcher(None, a["prompt"], b["prompt"]).ratio()
            assert similarity < 0.7, (a["prompt"][:60], b["prompt"][:60])


@pytest.fixture
def opened():
    """Paths opened while the fixture is active (an audit hook; hooks cannot be removed, so it is switched off)."""
    paths, active = [], [True]

    def hook(event, args):
        if active[0] and event == "open" and args and isinstance(args[0], (str, Path)):
            paths.append(str(args[0]))

    sys.addaudithook(hook)
    yield paths
    active[0] = False


def test_a_tuning_run_reads_the_tuning_half_only(opened):
    import bench_decode

    prompts = bench_decode.load_prompts("tuning")
    assert [p["prompt"] for p in prompts] == [p["prompt"] for p in read("tuning")]
    assert any(path.endswith("tuning.jsonl") for path in opened)
    assert not any("held_out" in path for path in opened)


def test_nothing_but_the_benchmark_names_the_held_out_half():
    """The engine and every other script (the pace's tuning among them) never name the held-out file."""
    naming = [
        path.relative_to(ROOT).as_posix()
        for folder in ("dera_gguf", "scripts")
        for path in (ROOT / folder).rglob("*.py")
        if "held_out" in path.read_text(encoding="utf-8")
    ]
    assert naming == ["scripts/bench_decode.py"]
