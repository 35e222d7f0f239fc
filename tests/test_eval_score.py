"""dera-eval score against an independent computation: plain llama_cpp.Llama logits blended in numpy."""

from __future__ import annotations

import json

import jinja2
import numpy as np
import pytest
import reference as R
from eval_fixtures import pair, plain_pair, write_jsonl  # noqa: F401 (fixtures)
from tiny_models import CHAT_TEMPLATE, write_tiny_lora

from dera_gguf import DeRaError
from dera_gguf.eval import EvalPair, read_rows, score

LAMS = [-0.5, 0.0, 0.4, 1.0, 1.7, 3.0]
ROWS = [
    {"prompt": "hello world, tell me", "chosen": " about the cat", "rejected": " the dog is long and short"},
    {"prompt": "write a short answer:", "chosen": " the sun", "rejected": " rain, rain, rain"},
    {
        "messages": [{"role": "user", "content": "tell me about the dog"}],
        "chosen": "a dog is a model",
        "rejected": "please write",
    },
    {"prompt": "question: cat or dog?", "chosen": " dog", "rejected": " cat!"},
]


def reference_stats(models, prompt: str, response: str, lams):
    """Per lam: mean log-prob of the response tokens and mean KL(p_lam || ref) along them (float64)."""
    n_prompt = len(models[0].tokenize(prompt.encode(), add_bos=True, special=True))
    tokens = models[0].tokenize((prompt + response).encode(), add_bos=True, special=True)
    for m in models:
        m.reset()
    h_ref, h_aligned = R.step_logits(models, tokens)
    rows = slice(n_prompt - 1, len(tokens) - 1)
    out = {}
    for lam in lams:
        z = R.blend([h_ref[rows], h_aligned[rows]], [1 - lam, lam])
        logp, logq = R.log_softmax(z), R.log_softmax(h_ref[rows])
        picked = logp[np.arange(len(tokens) - n_prompt), tokens[n_prompt:]]
        kl = (np.exp(logp) * (logp - logq)).sum(axis=-1)
        out[lam] = picked.mean(), kl.mean()
    return out


def prompt_text(row) -> str:
    if "prompt" in row:
        return row["prompt"]
    return jinja2.Template(CHAT_TEMPLATE).render(messages=row["messages"], add_generation_prompt=True)


def test_scores_at_every_lam_equal_plain_llama_logits(pair, plain_pair, tmp_path):
    result = score(pair, write_jsonl(tmp_path / "prefs.jsonl", ROWS), LAMS)
    assert result.computed == len(ROWS) * len(LAMS) and not result.skipped
    by_key = {(r["line"], r["lam"]): r for r in result.records}
    correct = {lam: [] for lam in LAMS}
    for line, row in enumerate(ROWS, start=1):
        chosen = reference_stats(plain_pair, prompt_text(row), row["chosen"], LAMS)
        rejected = reference_stats(plain_pair, prompt_text(row), row["rejected"], LAMS)
        for lam in LAMS:
            (lp_c, kl_c), (lp_r, _) = chosen[lam], rejected[lam]
            got = by_key[(line, lam)]
            assert got["logprob_chosen"] == pytest.approx(lp_c, abs=R.LOGPROB_ATOL)
            assert got["logprob_rejected"] == pytest.approx(lp_r, abs=R.LOGPROB_ATOL)
            assert got["kl_chosen"] == pytest.approx(kl_c, abs=R.LOGPROB_ATOL)
            correct[lam].append(float(lp_c > lp_r))
    for entry in result.summary:
        acc = correct[entry["lam"]]
        assert entry["n"] == len(ROWS)
        assert entry["pairwise_accuracy"] == pytest.approx(np.mean(acc))
        assert entry["pairwise_accuracy_stderr"] == pytest.approx(np.std(acc, ddof=1) / np.sqrt(len(acc)))
    # the sweep must see a difference between lams (else the comparison above proves little)
    assert len({round(e["mean_logprob_chosen"], 6) for e in result.summary}) == len(LAMS)


def test_a_lora_adapter_as_aligned_model_scores_like_plain_llama_with_it(ref_path, models_dir, tmp_path):
    """The demo pair's shape: the adapter applied on the reference (weights shared) in the sweep."""
    adapter = write_tiny_lora(models_dir / "eval-adapter.gguf", seed=9)
    plain = (
        R.plain(ref_path, n_threads=1, n_threads_batch=1),
        R.plain(ref_path, lora_path=str(adapter), n_threads=1, n_threads_batch=1),
    )
    lams = [0.0, 1.0, 2.5]
    with EvalPair(ref_path, adapter, n_ctx=256, n_threads=1) as lora_pair:
        result = score(lora_pair, write_jsonl(tmp_path / "prefs.jsonl", ROWS), lams)
    by_key = {(r["line"], r["lam"]): r for r in result.records}
    for line, row in enumerate(ROWS, start=1):
        chosen = reference_stats(plain, prompt_text(row), row["chosen"], lams)
        rejected = reference_stats(plain, prompt_text(row), row["rejected"], lams)
        for lam in lams:
            got = by_key[(line, lam)]
            assert got["logprob_chosen"] == pytest.approx(chosen[lam][0], abs=R.LOGPROB_ATOL)
            assert got["logprob_rejected"] == pytest.approx(rejected[lam][0], abs=R.LOGPROB_ATOL)
            assert got["kl_chosen"] == pytest.approx(chosen[lam][1], abs=R.LOGPROB_ATOL)
        assert chosen[1.0][1] > 1e-3  # the adapter does change the model


