"""dera-eval generate's LLM judges, multi-turn rows and hub datasets, against independent computations.

- The judge is a real model: SmolLM2-135M-Instruct behind llama-cpp-python's own server (greedy at
  temperature 0), reached through a recording proxy. The stored raw replies equal what a fresh server
  answers to the test's own requests (rendered here from the test's prompt file and the samples), sent
  in the order the first server got them (llama-cpp-python reuses a previous prompt's cache, so a
  request's answer depends on the one before it); the grades and verdicts equal the test's own reading
  of those replies, and the summary's means and win rates the test's own arithmetic on them.
- Multi-turn rows: every turn's answer at every λ equals plain Llamas blended in numpy on the whole
  conversation (rendered here by hand from the models' chat template), decoded from scratch; the
  second turn kept the prefix its slot held, as the test computes it.
- A kill in mid-sweep: the proxy holds a request, the command is killed, the resumed run asks only what
  had no reply (the proxy's count), and a changed prompt judges again without generating again.
- A judge that fails (500s, junk, replies without a grade) marks samples; the sweep finishes.
- ``hf:`` rows through huggingface_hub from a loopback hub, and again offline from its cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import reference as R
from chat_driver import ROOT, cli_env
from eval_fixtures import write_jsonl
from fake_hub import FakeHub
from judge_driver import LlamaCppServer, RecordingProxy, ScriptedJudge, completion
from serve_driver import tiny_pair

from dera_gguf.eval import EvalPair, Judge, SamplingParams, generate

SINGLE_PROMPT = (
    "Conversation so far:\n{history}\n\nQuestion: {question}\nAnswer: {answer}\n\n"
    "Grade the answer. Write only 'Rating: ' and a number from 1 to 10."
)
OTHER_SINGLE_PROMPT = "Question: {question}\nAnswer: {answer}\n\nWrite only 'Rating: ' and a grade from 1 to 10."
PAIRWISE_PROMPT = (
    "Question: {question}\nAnswer A: {answer_a}\nAnswer B: {answer_b}\n\n"
    "Which answer is better? Write only 'Verdict: A', 'Verdict: B' or 'Verdict: tie'."
)
OTHER_PAIRWISE_PROMPT = "{question}\n\nA: {answer_a}\n\nB: {answer_b}\n\nWrite only 'Verdict: A' or 'Verdict: B'."
NO_HISTORY = "(none: the question opens the conversation)"  # the documented stand-in for an empty history

ROWS = [
    {"turns": ["hello world, tell me", "write a short answer about the sun"], "category": "writing"},
    {"prompt": "tell me about the cat", "category": "math"},
    {"messages": [{"role": "system", "content": "answer short"}, {"role": "user", "content": "rain?"}]},
]


# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def printable(tmp_path_factory):
    """The tiny pair with a printable vocabulary (answers re-tokenize as they were drawn)."""
    return tiny_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def pair(ref_path, aligned_path):
    with EvalPair(ref_path, aligned_path, n_ctx=256, n_threads=1) as p:
        yield p


@pytest.fixture
def judge_server(smollm2_path, tmp_path):
    server = LlamaCppServer(smollm2_path, tmp_path / "judge.log")
    yield server
    server.stop()


def env() -> dict:
    out = cli_env()
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_ENDPOINT"):
        out.pop(name, None)
    return out


def dera_eval(args, **popen):
    command = [sys.executable, "-m", "dera_gguf.cli.eval", "generate", *map(str, args)]
    return subprocess.Popen(command, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def finished(process, timeout=600):
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err.decode()[-3000:]
    return out.decode(), err.decode()


def lines(path: Path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def sweep_args(pair, prompts, out, lams, judge_args):
    base = ["--ref", pair[0], "--aligned", pair[1], "--n-ctx", 512, "--prompts", prompts, "--lams", lams]
    base += ["--max-tokens", 10, "--temperature", 0, "--out", out, "--no-progress", "--judge-model", "judge"]
    return base + ["--judge-concurrency", 1, *judge_args]


# ------------------------------------------------ the test's own judge reading


def my_transcript(exchanges):
    return "\n\n".join(f"{role.capitalize()}: {text}" for role, text in exchanges) or NO_HISTORY


def my_turns(row, sample):
    """(history, question, answer) per turn, as the docs say the judge sees a sample."""
    if "turns" in row:
        out = []
        for t, question in enumerate(row["turns"]):
            history = []
            for u, a in zip(row["turns"][:t], sample["responses"][:t]):
                history += [("user", u), ("assistant", a)]
            out.append((history, question, sample["responses"][t]))
        return out
    if "messages" in row:
        *before, last = row["messages"]
        return [([(m["role"], m["content"]) for m in before], last["content"], sample["response"])]
    return [([], row["prompt"], sample["response"])]


def my_render(template, values):
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template


def my_rating(reply):
    found = [float(x) for x in re.findall(r"(?:Rating:\s*|\[\[)(\d+(?:\.\d+)?)", reply)]
    return found[-1] if found and 1 <= found[-1] <= 10 else None


def my_verdict(reply):
    found = re.findall(r"(?:Verdict:\s*|\[\[)(A|B|C|tie)\b", reply)
    return None if not found else "tie" if found[-1] in ("C", "tie") else found[-1]


def judge_body(prompt, max_tokens):
    return {
        "model": "judge",
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": False,
    }


def replayed(smollm2_path, tmp_path, bodies):
    """What a fresh llama_cpp.server answers to ``bodies``, asked in this order."""
    server = LlamaCppServer(smollm2_path, tmp_path / "replay.log")
    try:
        return [server.ask(body) for body in bodies]
    finally:
        server.stop()


# -------------------------------------------------------------------- tests


def test_reading_grades_and_verdicts():
    from dera_gguf.eval.judges import parse_rating, parse_verdict

    assert parse_rating("Fine.\nRating: 8") == 8.0
    assert parse_rating("Rating: 3 at first... then Rating: **7**/10") == 7.0
    assert parse_rating("MT-bench's form: [[6.5]]") == 6.5
    assert parse_rating("Rating: N") is None and parse_rating("Rating: 0") is None
    assert parse_rating("Rating: 11") is None and parse_rating("my rating is 9") is None
    assert parse_verdict("Verdict: B") == "B" and parse_verdict("verdict: tie") == "tie"
    assert parse_verdict("[[C]]") == "tie" and parse_verdict("Verdict: A. No: Verdict: B") == "B"
    assert parse_verdict("verdict: a tie, really") is None  # (a lower-case a is a word, not assistant A)
    assert parse_verdict("Verdict: Assistant A") is None


def plain_greedy(models, prompt, lam, n):
    """Greedy decoding of the blend from scratch in plain Llamas; tokens and how it ended."""
    eos = models[0].token_eos()
    for m in models:
        m.reset()
    rows = [r[-1] for r in R.step_logits(models, prompt)]
    tokens = []
    for _ in range(n):
        token = int(np.argmax(R.blend(rows, [1 - lam, lam])))
        if token == eos:
            return tokens, "stop"
        tokens.append(token)
        rows = [r[-1] for r in R.step_logits(models, [token])]
    return tokens, "length"


def chatml(messages):
    """The tiny models' chat template, written out by hand."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + "<|im_start|>assistant\n"


