"""dera-serve --parallel: requests answered together, through a real server process and real clients.

Expected greedy answers come from plain ``llama_cpp.Llama`` instances blended in numpy
(tests/reference.py) on a token-id prompt whose top-2 margins lie far above llama.cpp's
measured batch-shape drift (tests/drafting_cases.py). That the requests really ran
together is read from the order in which their streams' chunks arrived, never from times.
"""

from __future__ import annotations

import signal
import threading
import time

import openai
import pytest
import reference as R
from drafting_cases import clear_greedy_cases, weights_of
from serve_driver import ServerProcess, sse_data, sse_json
from test_serve import EOG_BAN, GREEDY, HELLO, _openai, env, paths  # noqa: F401 (fixtures)

LAMS = [0.0, 0.5, 1.0, 1.5, 2.0]
N = 24


def serve(paths, env, tmp_path, *args):  # noqa: F811 (fixtures)
    ref, aligned, _ = paths
    pair = ["--ref", str(ref), "--aligned", str(aligned), "--alias", "pair"]
    return ServerProcess([*pair, *args], env, tmp_path / "server.log")


@pytest.fixture(scope="module")
def server(paths, env, tmp_path_factory):  # noqa: F811 (fixtures)
    proc = serve(paths, env, tmp_path_factory.mktemp("log"), "--n-ctx", "2048", "--parallel", "4")
    yield proc
    assert proc.stop(signal.SIGTERM) == 0, proc.log()


@pytest.fixture(scope="module")
def case(paths):  # noqa: F811 (fixtures)
    """A token-id prompt, each lam's expected answer text, and the plain models."""
    plain = [R.plain(p, n_ctx=512, n_threads=1, n_threads_batch=1) for p in paths[:2]]
    prompt, expected = clear_greedy_cases(plain, [weights_of(lam) for lam in LAMS], N)
    texts = [answer_text(plain[1], prompt, tokens) for tokens in expected]
    assert len(set(texts)) > 2  # the lams answer differently: a mix-up shows
    return prompt, texts


def answer_text(llm, prompt, tokens):
    """A completion's text: the tokens up to the end of text, detokenized after the prompt."""
    eog = [i for i, t in enumerate(tokens) if llama_cpp_is_eog(llm, t)]
    tokens = tokens[: eog[0]] if eog else tokens
    return llm.detokenize(tokens, prev_tokens=prompt).decode("utf-8", errors="ignore")


def llama_cpp_is_eog(llm, token):
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, token))


class Stream(threading.Thread):
    """One streamed request read on its own thread; ``arrivals`` numbers its chunks in a shared order."""

    def __init__(self, proc, route, body, clock, stop_after=None):
        super().__init__(daemon=True)
        self.proc, self.route, self.body, self.clock, self.stop_after = proc, route, body, clock, stop_after
        self.events, self.arrivals, self.error = [], [], None

    def run(self):
        try:
            with self.proc.http(timeout=120) as http, http.stream("POST", self.route, json=self.body) as r:
                for data in sse_data(r.iter_lines()):
                    self.arrivals.append(next(self.clock))
                    self.events.extend(sse_json(iter(["data: " + data])))
                    if self.stop_after is not None and len(self.events) >= self.stop_after:
                        return
        except Exception as e:  # reported by the test
            self.error = e

    def text(self):
        return "".join(c["choices"][0]["text"] for c in self.events if isinstance(c, dict) and c.get("choices"))


class Clock:
    """A shared counter: the order in which chunks arrived across streams."""

    def __init__(self):
        self.lock, self.n = threading.Lock(), 0

    def __next__(self):
        with self.lock:
            self.n += 1
            return self.n


def under_way(proc, clock, max_tokens):
    """A long greedy chat stream (end of text banned), started and past its fifth chunk."""
    body = dict(model="pair", messages=HELLO, stream=True, max_tokens=max_tokens, logit_bias=EOG_BAN, **GREEDY)
    stream = Stream(proc, "/v1/chat/completions", body, clock)
    stream.start()
    while len(stream.events) < 5 and stream.is_alive():
        time.sleep(0.01)
    return stream


