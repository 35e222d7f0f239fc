"""dera_gguf.batch.slots: answers that join, run and leave together, against plain Llamas blended in numpy.

The expected tokens are greedy decodes of separate plain ``llama_cpp.Llama`` instances
blended in numpy (tests/reference.py), on a prompt whose top-2 margins are far above
llama.cpp's measured batch-shape drift (tests/drafting_cases.py). A greedy continuation is
its own continuation: an answer asked after ``prompt + expected[:k]`` must be
``expected[k:]``, which lets one clear case check answers that reuse a slot's KV cache.
"""

from __future__ import annotations

import contextlib
import threading
import time

import llama_cpp
import pytest
import reference as R
from drafting_cases import clear_greedy_cases, weights_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from dera_gguf import DeRaLlama
from dera_gguf.batch.sequence import Sequence
from dera_gguf.batch.slots import Job, Slots
from dera_gguf.blend import mixing_weights
from dera_gguf.errors import ContextFullError, Stopped
from dera_gguf.runtime.pair import PairRuntime
from dera_gguf.runtime.states import SharedRAMCache
from dera_gguf.sampling.chains import new_chain
from dera_gguf.sampling.settings import Sampling

LAMS = [0.0, 0.5, 1.0, 1.5]
N = 24  # expected tokens per lam
N_CTX = 256


@pytest.fixture(scope="module")
def llm(ref_path, aligned_path):
    engine = DeRaLlama(str(ref_path), str(aligned_path), n_ctx=N_CTX, n_threads=1, verbose=False)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def case(ref_path, aligned_path):
    plain = [R.plain(p, n_threads=1, n_threads_batch=1) for p in (ref_path, aligned_path)]
    prompt, expected = clear_greedy_cases(plain, [weights_of(lam) for lam in LAMS], N)
    assert len({tuple(t) for t in expected}) > 2  # the lams answer differently: a mix-up shows
    return prompt, expected


def is_eog(llm):
    return lambda t: bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, t))


def until_eog(llm, tokens):
    ends = [i for i, t in enumerate(tokens) if is_eog(llm)(t)]
    return tokens[: ends[0]] if ends else tokens


def new_slots(llm, n_slots: int, chunk: int = 256, unified: bool = False, cache=None) -> Slots:
    """Slots as dera-serve makes them, with a prompt cache (their own unless given: conversations pushed
    out of a slot are kept there and restored, beside running answers)."""
    runtime = PairRuntime.for_sequences(
        llm.runtime.models, llm.context_params, n_slots * N_CTX, n_slots, llm.runtime.threads, unified
    )
    cache = SharedRAMCache(1 << 30) if cache is None else cache
    return Slots(runtime, N_CTX, is_eog(llm), chunk=chunk, cache=cache, owner=llm._owner())


@contextlib.contextmanager
def engine_beside_slots(ref_path, aligned_path):
    """A fresh DeRaLlama with a prompt cache, and two slots on its weights sharing that cache."""
    engine = DeRaLlama(str(ref_path), str(aligned_path), n_ctx=N_CTX, n_threads=1, verbose=False)
    engine.set_cache(SharedRAMCache(1 << 30))
    slots = new_slots(engine, 2, cache=engine.cache)
    try:
        yield engine, slots
    finally:
        slots.close()
        engine.close()


class Answer:
    """A job and what happened to it: ``done`` is set once it ended, ``error`` says how."""

    def __init__(self, prompt, lam, max_tokens, sampling=None, seed=0, on_token=None):
        self.done, self.error, self.steps = threading.Event(), None, 0
        self.on_token = on_token or (lambda answer: None)
        chain = new_chain(sampling or Sampling(temperature=0.0), seed)
        sequence = Sequence(mixing_weights(lam), chain, max_tokens, prompt=list(prompt))
        self.job = Job(sequence, self._step, self._end)
        self.cancel = False
        self.job.cancelled = lambda: self.cancel

    @property
    def tokens(self):
        return self.job.sequence.tokens

    def _step(self, job):
        self.steps += 1
        self.on_token(self)

    def _end(self, job, error):
        self.error = error
        self.done.set()

    def wait(self):
        assert self.done.wait(60), "the answer never ended"
        return self