def test_each_turn_equals_plain_llamas_on_the_whole_conversation(printable, tmp_path):
    turns = ["hello world, tell me", "write a short answer about the sun", "and the rain"]
    data = write_jsonl(tmp_path / "p.jsonl", [{"turns": turns}, {"prompt": "tell me about the cat"}])
    lams = [0.0, 0.5, 1.0, 1.5]
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    with EvalPair(*printable, n_ctx=256, n_threads=1) as pair:
        result = generate(pair, data, lams, params=greedy)
    models = [R.plain(p, n_threads=1, n_threads_batch=1) for p in printable]
    tokenize = lambda text: models[0].tokenize(text.encode(), add_bos=True, special=True)
    kept_answers = 0
    conversations = [r for r in result.records if "turns" in r]
    assert len(conversations) == len(lams)
    for record in conversations:
        messages, before = [], None
        for t, user in enumerate(turns):
            messages.append({"role": "user", "content": user})
            prompt = tokenize(chatml(messages))
            tokens, finish = plain_greedy(models, prompt, record["lam"], greedy.max_tokens)
            assert record["turn_tokens"][t] == tokens and record["finish_reasons"][t] == finish
            answer = models[0].detokenize(tokens).decode()
            assert record["responses"][t] == answer
            if before is not None:  # what the slot held: the last prompt, the answer drawn but its last token
                held = before[0] + (before[1] if before[2] == "stop" else before[1][:-1])
                shared = next((i for i, (a, b) in enumerate(zip(held, prompt)) if a != b), min(len(held), len(prompt)))
                assert record["reused_tokens"][t] == min(shared, len(prompt) - 1)
                kept_answers += record["reused_tokens"][t] > len(before[0])
            messages.append({"role": "assistant", "content": answer})
            before = (prompt, tokens, finish)
        assert record["response"] == record["responses"][-1]
        assert record["length_tokens"] == sum(map(len, record["turn_tokens"]))
    assert kept_answers > 0  # a slot kept the tokens of an earlier answer, not only the first prompt
    answers = {tuple(map(tuple, r["turn_tokens"])) for r in conversations}
    assert len(answers) > 1  # the λ values answer differently: the test can tell them apart