def test_concurrent_greedy_answers_at_different_lams_are_each_lams_blend(server, case):
    """Five streams at five lams sent while a long answer streams (four slots: some wait for a free one):
    each is its lam's numpy blend, and each began before the long answer ended."""
    prompt, texts = case
    clock = Clock()
    anchor = under_way(server, clock, 400)
    ask = dict(model="pair", prompt=prompt, max_tokens=N, stream=True, **GREEDY)
    streams = [Stream(server, "/v1/completions", {**ask, "lam": lam}, clock) for lam in LAMS]
    for s in streams:
        s.start()
    for s in [*streams, anchor]:
        s.join(120)
    assert [s.error for s in [*streams, anchor]] == [None] * (len(LAMS) + 1)
    assert [s.text() for s in streams] == texts
    assert all(s.arrivals[0] < anchor.arrivals[-1] for s in streams), (
        anchor.arrivals[-1],
        [s.arrivals for s in streams],
    )


def test_whole_answers_sent_together_are_each_lams_blend(server, case):
    prompt, texts = case
    answers = [None] * len(LAMS)

    def ask(i):
        with server.http(timeout=120) as http:
            body = dict(model="pair", prompt=prompt, max_tokens=N, lam=LAMS[i], **GREEDY)
            answers[i] = http.post("/v1/completions", json=body).json()["choices"][0]["text"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(LAMS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert answers == texts


def test_seeded_sampled_answers_reproduce_whatever_runs_beside_them(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    asks = [dict(lam=lam, seed=seed) for lam, seed in [(0.5, 1), (1.5, 2), (1.5, 3), (2.0, 1)]]

    def answer(ask):
        settings = dict(temperature=0.9, top_p=0.95, max_tokens=16, seed=ask["seed"])
        resp = client.chat.completions.create(model="pair", messages=HELLO, **_openai(settings, lam=ask["lam"]))
        return resp.choices[0].message.content

    together = [None] * len(asks)
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, answer(asks[i]))) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    alone = [answer(ask) for ask in reversed(asks)][::-1]
    assert together == alone
    assert len(set(alone)) == len(alone)  # other seeds or lams: other answers


def test_a_client_that_disconnects_frees_its_slot_while_the_others_go_on(paths, env, tmp_path):  # noqa: F811
    """Two slots, two 4000-token streams; one client leaves after 20 chunks. A third request is answered
    while the other stream is still running: it got the freed slot instead of waiting for one."""
    proc = serve(paths, env, tmp_path, "--n-ctx", "8192", "--max-tokens", "4000", "--parallel", "2")
    try:
        clock = Clock()
        body = dict(model="pair", messages=HELLO, stream=True, max_tokens=4000, logit_bias=EOG_BAN, **GREEDY)
        leaving = Stream(proc, "/v1/chat/completions", body, clock, stop_after=20)
        staying = Stream(proc, "/v1/chat/completions", {**body, "lam": 1.5}, clock)
        staying.start()
        leaving.start()
        leaving.join(120)
        assert leaving.error is None and len(leaving.events) == 20
        with proc.http(timeout=120) as http:
            short = http.post("/v1/chat/completions", json=dict(model="pair", messages=HELLO, max_tokens=8, **GREEDY))
        assert short.status_code == 200 and staying.is_alive() and staying.error is None
    finally:
        assert proc.stop(signal.SIGTERM) == 0, proc.log()
    staying.join(60)
    assert staying.events[-1]["error"]["code"] == "server_shutting_down"
    assert "Traceback" not in proc.log(), proc.log()


def test_sigterm_ends_every_running_stream_cleanly(paths, env, tmp_path):  # noqa: F811
    proc = serve(paths, env, tmp_path, "--n-ctx", "4096", "--max-tokens", "1000", "--parallel", "3")
    clock = Clock()
    body = dict(model="pair", messages=HELLO, stream=True, max_tokens=4000, logit_bias=EOG_BAN, **GREEDY)
    streams = [Stream(proc, "/v1/chat/completions", {**body, "lam": lam}, clock) for lam in (0.5, 1.0, 1.5)]
    for s in streams:
        s.start()
    deadline = time.monotonic() + 60
    while min(len(s.events) for s in streams) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.process.send_signal(signal.SIGTERM)
    for s in streams:
        s.join(60)
    assert [s.error for s in streams] == [None] * 3
    assert all(s.events[-1]["error"]["code"] == "server_shutting_down" for s in streams)
    assert all(10 <= len(s.events) < 1000 for s in streams)  # ran together, ended early
    assert proc.process.wait(30) == 0
    assert "dera-serve: stopped" in proc.log() and "Traceback" not in proc.log(), proc.log()


def test_a_long_prompt_joins_while_another_answer_streams(paths, env, tmp_path):  # noqa: F811
    """A prompt of ~1,500 tokens sent while another answer streams: it is decoded 128 tokens a step
    beside that answer, which keeps streaming meanwhile (about one chunk per prompt chunk)."""
    proc = serve(paths, env, tmp_path, "--n-ctx", "4096", "--max-tokens", "1000", "--parallel", "2")
    try:
        clock = Clock()
        running = under_way(proc, clock, 1000)
        long_text = " ".join(f"w{i}" for i in range(500))  # ~3 tokens a word in the tiny vocabulary
        joining = Stream(
            proc, "/v1/completions", dict(model="pair", prompt=long_text, max_tokens=2, stream=True), clock
        )
        sent = next(clock)
        joining.start()
        joining.join(120)
        assert joining.error is None and joining.arrivals
        n_prompt = len(R.plain(paths[0], n_ctx=2048).tokenize(long_text.encode(), add_bos=True, special=True))
        assert n_prompt > 1000
        assert running.is_alive()  # the joining answer did not wait for it to end
        meanwhile = [a for a in running.arrivals if sent < a < joining.arrivals[0]]
        assert len(meanwhile) >= n_prompt // 128 - 2, (len(meanwhile), n_prompt)
    finally:
        assert proc.stop(signal.SIGTERM) == 0, proc.log()


def test_a_lone_clients_answers_on_slots_are_the_engines_on_a_real_pair(env, tmp_path):  # noqa: F811
    """The SmolLM2 demo pair (a real model, where greedy answers meet near-ties): requests one after
    another on the slots, including the same one again and a next turn that reuses a slot's cache, are
    answered as a DeRaLlama of the pair answers them (each slot's cache laid out as its own context)."""
    from dera_gguf import DeRaLlama

    proc = ServerProcess(["--pair", "smollm2-demo", "--n-ctx", "1024", "--parallel", "4"], env, tmp_path / "s.log")
    llm = DeRaLlama.from_pair("smollm2-demo", n_ctx=1024, verbose=False)
    eog = {str(t): -100.0 for t in range(llm.n_vocab()) if llama_cpp_is_eog(llm, t)}
    story = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    settings = dict(temperature=0.0, max_tokens=48, lam=1.5, logit_bias=eog)
    try:
        with proc.http(timeout=120) as http:
            for messages in [story, story, [*story, {"role": "assistant", "content": "Once"}, *HELLO]]:
                served = http.post("/v1/chat/completions", json=dict(messages=messages, **settings)).json()
                direct = llm.create_chat_completion(
                    messages, **{**settings, "logit_bias": {int(k): v for k, v in eog.items()}}
                )
                assert served["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    finally:
        assert proc.stop(signal.SIGTERM) == 0, proc.log()
        llm.close()


def test_more_conversations_than_slots_come_back_from_the_prompt_cache(paths, env, tmp_path):  # noqa: F811
    """Three conversations taking turns on two slots (each turn pushes another conversation out of its
    slot into the prompt cache, to be restored at its next turn): every answer is the one a separate
    engine gives the whole conversation."""
    from dera_gguf import DeRaLlama

    proc = serve(paths, env, tmp_path, "--n-ctx", "2048", "--parallel", "2", "--cache-size", "64MB")
    engine = DeRaLlama(str(paths[0]), str(paths[1]), n_ctx=1024, verbose=False)
    settings = dict(max_tokens=10, lam=1.5, **GREEDY)
    chats = [[{"role": "user", "content": text}] for text in ("hello world", "tell me about the cat", "a poem")]
    try:
        with proc.http(timeout=120) as http:
            for turn in range(3):
                for chat in chats:
                    got = http.post("/v1/chat/completions", json=dict(model="pair", messages=chat, **settings))
                    answer = got.json()["choices"][0]["message"]["content"]
                    want = engine.create_chat_completion(chat, **settings)["choices"][0]["message"]["content"]
                    assert answer == want, (turn, chat)
                    chat += [{"role": "assistant", "content": answer}, {"role": "user", "content": f"more {turn}"}]
    finally:
        assert proc.stop(signal.SIGTERM) == 0, proc.log()
        engine.close()
    assert "Traceback" not in proc.log()
