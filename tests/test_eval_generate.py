"""dera-eval generate: batched λ sequences against single-sequence plain llama_cpp.Llama decoding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import reference as R
from eval_fixtures import pair, plain_pair, write_jsonl  # noqa: F401 (fixtures)

from dera_gguf import DeRaLlama
from dera_gguf.eval import LengthReward, SamplingParams, generate

LAMS = [-0.5, 0.0, 0.5, 1.0, 2.0]
PROMPTS = [{"prompt": "hello world, tell me"}, {"prompt": "write a short answer about the sun:"}]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10)


def reference_greedy(models, prompt, lam, n, eos):
    """Greedy decoding of the blend, one sequence, plain Llama; tokens and per-step KL to the reference."""
    for m in models:
        m.reset()
    rows = [r[-1] for r in R.step_logits(models, prompt)]
    tokens, kls = [], []
    for _ in range(n):
        z = R.blend(rows, [1 - lam, lam])
        logp, logq = R.log_softmax(z), R.log_softmax(rows[0])
        kls.append(float((np.exp(logp) * (logp - logq)).sum()))
        token = int(np.argmax(z))
        if token == eos:
            break
        tokens.append(token)
        rows = [r[-1] for r in R.step_logits(models, [token])]
    return tokens, kls


def test_batched_greedy_equals_single_sequence_decoding(pair, plain_pair, tmp_path):
    result = generate(pair, write_jsonl(tmp_path / "p.jsonl", PROMPTS), LAMS, params=GREEDY)
    assert result.computed == len(PROMPTS) * len(LAMS)
    eos = plain_pair[0].token_eos()
    outputs = set()
    for record in result.records:
        text = PROMPTS[record["line"] - 1]["prompt"]
        prompt = plain_pair[0].tokenize(text.encode(), add_bos=True, special=True)
        tokens, kls = reference_greedy(plain_pair, prompt, record["lam"], GREEDY.max_tokens, eos)
        assert record["tokens"] == tokens
        assert record["length_tokens"] == len(tokens)
        assert record["kl_sum"] == pytest.approx(sum(kls), rel=1e-4, abs=R.backend_atol(1e-4))
        assert record["kl_mean"] == pytest.approx(np.mean(kls), rel=1e-4, abs=R.backend_atol(1e-4))
        outputs.add(tuple(tokens))
    assert len(outputs) > len(PROMPTS)  # lams lead to different responses: the test can tell them apart


def test_contexts_decoding_at_the_same_time_give_the_same_tokens(ref_path, aligned_path, plain_pair, tmp_path):
    """With 2 threads the pair's contexts decode concurrently, one thread each: greedy responses are
    still plain Llamas' blends."""
    from dera_gguf.eval import EvalPair
    from dera_gguf.eval.batch import ParallelSequences

    with EvalPair(ref_path, aligned_path, n_ctx=256, n_threads=2) as concurrent_pair:
        with ParallelSequences(concurrent_pair) as decoder:
            assert decoder.threads.concurrent
        result = generate(concurrent_pair, write_jsonl(tmp_path / "p.jsonl", PROMPTS), LAMS[::2], params=GREEDY)
    eos = plain_pair[0].token_eos()
    for record in result.records:
        prompt = plain_pair[0].tokenize(PROMPTS[record["line"] - 1]["prompt"].encode(), add_bos=True, special=True)
        assert record["tokens"] == reference_greedy(plain_pair, prompt, record["lam"], GREEDY.max_tokens, eos)[0]


def test_batched_greedy_equals_dera_llama(ref_path, aligned_path, pair, tmp_path):
    result = generate(pair, write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1]), [0.3, 1.5], params=GREEDY)
    llm = DeRaLlama(str(ref_path), str(aligned_path), n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False)
    prompt = llm.tokenize(PROMPTS[0]["prompt"].encode(), add_bos=True, special=True)
    for record in result.records:
        llm.lam = record["lam"]
        expected = []
        for token in llm.generate(prompt, temp=0.0, top_k=1):
            if token == llm.token_eos() or len(expected) == GREEDY.max_tokens:
                break
            expected.append(token)
        assert record["tokens"] == expected