def test_answers_joining_while_others_run_are_each_lams_blend(llm, case):
    """Each lam's answer starts when the one before has drawn 5 tokens; its prompt joins in chunks of 7
    tokens beside the running answers' tokens. Every answer is its lam's numpy blend."""
    prompt, expected = case
    slots = new_slots(llm, 3, chunk=7)  # 4 answers, 3 slots: the last waits for a free one
    answers = []

    def start_next(answer):
        if answer.steps == 5 and len(answers) < len(LAMS):
            answers.append(Answer(prompt, LAMS[len(answers)], N, on_token=start_next))
            slots.submit(answers[-1].job)

    try:
        answers.append(Answer(prompt, LAMS[0], N, on_token=start_next))
        slots.submit(answers[0].job)
        for i in range(len(LAMS)):
            while len(answers) <= i:
                answers[-1].wait()  # (the next one is submitted from its fifth token)
            answers[i].wait()
    finally:
        slots.close()
    for answer, tokens in zip(answers, expected):
        assert answer.error is None
        assert answer.tokens == until_eog(llm, tokens)
        assert answer.job.sequence.finish == ("length" if len(answer.tokens) == N else "stop")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    plan=st.lists(
        st.tuples(st.integers(0, len(LAMS) - 1), st.integers(0, 12), st.integers(0, 8), st.booleans(), st.booleans()),
        min_size=1,
        max_size=6,
    ),
    n_slots=st.integers(1, 3),
    chunk=st.sampled_from([1, 5, 64]),
)
def test_any_sequence_of_answers_reusing_and_cancelling(llm, case, plan, n_slots, chunk):
    """Answers submitted one after another, each after the last one's ``after``-th token: at a lam, after
    ``prompt + expected[:cut]`` (a slot holding an earlier answer reuses it), or after an unrelated
    prompt (which pushes a conversation out of its slot into the cache, to be restored later beside
    running answers), some cancelled after their third token. Each that finishes is
    ``expected[lam][cut:]``; a cancelled one ends with Stopped and is a prefix of it; what runs
    beside changes nothing."""
    prompt, expected = case
    slots = new_slots(llm, n_slots, chunk)
    answers = []
    try:
        for lam_i, cut, after, cancel, unrelated in plan:
            if answers and not answers[-1].done.is_set():
                started = threading.Event()
                answers[-1].on_token = lambda a, k=after, e=started: e.set() if a.steps >= k else None
                started.wait(30)
            asked = [1, 7 + cut, 9, 11] if unrelated else prompt + expected[lam_i][:cut]
            answer = Answer(asked, LAMS[lam_i], N - cut)
            if cancel:
                answer.on_token = lambda a: setattr(a, "cancel", a.steps >= 3)
            answer.expected = None if unrelated else until_eog(llm, expected[lam_i][cut:])
            answers.append(answer)
            slots.submit(answer.job)
        for answer in answers:
            answer.wait()
    finally:
        slots.close()
    for answer, (_, _, _, cancel, _) in zip(answers, plan):
        if answer.expected is None:
            assert answer.error is None or (cancel and isinstance(answer.error, Stopped))
        elif cancel and isinstance(answer.error, Stopped):
            assert answer.tokens == answer.expected[: len(answer.tokens)] and len(answer.tokens) <= 4
        else:
            assert answer.error is None and answer.tokens == answer.expected


def test_a_next_turn_decodes_only_what_is_new(llm, case):
    prompt, expected = case
    slots = new_slots(llm, 2)
    try:
        first = Answer(prompt, 1.0, 10)
        slots.submit(first.job)
        first.wait()
        other = Answer([1, 7, 9, 11], 0.5, 4)  # goes to the other, empty slot
        slots.submit(other.job)
        other.wait()
        turn = Answer(prompt + expected[2][:12], 1.0, 6)
        slots.submit(turn.job)
        turn.wait()
        again = Answer(prompt + expected[2][:12], 1.0, 6)  # the same prompt asked again
        slots.submit(again.job)
        again.wait()
    finally:
        slots.close()
    assert first.tokens == expected[2][:10]
    assert turn.tokens == again.tokens == until_eog(llm, expected[2][12:18])
    # the slot held the prompt and the first answer's tokens but its last (never decoded)
    assert turn.job.reused == len(prompt) + 9
    assert again.job.reused == len(prompt) + 11  # all of its prompt but the last token, decoded for its row