def test_kl_is_zero_at_lam_0_only(pair, tmp_path):
    result = score(pair, write_jsonl(tmp_path / "prefs.jsonl", ROWS[:1]), [0.0, 1.0])
    kl = {r["lam"]: r["kl_chosen"] for r in result.records}
    assert kl[0.0] == pytest.approx(0.0, abs=1e-6) and kl[1.0] > 1e-3


def test_bad_rows_are_reported_with_line_numbers(pair, tmp_path):
    lines = [
        ROWS[0],
        "{not json",
        "",
        {"prompt": "x", "chosen": "y"},
        ["a list"],
        {"prompt": 3, "chosen": "a", "rejected": "b"},
        ROWS[1],
        {"prompt": "the " * 300, "chosen": " a", "rejected": " b"},
    ]
    data = read_rows(write_jsonl(tmp_path / "prefs.jsonl", lines), "score")
    assert [r.line for r in data.rows] == [1, 7, 8]
    reasons = {b.line: b.reason for b in data.bad}
    assert set(reasons) == {2, 4, 5, 6}  # the blank line 3 is not a row
    assert "JSON" in reasons[2] and '"rejected"' in reasons[4] and '"prompt"' in reasons[6]
    result = score(pair, data, [0.5])
    assert [b.line for b in result.skipped] == [2, 4, 5, 6, 8]
    assert "n_ctx" in result.skipped[-1].reason
    assert sorted(r["line"] for r in result.records) == [1, 7]
    assert "skipped 5 row(s)" in result.skipped_report()


def test_no_usable_rows_is_an_error(tmp_path):
    with pytest.raises(DeRaError, match="no usable rows.*line 1"):
        read_rows(write_jsonl(tmp_path / "prefs.jsonl", ["{oops"]), "score")
    with pytest.raises(DeRaError, match="cannot read"):
        read_rows(tmp_path / "missing.jsonl", "score")


def results_lines(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_resume_keeps_finished_results_and_matches_an_uninterrupted_run(pair, tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", ROWS)
    full = score(pair, data, LAMS, out_dir=str(tmp_path / "full"))

    out = tmp_path / "resumed"
    first = score(pair, read_rows(data, "score", limit=2), LAMS, out_dir=str(out))  # "interrupted" after 2 rows
    assert first.computed == 2 * len(LAMS)
    before = results_lines(out)
    with open(out / "results.jsonl", "a") as f:
        f.write('{"row": "3:cut sh')  # a line cut short by a kill
    again = score(pair, data, LAMS, out_dir=str(out))
    assert again.computed == 2 * len(LAMS) and again.reused == 2 * len(LAMS)
    after = results_lines(out)
    assert after[: len(before)] == before and len(after) == len(ROWS) * len(LAMS)
    assert json.loads((out / "summary.json").read_text()) == json.loads(
        (tmp_path / "full" / "summary.json").read_text()
    )
    assert again.summary == full.summary

    third = score(pair, data, LAMS + [0.7], out_dir=str(out))  # a new lam: only it is computed
    assert third.computed == len(ROWS) and len(results_lines(out)) == len(ROWS) * (len(LAMS) + 1)


def test_resume_refuses_other_models(pair, ref_path, tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", ROWS[:1])
    score(pair, data, [1.0], out_dir=str(tmp_path / "out"))
    with EvalPair(ref_path, ref_path, n_ctx=256, n_threads=1) as other:
        with pytest.raises(DeRaError, match="other settings.*aligned"):
            score(other, data, [1.0], out_dir=str(tmp_path / "out"))


def test_changed_row_is_recomputed(pair, tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", ROWS[:2])
    score(pair, data, [1.0], out_dir=str(tmp_path / "out"))
    edited = [ROWS[0], dict(ROWS[1], chosen=" something else")]
    result = score(pair, write_jsonl(tmp_path / "prefs.jsonl", edited), [1.0], out_dir=str(tmp_path / "out"))
    assert result.computed == 1 and result.summary[0]["n"] == 2


def test_weight_space_mode_scores_like_plain_llama_with_the_adapter_at_scale_lam(ref_path, models_dir, tmp_path):
    """--mode weights: at each lam the scored distribution is the reference with the adapter at scale lam."""
    adapter = write_tiny_lora(models_dir / "eval-adapter.gguf", seed=9)
    lams = [0.0, 0.5, 2.0]
    with EvalPair(ref_path, adapter, n_ctx=256, n_threads=1) as lora_pair:
        result = score(lora_pair, write_jsonl(tmp_path / "prefs.jsonl", ROWS[:2]), lams, mode="weights")
    by_key = {(r["line"], r["lam"]): r for r in result.records}
    ref = R.plain(ref_path, n_threads=1, n_threads_batch=1)
    for lam in lams:
        adapted = R.plain(ref_path, lora_path=str(adapter), lora_scale=lam, n_threads=1, n_threads_batch=1)
        for line, row in enumerate(ROWS[:2], start=1):
            # weight 1 on the adapted model: its own log-probs, and its KL to the reference
            chosen = reference_stats((ref, adapted), prompt_text(row), row["chosen"], [1.0])[1.0]
            assert by_key[(line, lam)]["logprob_chosen"] == pytest.approx(chosen[0], abs=R.LOGPROB_ATOL)
            assert by_key[(line, lam)]["kl_chosen"] == pytest.approx(chosen[1], abs=R.LOGPROB_ATOL)


def test_weight_space_mode_is_refused_for_a_full_model_pair(pair, tmp_path):
    with pytest.raises(DeRaError, match="full GGUF model"):
        score(pair, write_jsonl(tmp_path / "prefs.jsonl", ROWS[:1]), [1.0], mode="weights")