def test_length_reward_and_summary(pair, tmp_path):
    reward = LengthReward(lmin=4, lmax=7)
    params = SamplingParams(temperature=0.9, max_tokens=12)
    result = generate(
        pair,
        write_jsonl(tmp_path / "p.jsonl", PROMPTS),
        [0.0, 1.0],
        params=params,
        reward=reward,
        samples=3,
        seed=5,
        out_dir=str(tmp_path / "out"),
    )
    rows = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == len(PROMPTS) * 2 * 3
    for r in rows:
        assert r["reward"] == (0.0 if 4 <= r["length_tokens"] <= 7 else -1.0)
    for entry in result.summary:
        mine = [r for r in rows if r["lam"] == entry["lam"]]
        assert entry["n"] == len(mine)
        assert entry["mean_length_tokens"] == pytest.approx(np.mean([r["length_tokens"] for r in mine]))
        assert entry["mean_reward"] == pytest.approx(np.mean([r["reward"] for r in mine]))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(pair, tmp_path):
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_tokens=8)
    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1])
    a = generate(pair, data, [0.5, 1.0], params=params, seed=11, samples=2)
    b = generate(pair, data, [1.0], params=params, seed=11, samples=2)  # another batch layout
    c = generate(pair, data, [1.0], params=params, seed=12, samples=2)
    tokens = lambda res: {(r["lam"], r["sample"]): r["tokens"] for r in res.records if r["lam"] == 1.0}
    assert tokens(a) == tokens(b)
    assert tokens(a) != tokens(c)
    assert tokens(a)[(1.0, 0)] != tokens(a)[(1.0, 1)]


def test_generate_resumes_by_row(pair, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    params = SamplingParams(max_tokens=6)
    full = generate(pair, data, [0.0, 1.5], params=params, out_dir=str(tmp_path / "full"))
    from dera_gguf.eval import read_rows

    generate(pair, read_rows(data, "generate", limit=1), [0.0, 1.5], params=params, out_dir=str(tmp_path / "r"))
    again = generate(pair, data, [0.0, 1.5], params=params, out_dir=str(tmp_path / "r"))
    assert again.computed == 2 and again.reused == 2
    assert again.summary == full.summary


def test_batched_sampling_equals_llama_cpp_chain_on_the_blend(pair, plain_pair, tmp_path):
    """Sampled (T > 0) batched responses equal one-sequence decoding where llama-cpp-python's own
    chain (built by plain Llama, seeded with each response's recorded seed) samples the numpy blend."""
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.9, min_p=0.0, max_tokens=8)
    settings = dict(temp=0.9, top_k=40, top_p=0.9, min_p=0.0, typical_p=1.0, repeat_penalty=1.0)
    result = generate(pair, write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1]), [-0.5, 0.5, 1.5], params=params, seed=5)
    eos = plain_pair[0].token_eos()
    prompt = plain_pair[0].tokenize(PROMPTS[0]["prompt"].encode(), add_bos=True, special=True)
    outputs = set()
    for record in result.records:
        weights = [1 - record["lam"], record["lam"]]
        tokens = R.sampled(plain_pair, weights, prompt, params.max_tokens, record["seed"], eos.__eq__, **settings)
        assert record["tokens"] == tokens
        outputs.add(tuple(tokens))
    assert len(outputs) > 1


def test_weight_space_mode_samples_the_adapted_model(ref_path, models_dir, tmp_path):
    """--mode weights: greedy responses of plain Llama with the adapter at scale lam, KL to the reference."""
    from tiny_models import write_tiny_lora

    from dera_gguf.eval import EvalPair

    adapter = write_tiny_lora(models_dir / "gen-adapter.gguf", seed=9)
    lams = [0.5, 2.0]
    with EvalPair(ref_path, adapter, n_ctx=256, n_threads=1) as lora_pair:
        result = generate(lora_pair, write_jsonl(tmp_path / "p.jsonl", PROMPTS), lams, params=GREEDY, mode="weights")
    ref = R.plain(ref_path, n_threads=1, n_threads_batch=1)
    outputs = set()
    for record in result.records:
        adapted = R.plain(ref_path, lora_path=str(adapter), lora_scale=record["lam"], n_threads=1, n_threads_batch=1)
        prompt = ref.tokenize(PROMPTS[record["line"] - 1]["prompt"].encode(), add_bos=True, special=True)
        tokens, kls = reference_greedy((ref, adapted), prompt, 1.0, GREEDY.max_tokens, ref.token_eos())
        assert record["tokens"] == tokens
        assert record["kl_mean"] == pytest.approx(np.mean(kls), rel=1e-4, abs=R.backend_atol(1e-4))
        outputs.add(tuple(tokens))
    assert len(outputs) > 1