def test_a_sampled_answer_does_not_depend_on_what_runs_beside_it(llm, case):
    """T = 0.8: an answer drawn alone and the same answer (same seed) drawn while two others run."""
    prompt, _ = case
    sampling = Sampling(temperature=0.8, top_k=40, top_p=0.95)
    slots = new_slots(llm, 3)
    try:
        alone = Answer(prompt, 1.5, 16, sampling, seed=7)
        slots.submit(alone.job)
        alone.wait()
        crowd = [Answer(prompt[: 5 + i], lam, 16, sampling, seed=i) for i, lam in enumerate((0.0, 2.0))]
        beside = Answer(prompt, 1.5, 16, sampling, seed=7)
        for answer in [*crowd, beside]:
            slots.submit(answer.job)
        for answer in [*crowd, beside]:
            answer.wait()
    finally:
        slots.close()
    assert len(alone.tokens) > 3 and beside.tokens == alone.tokens


def test_closing_ends_running_and_waiting_answers_with_stopped(llm, case):
    prompt, _ = case
    slots = new_slots(llm, 1)
    running = Answer(prompt, 1.0, N_CTX - len(prompt))
    waiting = Answer(prompt, 0.0, 10)
    moving = threading.Event()
    running.on_token = lambda a: (moving.set(), time.sleep(0.01))  # (its answer outlasts the test's close)
    slots.submit(running.job)
    slots.submit(waiting.job)
    assert moving.wait(30)
    slots.close()
    assert isinstance(running.wait().error, Stopped) and isinstance(waiting.wait().error, Stopped)
    assert waiting.tokens == []
    with pytest.raises(Stopped):
        slots.submit(Answer(prompt, 1.0, 4).job)


def test_an_answer_that_cannot_fit_a_slot_is_refused_before_it_queues(llm):
    slots = new_slots(llm, 2)
    try:
        with pytest.raises(ContextFullError, match="a slot holds 256"):
            slots.submit(Answer([1] * 200, 1.0, 100).job)
    finally:
        slots.close()


def test_an_answer_at_lam_0_or_1_decodes_one_model(llm, case):
    """Weight 0 on a model: the answer's tokens never reach that model's KV cache (as llama.cpp reports it)."""
    prompt, expected = case
    slots = new_slots(llm, 2)
    try:
        answers = [Answer(prompt, lam, 8) for lam in (0.0, 1.0)]
        for answer in answers:
            slots.submit(answer.job)
        for answer in answers:
            answer.wait()
        held = [[context.extent(slot) for slot in range(2)] for context in slots.runtime.contexts]
    finally:
        slots.close()
    assert [a.tokens for a in answers] == [expected[0][:8], expected[2][:8]]
    n = len(prompt) + 7  # the prompt and the answer but its last token
    assert sorted(held[0]) == [0, n] and sorted(held[1]) == [0, n] and held[0] != held[1]


def test_a_conversation_evicted_from_its_slot_comes_back_from_the_prompt_cache(llm, case):
    """One slot: a conversation, then another prompt (the first is kept in the cache as its slot is
    emptied), then the first conversation's next turn: restored from the cache, not recomputed, and
    still its lam's numpy blend."""
    prompt, expected = case
    cache = SharedRAMCache(1 << 30)
    runtime = PairRuntime.for_sequences(llm.runtime.models, llm.context_params, N_CTX, 1, llm.runtime.threads, False)
    slots = Slots(runtime, N_CTX, is_eog(llm), cache=cache, owner=llm._owner())
    try:
        for answer in [Answer(prompt, 1.0, 10), Answer([1, 7, 9, 11], 0.5, 4)]:
            slots.submit(answer.job)
            answer.wait()
        turn = Answer(prompt + expected[2][:12], 1.0, 6)
        slots.submit(turn.job)
        turn.wait()
    finally:
        slots.close()
    assert turn.tokens == until_eog(llm, expected[2][12:18])
    assert turn.job.reused == len(prompt) + 9  # the prompt and the first answer but its last token
    assert len(cache.cache_state) == 2  # both conversations were kept as their slot went to another