def test_turns_sample_alike_in_any_batch_and_with_lookup_drafts(printable, tmp_path):
    """A conversation's sampled turns do not depend on the other λ decoded beside it (each turn's chain is
    seeded on its own), and prompt lookup drafts change no greedy token."""
    data = write_jsonl(tmp_path / "p.jsonl", [{"turns": ["hello world, tell me hello world", "again", "more"]}])
    sampled = SamplingParams(temperature=0.8, max_tokens=16)
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    turns = lambda result: {(r["lam"], r["sample"]): r["turn_tokens"] for r in result.records}
    with EvalPair(*printable, n_ctx=640, n_threads=1) as pair:
        both = turns(generate(pair, data, [0.5, 1.5], params=sampled, samples=2, seed=3))
        alone = turns(generate(pair, data, [1.5], params=sampled, samples=2, seed=3))
        plain = generate(pair, data, [0.0, 0.5, 1.0, 2.0], params=greedy)
        drafted = generate(pair, data, [0.0, 0.5, 1.0, 2.0], params=greedy, speculative="lookup")
    assert len(alone) == 2 and all(both[key] == tokens for key, tokens in alone.items())
    assert both[(1.5, 0)] != both[(1.5, 1)]
    assert turns(plain) == turns(drafted) and len(turns(plain)) == 4
    assert sum(r["drafted"] for r in drafted.records) > 0


def test_turns_in_weight_space_mode_equal_the_adapted_model(printable, tmp_path):
    """--mode weights: each λ's conversation runs on the reference with the adapter at scale λ, turn by turn."""
    from tiny_models import write_tiny_lora

    adapter = write_tiny_lora(tmp_path / "adapter.gguf", seed=9)
    turns = ["hello world, tell me", "and the sun"]
    data = write_jsonl(tmp_path / "p.jsonl", [{"turns": turns}])
    greedy = SamplingParams(temperature=0.0, max_tokens=10)
    with EvalPair(printable[0], adapter, n_ctx=256, n_threads=1) as pair:
        result = generate(pair, data, [0.5, 2.0], params=greedy, mode="weights")
    ref = R.plain(printable[0], n_threads=1, n_threads_batch=1)
    for record in result.records:
        adapted = R.plain(
            printable[0], lora_path=str(adapter), lora_scale=record["lam"], n_threads=1, n_threads_batch=1
        )
        messages = []
        for t, user in enumerate(turns):
            messages.append({"role": "user", "content": user})
            prompt = ref.tokenize(chatml(messages).encode(), add_bos=True, special=True)
            tokens, _ = plain_greedy((ref, adapted), prompt, 1.0, greedy.max_tokens)
            assert record["turn_tokens"][t] == tokens
            messages.append({"role": "assistant", "content": record["responses"][t]})
    assert result.records[0]["turn_tokens"] != result.records[1]["turn_tokens"]