def test_truncate_trims_every_sequence_of_a_shared_cache(pair):  # noqa: F811 (fixture)
    """Context.truncate keeps n positions of *every* sequence (llama-cpp-python's own wrapper trims only
    sequence 0); read back from llama.cpp's memory, then decoded at the trimmed position again."""
    import llama_cpp

    from dera_gguf.eval.batch import ParallelSequences

    with ParallelSequences(pair, n_seq=4, n_extra=16) as decoder:
        decoder.prefill([1, 5, 6, 7], 4)
        decoder.step([8] * 4, range(4), 4)
        for context in decoder.contexts:
            context.truncate(4)
        held = [llama_cpp.llama_memory_seq_pos_max(c.ctx.memory, s) + 1 for c in decoder.contexts for s in range(4)]
        assert held == [4] * 8
        decoder.step([9] * 4, range(4), 4)  # the same position again: llama.cpp refuses it unless trimmed


# ------------------------------------------------------------------ speculation (issue 15)

SPECULATION_LAMS = [1.5, 0.5, -0.5]


def speculative_run(pair, prompt, jobs, max_tokens):  # noqa: F811 (fixture)
    """Decode ``jobs`` together on ``prompt`` with prompt lookup drafting for each sequence."""
    from dera_gguf.eval.batch import ParallelSequences
    from dera_gguf.eval.generate import decode_batch
    from dera_gguf.speculation.verify import NgramIndex

    with ParallelSequences(pair, n_seq=len(jobs), n_extra=(len(jobs) - 1) * max_tokens) as decoder:
        decode_batch(pair, decoder, prompt, jobs, max_tokens, NgramIndex(prompt))
        return [[c.extent(i) for c in decoder.contexts] for i in range(len(jobs))]  # positions each sequence holds


def until_eog(pair, tokens):  # noqa: F811 (fixture)
    eog = [i for i, t in enumerate(tokens) if pair.is_eog(t)]
    return tokens[: eog[0]] if eog else tokens


def test_speculative_greedy_sequences_are_the_blends(pair, plain_pair):  # noqa: F811 (fixture)
    """Three lams in one batch, each drafting by prompt lookup on text that invites copying: every
    sequence's greedy tokens equal plain Llamas' blend at its lam (margins checked against llama.cpp's
    measured batch-shape drift first), drafts passed, and each cache holds exactly its text."""
    from drafting_cases import clear_greedy_cases, weights_of

    from dera_gguf.eval.generate import new_sample

    n = 40
    prompt, expected = clear_greedy_cases(list(plain_pair), [weights_of(lam) for lam in SPECULATION_LAMS], n)
    jobs = [new_sample(lam, 0, 0, SamplingParams(temperature=0.0, max_tokens=n)) for lam in SPECULATION_LAMS]
    held = speculative_run(pair, prompt, jobs, n)
    for job, tokens in zip(jobs, expected):
        assert job.tokens == until_eog(pair, tokens)
    assert len({job.accepted for job in jobs}) > 1  # sequences advanced by different steps: positions diverged
    assert sum(job.drafted for job in jobs) > sum(job.accepted for job in jobs)  # and drafts were dropped
    for job, extents in zip(jobs, held):  # a full response's cache: prompt and tokens, the last never decoded
        if job.finish == "length":
            assert extents == [len(prompt) + len(job.tokens) - 1] * 2


def test_speculative_sampling_is_the_chains_on_the_blend(pair, plain_pair):  # noqa: F811 (fixture)
    """Sampled (T = 0.5) sequences with prompt lookup drafts equal one-sequence decoding where
    llama-cpp-python's own chain, seeded alike, samples the numpy blend: one draw per emitted token."""
    from drafting_cases import copying_prompt, weights_of

    from dera_gguf.eval.generate import new_sample

    params = SamplingParams(temperature=0.5, top_k=0, top_p=1.0, min_p=0.0, max_tokens=24)
    settings = dict(temp=0.5, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, repeat_penalty=1.0)
    prompt = copying_prompt(list(plain_pair), weights_of(1.5), seed=0)
    jobs = [new_sample(lam, s, 100 + 10 * k + s, params) for k, lam in enumerate(SPECULATION_LAMS) for s in range(2)]
    speculative_run(pair, prompt, jobs, params.max_tokens)
    for job in jobs:
        n = params.max_tokens
        assert job.tokens == R.sampled(plain_pair, weights_of(job.lam), prompt, n, job.seed, pair.is_eog, **settings)
    assert sum(job.accepted for job in jobs) > 0
    assert len({tuple(job.tokens) for job in jobs}) > 2