def test_slots_and_the_engine_sharing_a_cache_each_take_up_their_own_conversations(ref_path, aligned_path, case):
    """Two slots and an engine on one cache (llama.cpp's state of one of several KV streams does not load
    into a one-stream context): a conversation a slot gave up comes back to a slot from the cache, and the
    engine, asked the same conversation meanwhile, answers it right without taking the slot's state."""
    prompt, expected = case
    with engine_beside_slots(ref_path, aligned_path) as (engine, slots):
        for answer in [Answer(prompt, 1.5, 10), Answer([1, 7, 9, 11], 0.5, 4), Answer([1, 8, 9, 11], 0.5, 4)]:
            slots.submit(answer.job)  # the third takes the first one's slot (left longest ago)
            answer.wait()
        out = engine.create_completion(prompt + expected[3][:12], lam=1.5, temperature=0.0, max_tokens=6)
        want = engine_text(engine, prompt + expected[3][:12], expected[3][12:18])
        turn = Answer(prompt + expected[3][:12], 1.5, 6)
        slots.submit(turn.job)
        turn.wait()
        expected_turn = until_eog(engine, expected[3][12:18])
    assert out["choices"][0]["text"] == want
    assert turn.tokens == expected_turn
    assert turn.job.reused == len(prompt) + 9  # restored from the cache, not recomputed


def engine_text(engine, prompt, tokens):
    return engine.detokenize(until_eog(engine, tokens), prev_tokens=prompt).decode("utf-8", errors="ignore")


class SharedCacheMachine(RuleBasedStateMachine):
    """An engine and two slots on one prompt cache, asked in any order for answers at any lam after any
    prefix of a greedy continuation, and for unrelated prompts that push conversations out of the slots:
    every answer is the numpy blend's, whoever gives it and whatever the cache holds."""

    engine = slots = case = None  # set by the test

    @rule(lam_i=st.integers(0, len(LAMS) - 1), cut=st.integers(0, 14), n=st.integers(1, 8))
    def slot_answer(self, lam_i, cut, n):
        prompt, expected = self.case
        answer = Answer(prompt + expected[lam_i][:cut], LAMS[lam_i], n)
        self.slots.submit(answer.job)
        assert answer.wait().error is None
        assert answer.tokens == until_eog(self.engine, expected[lam_i][cut : cut + n])

    @rule(lam_i=st.integers(0, len(LAMS) - 1), cut=st.integers(0, 14), n=st.integers(1, 8))
    def engine_answer(self, lam_i, cut, n):
        prompt, expected = self.case
        asked = prompt + expected[lam_i][:cut]
        out = self.engine.create_completion(asked, lam=LAMS[lam_i], temperature=0.0, max_tokens=n)
        k = out["usage"]["completion_tokens"]  # (llama-cpp-python goes on past max_tokens inside a character)
        if cut + k <= N:
            assert out["choices"][0]["text"] == engine_text(self.engine, asked, expected[lam_i][cut : cut + k])

    @rule(k=st.integers(0, 5))
    def unrelated_slot_answer(self, k):
        answer = Answer([1, 7 + k, 9, 11], 0.5, 3)
        self.slots.submit(answer.job)
        assert answer.wait().error is None


def test_an_engine_and_slots_sharing_a_cache_in_any_order(ref_path, aligned_path, case):
    with engine_beside_slots(ref_path, aligned_path) as (engine, slots):
        SharedCacheMachine.engine, SharedCacheMachine.slots, SharedCacheMachine.case = engine, slots, case
        run_state_machine_as_test(
            SharedCacheMachine, settings=settings(max_examples=15, stateful_step_count=10, deadline=None)
        )


def test_a_conversation_restored_from_the_cache_leaves_the_running_answers_alone(llm, case):
    """Two slots: a conversation pushed out to the cache comes back into slot 0 while an answer runs in
    slot 1; that answer goes on as the numpy blend does (restoring a sequence touches no other)."""
    prompt, expected = case
    slots = new_slots(llm, 2)
    try:
        for answer in [Answer(prompt, 1.0, 10), Answer([1, 7, 9, 11], 0.5, 3), Answer([1, 8, 9, 11], 0.5, 3)]:
            slots.submit(answer.job)  # the third pushes the first out of slot 0 (left longest ago)
            answer.wait()
        back = Answer(prompt + expected[2][:12], 1.0, 6)
        running = Answer(prompt + expected[1][:2], 0.5, N - 2)
        running.on_token = lambda a: slots.submit(back.job) if a.steps == 3 else None
        slots.submit(running.job)  # in slot 1; the conversation comes back into slot 0 meanwhile
        running.wait(), back.wait()
    finally:
        slots.close()
    assert back.job.reused == len(prompt) + 9  # restored from the cache
    assert back.tokens == until_eog(llm, expected[2][12:18])
    assert running.tokens == until_eog(llm, expected[1][2:])