def test_single_judge_end_to_end(printable, judge_server, smollm2_path, tmp_path):
    proxy = RecordingProxy(judge_server.url)
    prompt_file = tmp_path / "judge.txt"
    prompt_file.write_text(SINGLE_PROMPT)
    data = write_jsonl(tmp_path / "p.jsonl", ROWS)
    out = tmp_path / "out"
    args = sweep_args(printable, data, out, "0,1,2", ["--judge", "single", "--judge-url", proxy.url])
    stdout, stderr = finished(dera_eval(args + ["--judge-prompt", prompt_file, "--judge-max-tokens", 24]))
    proxy.close()

    samples = {(s["line"], s["lam"]): s for s in lines(out / "samples.jsonl")}
    judgments = lines(out / "judgments.jsonl")
    expected = {}
    for (line, lam), sample in samples.items():
        for t, (history, question, answer) in enumerate(my_turns(ROWS[line - 1], sample)):
            values = {"history": my_transcript(history), "question": question, "answer": answer}
            expected[(line, lam, t)] = my_render(SINGLE_PROMPT, values)
    assert len(judgments) == len(expected) == 3 * (2 + 1 + 1)
    assert {(j["line"], j["lam"], j["turn"]): j["prompt"] for j in judgments} == expected

    # the requests as the test makes them, in the order the server got them; a fresh server's replies
    sent = [body for body, _ in proxy.forwarded]
    by_prompt = {j["prompt"]: j for j in judgments}
    mine = [judge_body(body["messages"][0]["content"], 24) for body in sent]
    assert sent == mine and Counter(b["messages"][0]["content"] for b in sent) == Counter(expected.values())
    answers = replayed(smollm2_path, tmp_path, mine)
    for body, answer in zip(mine, answers):
        judgment = by_prompt[body["messages"][0]["content"]]
        assert judgment["reply"] == answer
        assert judgment["score"] == my_rating(answer)
        assert judgment["status"] == ("ok" if my_rating(answer) is not None else "unrated")
    assert any(j["score"] is not None for j in judgments)  # SmolLM2 grades some of them with this prompt

    # per sample: the mean of its turns' grades, or failed; per λ (and category) the mean over samples
    def outcome(line, lam):
        n_turns = len(my_turns(ROWS[line - 1], samples[(line, lam)]))
        grades = [my_rating(by_prompt[expected[(line, lam, t)]]["reply"]) for t in range(n_turns)]
        return None if None in grades else sum(grades) / len(grades)

    summary = json.loads((out / "summary.json").read_text())
    for entry in summary:
        got = [outcome(line, entry["lam"]) for line in (1, 2, 3)]
        rated = [g for g in got if g is not None]
        assert entry["judged"] == len(rated) and entry["judge_failed"] == 3 - len(rated)
        assert entry["mean_rating"] == (pytest.approx(np.mean(rated)) if rated else None)
    by_category = json.loads((out / "summary_by_category.json").read_text())
    for entry in by_category:
        group = {"writing": [1], "math": [2], "(none)": [3]}[entry["category"]]
        rated = [g for g in (outcome(line, entry["lam"]) for line in group) if g is not None]
        assert entry["mean_rating"] == (pytest.approx(np.mean(rated)) if rated else None)
    assert {e["category"] for e in by_category} == {"writing", "math", "(none)"}
    assert "best lam by mean_rating" in stdout or "no results for mean_rating" in stderr
    assert (out / "sweep.png").exists()


def pairwise_args(printable, data, out, proxy, prompt_file):
    judge = ["--judge", "pairwise", "--baseline-lam", "0,1", "--judge-url", proxy.url, "--judge-prompt", prompt_file]
    return sweep_args(printable, data, out, "0,0.5,1", judge + ["--judge-max-tokens", 12])


