"""dera-eval through click's CliRunner: files written, best λ printed, errors in one line."""

from __future__ import annotations

import csv
import json
import sys

import pytest
from chat_driver import default_sigint
from click.testing import CliRunner
from eval_fixtures import write_jsonl

from dera_gguf.cli.eval import main

PREFS = [
    {"prompt": "hello world, tell me", "chosen": " about the cat", "rejected": " the dog is long"},
    {"prompt": "write a short answer:", "chosen": " the sun", "rejected": " rain, rain"},
]


def models(ref_path, aligned_path):
    return ["--ref", str(ref_path), "--aligned", str(aligned_path), "--n-ctx", "256", "--threads", "1"]


def test_score_writes_summaries_and_prints_the_best_lam(ref_path, aligned_path, tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", PREFS + ["{broken"])
    out = tmp_path / "out"
    args = [
        "score",
        *models(ref_path, aligned_path),
        "--data",
        data,
        "--lams",
        "0,1,2",
        "--out",
        str(out),
        "--metric",
        "mean_logprob_chosen",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert [e["lam"] for e in summary] == [0.0, 1.0, 2.0] and all(e["n"] == 2 for e in summary)
    for key in ("pairwise_accuracy", "mean_logprob_chosen", "mean_logprob_rejected", "mean_kl_to_reference"):
        assert key in summary[0] and f"{key}_stderr" in summary[0]
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["lam"]) for r in rows] == [0.0, 1.0, 2.0]
    assert float(rows[1]["mean_logprob_chosen"]) == pytest.approx(summary[1]["mean_logprob_chosen"])
    best = max(summary, key=lambda e: e["mean_logprob_chosen"])
    assert f"best lam by mean_logprob_chosen: {best['lam']:g}" in result.output
    assert "line 3" in result.output and "skipped 1" in result.output
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"

    again = CliRunner().invoke(main, args)  # a re-run computes nothing new
    assert again.exit_code == 0 and "reused 6" in again.output
    assert len((out / "results.jsonl").read_text().splitlines()) == 6


def test_without_matplotlib_the_rest_runs(ref_path, aligned_path, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    data = write_jsonl(tmp_path / "prefs.jsonl", PREFS[:1])
    result = CliRunner().invoke(
        main,
        ["score", *models(ref_path, aligned_path), "--data", data, "--lams", "0,1", "--out", str(tmp_path / "out")],
    )
    assert result.exit_code == 0, result.output
    assert "pip install 'dera-gguf[plot]'" in result.output
    assert (tmp_path / "out" / "summary.json").exists() and not (tmp_path / "out" / "sweep.png").exists()


def test_generate_with_a_reward_function(ref_path, aligned_path, tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def count_a(prompt, response):\n    return float(response.count('a'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p["prompt"]} for p in PREFS])
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "generate",
            *models(ref_path, aligned_path),
            "--prompts",
            data,
            "--lams",
            "0,1.5",
            "--out",
            str(out),
            "--max-tokens",
            "8",
            "--reward",
            "my_rewards:count_a",
            "--seed",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4
    for s in samples:
        assert s["reward"] == float(s["response"].count("a"))
    summary = json.loads((out / "summary.json").read_text())
    assert {"mean_length_tokens", "mean_reward", "mean_kl_to_reference"} <= set(summary[0])
    assert "best lam by mean_reward" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data", "MISSING"], "cannot read"),
        (["--lams", "0,x"], "lam 'x' is not a number"),
        (["--metric", "nope"], "--metric nope"),
    ],
)
def test_errors_are_one_line(ref_path, aligned_path, tmp_path, args, message):
    data = write_jsonl(tmp_path / "prefs.jsonl", PREFS)
    base = {"--data": data, "--lams": "0,1", "--out": str(tmp_path / "out")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = str(tmp_path / value) if value == "MISSING" else value
    flat = [x for kv in base.items() for x in kv]
    result = CliRunner().invoke(main, ["score", *models(ref_path, aligned_path), *flat])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_several_aligned_models_are_refused_in_one_line(ref_path, aligned_path, aligned2_path, tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", PREFS)
    result = CliRunner().invoke(
        main,
        [
            "score",
            *models(ref_path, aligned_path),
            "--aligned",
            str(aligned2_path),
            "--data",
            data,
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 1 and "one aligned model, got 2" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_other_settings_in_the_same_out_are_refused(ref_path, aligned_path, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hello"}])
    common = [
        "generate",
        *models(ref_path, aligned_path),
        "--prompts",
        data,
        "--lams",
        "1",
        "--out",
        str(tmp_path / "out"),
        "--max-tokens",
        "4",
    ]
    assert CliRunner().invoke(main, common).exit_code == 0
    result = CliRunner().invoke(main, common + ["--temperature", "0.2"])
    assert result.exit_code == 1 and "other settings" in result.output and "temperature" in result.output


def test_ctrl_c_loses_nothing_written(ref_path, aligned_path, tmp_path):
    """Interrupt a real dera-eval process mid-run; the re-run recomputes none of what it wrote."""
    import os
    import signal
    import subprocess
    import time

    rows = [
        {"prompt": f"question {i}: tell me about the cat", "chosen": " the cat is short", "rejected": " a dog"}
        for i in range(400)
    ]
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "dera_gguf.cli.eval",
        "score",
        *models(ref_path, aligned_path),
        "--data",
        data,
        "--lams",
        "0,1",
        "--out",
        str(out),
        "--no-progress",
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
    results = out / "results.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not results.exists() or len(results.read_bytes().splitlines()) < 20):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    written = results.read_text().splitlines()
    if len(written) == 2 * len(rows):
        pytest.skip("the run finished before it could be interrupted")
    assert written and all(json.loads(line) for line in written)
    done = len(written) // 2 * 2  # whole rows
    result = CliRunner().invoke(main, args[3:])
    assert result.exit_code == 0, result.output
    final = results.read_text().splitlines()
    assert len(final) == 2 * len(rows) and final[: len(written)] == written
    assert f"reused {done}" in result.output or f"reused {len(written)}" in result.output


def test_generate_speculative_lookup_counts_its_drafts(ref_path, aligned_path, tmp_path):
    """--speculative lookup reaches every sequence: records count drafted and passed tokens, and the
    line on stderr sums them (exactness: tests/test_eval_generate.py, against plain Llamas)."""
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a b c a b c a b c a b c"}, {"prompt": "one two one two"}])
    out = tmp_path / "out"
    args = ["generate", *models(ref_path, aligned_path), "--prompts", data, "--lams", "0.5,1.5"]
    args += ["--out", str(out), "--max-tokens", "32", "--temperature", "0", "--speculative", "lookup"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    drafted, accepted = sum(s["drafted"] for s in samples), sum(s["accepted"] for s in samples)
    assert 0 < accepted <= drafted
    assert f"speculation: {drafted} drafted tokens in 4 responses, {accepted} passed" in result.output


def test_generate_refuses_an_unknown_kind_of_draft(ref_path, aligned_path, tmp_path):
    from dera_gguf import DeRaError
    from dera_gguf.eval import generate

    with pytest.raises(DeRaError, match="speculative must be None or 'lookup'"):
        generate(ref_path, write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}]), [1.0], speculative="model")