def test_pairwise_resumes_after_a_kill_without_asking_twice(printable, judge_server, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", ROWS[1:])
    out = tmp_path / "out"
    prompt_file = tmp_path / "judge.txt"
    prompt_file.write_text(PAIRWISE_PROMPT)
    # per row: λ 0.5 against 0 and against 1, λ 0 against 1 (the same questions as λ 1 against 0), both orders
    questions = 2 * 3 * 2

    first = RecordingProxy(judge_server.url, hold_at=5)
    process = dera_eval(pairwise_args(printable, data, out, first, prompt_file))
    assert first.held.wait(timeout=300), process.communicate(timeout=60)[1].decode()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    first.release()
    first.close()
    assert len(first.forwarded) == 4 and len(lines(out / "judgments.jsonl")) == 4  # each reply written at once

    second = RecordingProxy(judge_server.url)
    finished(dera_eval(pairwise_args(printable, data, out, second, prompt_file)))
    second.close()
    judgments = lines(out / "judgments.jsonl")
    assert len({j["key"] for j in judgments}) == len(judgments) == questions
    asked = [body["messages"][0]["content"] for body, _ in first.forwarded + second.forwarded]
    assert Counter(asked) == Counter(j["prompt"] for j in judgments)  # every question asked once, in all
    for j, (body, response) in zip(judgments[4:], second.forwarded):
        assert j["prompt"] == body["messages"][0]["content"]
        assert j["reply"] == response["choices"][0]["message"]["content"]
        assert j["score"] == my_verdict(j["reply"])

    # win / tie / loss: both orders must agree for a win or a loss; a sample fails with any reply unread
    verdict = {(j["line"], j["lam_a"], j["lam_b"]): my_verdict(j["reply"]) for j in judgments}
    summary = {e["lam"]: e for e in json.loads((out / "summary.json").read_text())}
    failed = {lam: set() for lam in summary}
    for lam, base in [(0.5, 0.0), (0.5, 1.0), (0.0, 1.0), (1.0, 0.0)]:
        games = []
        for line in (1, 2):
            first_, second_ = verdict[(line, lam, base)], verdict[(line, base, lam)]
            if None in (first_, second_):
                failed[lam].add(line)
                continue
            a = {"A": 1, "B": -1, "tie": 0}[first_]
            b = {"A": -1, "B": 1, "tie": 0}[second_]
            games.append(1 if a == b == 1 else -1 if a == b == -1 else 0)
        for metric, value in (("win", 1), ("tie", 0), ("loss", -1)):
            got = summary[lam][f"{metric}_rate_vs_{base:g}"]
            assert got == (pytest.approx(np.mean([g == value for g in games])) if games else None)
    for lam, entry in summary.items():
        assert (entry["judged"], entry["judge_failed"]) == (2 - len(failed[lam]), len(failed[lam]))
    assert summary[0.0]["win_rate_vs_0"] is None and summary[1.0]["win_rate_vs_1"] is None
    assert any(v is not None for v in verdict.values())  # SmolLM2 gives verdicts with this prompt

    # the same command again asks nothing; another prompt asks every question anew, generating nothing
    again = RecordingProxy(judge_server.url)
    _, stderr = finished(dera_eval(pairwise_args(printable, data, out, again, prompt_file)))
    assert again.forwarded == [] and "0 question(s) asked now" in stderr
    other = tmp_path / "other.txt"
    other.write_text(OTHER_PAIRWISE_PROMPT)
    _, stderr = finished(dera_eval(pairwise_args(printable, data, out, again, other)))
    again.close()
    assert len(again.forwarded) == questions and "reused 6 finished result(s)" in stderr
    assert len(lines(out / "samples.jsonl")) == 6
    assert len(lines(out / "judgments.jsonl")) == 2 * questions


def failing_script(prompt, n):
    """A judge whose every request fails."""
    return 500, b'{"error": "overloaded"}'


def flaky_script(prompt, n):
    """Junk on a first try; then a grade of 8 or a reply without one, by the prompt."""
    if n == 1:
        return 200, b"<html>proxy error</html>"
    graded = hashlib.sha256(prompt.encode()).digest()[0] % 2 == 0
    return 200, completion("Rating: 8" if graded else "I cannot say.")


def test_a_failing_judge_marks_samples_and_the_sweep_finishes(pair, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello world, tell me"}, {"prompt": "a cat"}])
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    lams = [0.0, 0.5, 1.0]
    out = str(tmp_path / "out")

    failing = ScriptedJudge(failing_script)
    judge = Judge("single", failing.url, "m", retries=2, backoff=0.01, concurrency=3)
    result = generate(pair, data, lams, params=greedy, out_dir=out, judge=judge)
    failing.close()
    assert result.computed == 6 and len(failing.arrivals) == 6 * 3  # every request tried 1 + 2 times
    assert [(e["judged"], e["judge_failed"], e["mean_rating"]) for e in result.summary] == [(0, 2, None)] * 3
    assert all(j["status"] == "error" and "HTTP 500" in j["error"] for j in lines(Path(out) / "judgments.jsonl"))

    # the failed requests are asked again; junk is tried again; a reply without a grade is kept as it is
    flaky = ScriptedJudge(flaky_script)
    judge = Judge("single", flaky.url, "m", retries=2, backoff=0.01, concurrency=3, rpm=600)
    result = generate(pair, data, lams, params=greedy, out_dir=out, judge=judge)
    assert result.computed == 0 and len(flaky.arrivals) == 6 * 2
    starts = sorted(t for t, _ in flaky.arrivals)  # (as they reach the judge: each a little late, by chance)
    assert starts[-1] - starts[0] >= (len(starts) - 1) * 0.1 - 0.05  # at most 600 a minute, every try counted
    latest = {j["key"]: j for j in lines(Path(out) / "judgments.jsonl")}
    assert len(latest) == 6 and all(j["tries"] == 2 for j in latest.values())
    graded = [flaky_script(j["prompt"], 2)[1] == completion("Rating: 8") for j in latest.values()]
    assert 0 < sum(graded) < 6  # both kinds of reply occur
    for j, g in zip(latest.values(), graded):
        assert (j["status"], j["score"]) == (("ok", 8.0) if g else ("unrated", None))
    for entry in result.summary:
        mine = [g for j, g in zip(latest.values(), graded) if j["lam"] == entry["lam"]]
        assert (entry["judged"], entry["judge_failed"]) == (sum(mine), len(mine) - sum(mine))
        assert entry["mean_rating"] == (8.0 if any(mine) else None)

    result = generate(pair, data, lams, params=greedy, out_dir=out, judge=judge)  # nothing left to ask
    flaky.close()
    assert len(flaky.arrivals) == 6 * 2 and "0 question(s) asked now, 6 answered by earlier runs" in result.judge_report


def test_a_judge_too_slow_times_out_and_the_sweep_finishes(pair, tmp_path):
    import time

    def slow(prompt, n):
        time.sleep(1.5)
        return 200, completion("Rating: 9")

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello world, tell me"}])
    judge_server = ScriptedJudge(slow)
    judge = Judge("single", judge_server.url, "m", retries=1, backoff=0.01, timeout=0.3)
    result = generate(pair, data, [0.0, 1.0], params=SamplingParams(temperature=0.0, max_tokens=4), judge=judge)
    judge_server.close()
    assert result.computed == 2 and len(judge_server.arrivals) == 2 * 2
    assert [(e["judged"], e["judge_failed"]) for e in result.summary] == [(0, 1), (0, 1)]
    assert "no answer within 0.3 s" in result.judge_report


def test_hub_dataset_rows_online_then_offline(printable, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": ["q one", "q one again"], "category": "writing", "prompt_id": 1}]
    rows += [{"prompt": ["q two", "and more"], "category": "math", "prompt_id": 2}]
    parquet = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    files = {("org/mt", "data/train-00000-of-00001.parquet"): parquet.getvalue(), ("org/mt", "README.md"): b"x"}
    files[("org/mt", "raw/question.jsonl")] = b'{"turns": ["raw q"], "category": "coding"}\n'
    home = tmp_path / "hf"
    args = ["--ref", printable[0], "--aligned", printable[1], "--n-ctx", 256, "--lams", "0,1", "--max-tokens", 4]
    args += ["--temperature", 0, "--no-progress"]

    def run(spec, out, **extra):
        command = [sys.executable, "-m", "dera_gguf.cli.eval", "generate", *map(str, args), "--prompts", spec]
        command += ["--out", str(out)]
        run_env = {**env(), "HF_HOME": str(home), **extra}
        return subprocess.run(command, env=run_env, cwd=ROOT, capture_output=True, text=True, timeout=300)

    with FakeHub(files) as hub:
        done = run("hf:org/mt", tmp_path / "a", HF_ENDPOINT=hub.url)
        raw = run("hf:org/mt:raw/question.jsonl", tmp_path / "b", HF_ENDPOINT=hub.url)
        fetched = [path for path, _ in hub.gets()]
    assert done.returncode == 0 and raw.returncode == 0, done.stderr[-2000:] + raw.stderr[-2000:]
    assert any(p.endswith("data/train-00000-of-00001.parquet") for p in fetched)
    assert not any(p.endswith("README.md") for p in fetched)  # only the split's files
    samples = lines(tmp_path / "a" / "samples.jsonl")
    assert sorted((s["line"], s["lam"], tuple(s["turns"]), s["category"]) for s in samples) == [
        (1, 0.0, ("q one", "q one again"), "writing"),
        (1, 1.0, ("q one", "q one again"), "writing"),
        (2, 0.0, ("q two", "and more"), "math"),
        (2, 1.0, ("q two", "and more"), "math"),
    ]
    assert [s["category"] for s in lines(tmp_path / "b" / "samples.jsonl")] == ["coding", "coding"]
    categories = json.loads((tmp_path / "a" / "summary_by_category.json").read_text())
    assert sorted({(e["category"], e["n"]) for e in categories}) == [("math", 1), ("writing", 1)]

    # offline, the hub gone: the same rows from the cache; an uncached dataset is a clear error
    offline = run("hf:org/mt", tmp_path / "c", HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    assert offline.returncode == 0, offline.stderr[-2000:]
    assert lines(tmp_path / "c" / "samples.jsonl") == samples
    missing = run("hf:org/other", tmp_path / "d", HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    assert missing.returncode != 0 and "not in the Hugging Face cache" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_judge_flags_are_checked_before_anything_runs(tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", ROWS)
    base = ["--ref", "r.gguf", "--aligned", "a.gguf", "--prompts", data, "--out", tmp_path / "o"]
    (tmp_path / "bad.txt").write_text("Grade {answer} please ({question_a} is not ours)")
    bad = ["--judge-prompt", tmp_path / "bad.txt"]
    cases = [
        (["--judge", "single"], "--judge-model"),
        (["--judge", "pairwise", "--judge-model", "m"], "--baseline-lam"),
        (["--judge-model", "m"], "add --judge single"),
        (["--judge", "single", "--judge-model", "m", "--judge-key-env", "NO_SUCH_VAR_X"], "NO_SUCH_VAR_X"),
        (["--judge", "single", "--judge-model", "m", "--judge-url", "localhost:8080"], "--judge-url"),
        (["--judge", "single", "--judge-model", "m", *bad], "lacks {question}"),
    ]
    for extra, message in cases:
        done = subprocess.run(
            [sys.executable, "-m", "dera_gguf.cli.eval", "generate", *map(str, base + extra)],
            env=env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode != 0 and message in done.stderr, (extra, done.stderr)
        assert "Traceback" not in done.stderr
    assert not os.path.exists(tmp_path / "o")
