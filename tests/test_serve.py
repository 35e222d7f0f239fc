"""dera-serve as clients use it: a real server process, the real ``openai`` client, raw HTTP.

Every expected answer comes from engines of the test's own (a separate DeRaLlama, plain
``llama_cpp.Llama`` at lam 0, plain models blended in numpy), called with the same
messages, lam and settings; never from the server's objects.
"""

from __future__ import annotations

import signal
import threading
import time

import httpx
import llama_cpp
import openai
import pytest
import reference as R
from chat_driver import PAPER, cli_env, streamed
from click.testing import CliRunner
from serve_driver import ServerProcess, chunk_text, finish_reason, sse_data, sse_json
from test_chat import _chat_prompt_tokens, printable_vocab
from tiny_models import write_tiny_llama

from dera_gguf import DeRaLlama
from dera_gguf.cli.serve import main

KEY = "test-key"
CAP = 40  # the main server's --max-tokens
GREEDY = dict(PAPER, temperature=0.0)
EOG_BAN = {"2": -100.0, "4": -100.0}  # </s> and <|im_end|>: answers run to max_tokens
PRESETS = ["0", "0.5", "1", "1.5", "2"]


def user(text):
    return {"role": "user", "content": text}


HELLO = [user("hello world")]
CAT = [{"role": "system", "content": "be short"}, user("tell me about the cat")]


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve_models")
    return [
        write_tiny_llama(folder / f"{name}.gguf", seed=seed, vocab=printable_vocab())
        for name, seed in [("ref", 1), ("aligned", 2), ("aligned2", 3)]
    ]


@pytest.fixture(scope="module")
def env(tmp_path_factory, paths):
    ref, aligned, aligned2 = paths
    toml = tmp_path_factory.mktemp("serve") / "models.toml"
    toml.write_text(f"""
default = "tiny"

[pairs.tiny]
reference = {{ path = "{ref}" }}
aligned = [{{ path = "{aligned}" }}]
lam = 0.5

[pairs.tiny2]
reference = {{ path = "{ref}" }}
aligned = [{{ path = "{aligned}" }}, {{ path = "{aligned2}" }}]
""")
    return cli_env(toml)


@pytest.fixture(scope="module", params=["4", "1"], ids=["slots", "one-at-a-time"])
def server(env, tmp_path_factory, request):
    """Requests answered on 4 slots (the default) or, with --parallel 1, one at a time on the engine."""
    args = [
        "--pair",
        "tiny",
        "--pair",
        "tiny2",
        "--n-ctx",
        "512",
        "--max-tokens",
        str(CAP),
        "--parallel",
        request.param,
    ]
    proc = ServerProcess(args, env, tmp_path_factory.mktemp("log") / "server.log", api_key=KEY)
    yield proc
    assert proc.stop(signal.SIGTERM) == 0, proc.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with server.http() as c:
        yield c


@pytest.fixture(scope="module")
def engine(paths):
    return DeRaLlama(str(paths[0]), str(paths[1]), n_ctx=512, verbose=False)


@pytest.fixture(scope="module")
def engine2(paths):
    return DeRaLlama(str(paths[0]), [str(paths[1]), str(paths[2])], lam=[1.0, 1.0], n_ctx=512, verbose=False)


def chat_answer(llm, messages, **kwargs):
    out = llm.create_chat_completion(messages, **kwargs)
    return out["choices"][0]["message"]["content"], out["choices"][0]["finish_reason"], out["usage"]


def reply(resp):
    """(content, finish_reason, usage) of an openai ChatCompletion."""
    return resp.choices[0].message.content, resp.choices[0].finish_reason, resp.usage.model_dump(exclude_none=True)


# ---------------------------------------------------------------- answers


def test_models_lists_each_pair_and_its_lam_aliases(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny", *[f"tiny@{x}" for x in PRESETS], "tiny2"]
    assert client.models.retrieve("tiny@0.7").id == "tiny@0.7"  # any lam, listed or not


def test_extra_body_lam_answers_as_the_engine(client, engine):
    for lam in (0.3, 1.5):
        resp = client.chat.completions.create(model="tiny", messages=CAT, max_tokens=24, **_openai(GREEDY, lam=lam))
        assert resp.model == "tiny"
        assert reply(resp) == chat_answer(engine, CAT, lam=lam, max_tokens=24, **GREEDY)


def test_alias_sets_lam_and_is_echoed(client, paths):
    """tiny@0 is the reference alone: plain llama_cpp.Llama on the reference file."""
    plain = llama_cpp.Llama(model_path=str(paths[0]), n_ctx=512, verbose=False)
    resp = client.chat.completions.create(model="tiny@0", messages=HELLO, max_tokens=20, **_openai(GREEDY))
    assert resp.model == "tiny@0"
    assert reply(resp) == chat_answer(plain, HELLO, max_tokens=20, **GREEDY)


def test_blend_equals_plain_models_blended_in_numpy(client, paths):
    lam, n = 0.5, 16
    resp = client.chat.completions.create(model=f"tiny@{lam}", messages=HELLO, max_tokens=n, **_openai(GREEDY))
    models = [R.plain(paths[0]), R.plain(paths[1])]
    prompt = _chat_prompt_tokens(models[0], HELLO)
    tokens, _ = R.greedy(models, [1 - lam, lam], prompt, n, stop=[2, 4])
    text = models[0].detokenize([t for t in tokens if t not in (2, 4)], prev_tokens=prompt).decode(errors="ignore")
    assert resp.choices[0].message.content == text and resp.usage.prompt_tokens == len(prompt)


def test_body_lam_wins_over_the_alias_which_wins_over_the_default(client, engine):
    def ask(model, **extra):
        resp = client.chat.completions.create(model=model, messages=HELLO, max_tokens=20, **_openai(GREEDY, **extra))
        return resp.choices[0].message.content

    expected = {lam: chat_answer(engine, HELLO, lam=lam, max_tokens=20, **GREEDY)[0] for lam in (0.5, 1.5, 2.0)}
    assert len(set(expected.values())) == 3  # the lams give different answers, so a mix-up shows
    assert ask("tiny@1.5", lam=2) == expected[2.0]
    assert ask("tiny@1.5") == expected[1.5]
    assert ask("tiny") == expected[0.5]  # lam = 0.5 in models.toml


def test_streamed_chat_through_the_openai_client(client, engine):
    stream = client.chat.completions.create(
        model="tiny", messages=CAT, max_tokens=30, stream=True, **_openai(GREEDY, lam=1.5)
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == streamed(engine, CAT, lam=1.5, max_tokens=30, **GREEDY)
    assert {c.model for c in chunks} == {"tiny"}
    assert chunks[-1].choices[0].finish_reason == chat_answer(engine, CAT, lam=1.5, max_tokens=30, **GREEDY)[1]


def test_completions_streamed_and_not(client, http, engine):
    prompt, settings = "tell me about the sun", dict(GREEDY, max_tokens=20)
    expected = engine.create_completion(prompt, lam=0.7, **settings)["choices"][0]
    resp = client.completions.create(model="tiny@0.7", prompt=prompt, **_openai(settings))
    assert (resp.choices[0].text, resp.choices[0].finish_reason) == (expected["text"], expected["finish_reason"])
    body = dict(model="tiny", prompt=prompt, lam=0.7, stream=True, **settings)
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_json(r.iter_lines())
    assert events[-1] == "[DONE]" and chunk_text(events, chat=False) == expected["text"]
    assert finish_reason(events) == expected["finish_reason"]


def test_completion_prompt_as_token_ids(http, engine):
    tokens = engine.tokenize(b"hello world", add_bos=True)
    r = http.post("/v1/completions", json=dict(model="tiny@1", prompt=tokens, **GREEDY, max_tokens=12))
    assert r.status_code == 200
    expected = engine.create_completion(tokens, lam=1.0, max_tokens=12, **GREEDY)["choices"][0]["text"]
    assert r.json()["choices"][0]["text"] == expected


def test_grammar_constrains_the_answer_as_in_the_engine(http, engine):
    grammar = 'root ::= ("yes" | "no" | "maybe") "."'
    r = http.post("/v1/chat/completions", json=dict(model="tiny@1.5", messages=HELLO, grammar=grammar, **GREEDY))
    constrained = llama_cpp.LlamaGrammar.from_string(grammar, verbose=False)
    expected = chat_answer(engine, HELLO, lam=1.5, grammar=constrained, max_tokens=CAP, **GREEDY)
    assert r.status_code == 200, r.text
    assert expected[0] in ("yes.", "no.", "maybe.") and r.json()["choices"][0]["message"]["content"] == expected[0]


def test_several_aligned_models_take_a_lam_list(client, engine2):
    expected = chat_answer(engine2, HELLO, lam=[0.5, 0.8], max_tokens=16, **GREEDY)
    for model, extra in [("tiny2", {"lam": [0.5, 0.8]}), ("tiny2@0.5,0.8", {})]:
        resp = client.chat.completions.create(model=model, messages=HELLO, max_tokens=16, **_openai(GREEDY, **extra))
        assert reply(resp) == expected


def test_left_out_settings_are_the_papers_and_max_tokens_the_cap(client, engine):
    resp = client.chat.completions.create(model="tiny", messages=CAT, seed=123)
    expected = chat_answer(engine, CAT, lam=0.5, seed=123, max_tokens=CAP, **PAPER)
    llama_cpp_server_defaults = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1)
    other = chat_answer(engine, CAT, lam=0.5, seed=123, max_tokens=CAP, **llama_cpp_server_defaults)
    assert expected[0] != other[0]  # the defaults matter for this request
    assert reply(resp) == expected


def test_max_tokens_above_the_cap_is_capped(client, engine):
    resp = client.chat.completions.create(
        model="tiny", messages=HELLO, **_openai(dict(GREEDY, max_tokens=1000, logit_bias=EOG_BAN))
    )
    expected = chat_answer(engine, HELLO, lam=0.5, max_tokens=CAP, logit_bias={2: -100.0, 4: -100.0}, **GREEDY)
    assert expected[1] == "length" and expected[2]["completion_tokens"] == CAP
    assert reply(resp) == expected


@pytest.mark.parametrize("ending", ["length", "stop"])
def test_stream_usage_counts_as_the_whole_answer_does(client, engine, ending):
    bias = {"2": 50.0} if ending == "stop" else EOG_BAN  # "stop": the end-of-text token comes first
    stream = client.chat.completions.create(
        model="tiny",
        messages=CAT,
        stream=True,
        stream_options={"include_usage": True},
        **_openai(dict(GREEDY, max_tokens=12, logit_bias=bias)),
    )
    chunks = list(stream)
    expected = chat_answer(
        engine, CAT, lam=0.5, max_tokens=12, logit_bias={int(k): v for k, v in bias.items()}, **GREEDY
    )
    assert expected[1] == ending
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump(exclude_none=True) == expected[2]


def test_concurrent_requests_each_get_their_own_lam(server, client, http, engine):
    """A stream at lam 0 holds the engine; two requests at other lams arrive meanwhile."""
    settings = dict(GREEDY, max_tokens=CAP)
    whole = {lam: chat_answer(engine, HELLO, lam=lam, **settings) for lam in (0.0, 0.5, 2.0)}
    pieces = {lam: (streamed(engine, HELLO, lam=lam, **settings), whole[lam][1]) for lam in (0.0, 0.5)}
    assert len({text for text, *_ in whole.values()}) == 3
    results = {}

    def non_streamed():
        resp = client.chat.completions.create(model="tiny", messages=HELLO, **_openai(settings, lam=2))
        results[2.0] = reply(resp)

    def streamed_with_body_lam():
        stream = client.chat.completions.create(
            model="tiny@1.5", messages=HELLO, stream=True, **_openai(settings, lam=0.5)
        )
        chunks = list(stream)
        results[0.5] = ("".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason)

    body = dict(model="tiny@0", messages=HELLO, stream=True, **settings)
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        first = next(lines)  # the stream has started: the engine is taken
        others = [threading.Thread(target=f) for f in (non_streamed, streamed_with_body_lam)]
        for t in others:
            t.start()
        events = sse_json(iter([first, *lines]))
    for t in others:
        t.join(60)
    assert (chunk_text(events), finish_reason(events)) == pieces[0.0]  # not cut by the waiting requests
    assert results[2.0] == whole[2.0]
    assert results[0.5] == pieces[0.5]


# -------------------------------------------------------------- bad input


def _chat(**fields):
    return dict(dict(model="tiny", messages=HELLO, max_tokens=4), **fields)


TOO_LONG = "tell me about the cat " * 150  # over 512 tokens

BAD = [
    ("lam string", _chat(lam="1.5"), 400, "lam"),
    ("lam bool", _chat(lam=True), 400, "lam"),
    ("lam list longer than n", _chat(lam=[1, 2], n=3), 400, "lam has 2 values but n is 3"),
    ("lam list with a bad lam", _chat(lam=[1, "x"]), 400, "lam[1]: lam must be a float"),
    ("lam list of lists, wrong length", _chat(model="tiny2", lam=[[1, 1], [1]]), 400, "lam[1]: lam has 1 value(s)"),
    ("lam one for two models", _chat(model="tiny2", lam=0.5), 400, "1 value(s) but there are 2 aligned"),
    ("unknown model", _chat(model="nope"), 404, "unknown model 'nope'"),
    ("unknown pair in alias", _chat(model="nope@1"), 404, "unknown model 'nope@1'"),
    ("alias lam not a number", _chat(model="tiny@abc"), 400, "'abc' is not a number"),
    ("alias lam nan", _chat(model="tiny@nan"), 400, "finite"),
    ("alias lam inf", _chat(model="tiny@-inf"), 400, "finite"),
    ("alias lam count", _chat(model="tiny@1,2"), 400, "2 value(s) but there are 1 aligned"),
    # (a blend at 1e308 overflowed to inf: every token equally likely, the answer "........")
    ("lam whose blend overflows", _chat(lam=1e308), 400, "lam must be a finite number within"),
    ("alias lam whose blend overflows", _chat(model="tiny@-2e5"), 400, "lam must be a finite number within"),
    ("unknown field", _chat(temprature=0.5), 400, "unknown field 'temprature'"),
    ("top_p out of range", _chat(top_p=2), 400, "top_p"),
    ("n above the cap", _chat(n=9), 400, "n must be at most 8"),
    ("n zero", _chat(n=0), 400, "n must be at least 1"),
    ("logprobs of several choices without --logprobs", _chat(n=2, logprobs=True), 400, "--logprobs"),
    ("grammar with a lam list", _chat(lam=[0, 1], grammar='root ::= "a"'), 400, "grammar is not supported"),
    ("weights mode with a lam list", _chat(lam=[0, 1], mode="weights"), 400, "several choices need mode 'blend'"),
    ("max_tokens 0", _chat(max_tokens=0), 400, "max_tokens"),
    ("logprobs without --logprobs", _chat(logprobs=True), 400, "--logprobs"),
    ("logit_bias outside the vocabulary", _chat(logit_bias={"99999": 1}), 400, "99999"),
    ("grammar llama.cpp cannot parse", _chat(grammar="root ::= (("), 400, "grammar"),
    ("no messages", _chat(messages=[]), 400, "messages"),
    ("bad role", _chat(messages=[{"role": "robot", "content": "x"}]), 400, "messages"),
    ("prompt longer than the context", _chat(messages=[user(TOO_LONG)]), 400, "n_ctx"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("name,body,status,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_an_openai_error_before_any_stream(http, name, body, status, fragment, stream):
    r = http.post("/v1/chat/completions", json=dict(body, stream=stream))
    _assert_error(r, status, fragment)


@pytest.mark.parametrize(
    "raw,fragment",
    [
        ('{"model": "tiny", "lam": NaN, "messages": [{"role": "user", "content": "hi"}]}', "finite"),
        ('{"model": "tiny", "lam": Infinity, "messages": [{"role": "user", "content": "hi"}]}', "finite"),
        ('{"model": "tiny", "lam": [-Infinity], "messages": [{"role": "user", "content": "hi"}]}', "finite"),
        ('{"model": "tiny", "messages": [', "not valid JSON"),
        ("[1, 2]", "dictionary"),
    ],
)
def test_bad_json_is_an_openai_error(http, raw, fragment):
    r = http.post("/v1/chat/completions", content=raw.encode(), headers={"content-type": "application/json"})
    _assert_error(r, 400, fragment)


def test_bad_completion_requests(http):
    _assert_error(http.post("/v1/completions", json=dict(model="tiny", prompt=TOO_LONG, stream=True)), 400, "n_ctx")
    two = dict(model="tiny", prompt=["a", "b"], stream=True)  # (whole answers take several prompts)
    _assert_error(http.post("/v1/completions", json=two), 400, "one prompt")
    _assert_error(http.post("/v1/completions", json=dict(model="tiny", prompt="a", best_of=3)), 400, "best_of")
    _assert_error(http.post("/v1/completions", json=dict(model="tiny", prompt=[1, 10**6])), 400, "token ids")


def test_openai_client_raises_the_servers_errors(client, server):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="lam"):
            client.chat.completions.create(model="tiny", messages=HELLO, stream=stream, extra_body={"lam": "x"})
    with pytest.raises(openai.NotFoundError, match="unknown model"):
        client.chat.completions.create(model="gpt-4", messages=HELLO)
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        wrong.models.list()


def test_api_key_is_required_and_unknown_routes_are_shaped(server):
    with server.http() as c:
        _assert_error(c.get("/v1/nothing"), 404, "/v1/nothing")
        _assert_error(c.get("/v1/chat/completions"), 405, "Method Not Allowed")
    for route, method in [("/v1/models", "GET"), ("/v1/chat/completions", "POST"), ("/v1/completions", "POST")]:
        _assert_error(httpx.request(method, server.url + route, json=_chat()), 401, "API key")


def test_server_keeps_serving_after_bad_input(http, engine):
    for name, body, *_ in BAD:
        assert http.post("/v1/chat/completions", json=dict(body, stream=True)).status_code >= 400, name
    r = http.post("/v1/chat/completions", json=dict(model="tiny", messages=CAT, lam=1.5, max_tokens=24, **GREEDY))
    expected = chat_answer(engine, CAT, lam=1.5, max_tokens=24, **GREEDY)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected[0]


def _assert_error(r, status, fragment):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"], error["message"]


def _openai(settings, **extra_body):
    """``settings`` as openai-client arguments: OpenAI's own by name, the others (top_k, lam...) in extra_body."""
    known = {"temperature", "top_p", "max_tokens", "seed", "stop", "logit_bias"}
    extra = {**{k: v for k, v in settings.items() if k not in known}, **extra_body}
    return {**{k: v for k, v in settings.items() if k in known}, "extra_body": extra}


# ------------------------------------------------------ process lifecycle


def long_answer_server(paths, env, tmp_path) -> tuple:
    """dera-serve on the test pair as "my-dpo", answers of up to 4000 tokens; and a short request for it."""
    ref, aligned, _ = paths
    args = ["--ref", str(ref), "--aligned", str(aligned), "--alias", "my-dpo", "--n-ctx", "4096"]
    proc = ServerProcess([*args, "--max-tokens", "4000"], env, tmp_path / "server.log")
    return proc, dict(model="my-dpo", messages=CAT, max_tokens=8, **GREEDY)


def assert_engine_free(proc, paths, ask: dict, seconds_per_token: float) -> None:
    """After a 4000-token answer was given up on: the next request (``ask``) need not wait for the rest
    of it, and is answered as the engine answers it."""
    ref, aligned, _ = paths
    with proc.http() as http:
        start = time.monotonic()
        answer = http.post("/v1/chat/completions", json=ask)
        waited = time.monotonic() - start
    # the rest would take 3960 tokens at the early rate at least (later ones are slower); a loaded machine
    # delays noticing the client has gone by up to about half of that
    assert waited < 0.8 * 3960 * seconds_per_token, (waited, seconds_per_token)
    llm = DeRaLlama(str(ref), str(aligned), n_ctx=4096, verbose=False)
    assert answer.json()["choices"][0]["message"]["content"] == chat_answer(llm, CAT, max_tokens=8, **GREEDY)[0]


def test_client_disconnect_mid_stream_frees_the_engine_at_once(env, paths, tmp_path):
    """A 4000-token stream dropped after 40 tokens: the next request need not wait for the rest."""
    proc, ask = long_answer_server(paths, env, tmp_path)
    try:
        with proc.http() as http:
            ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
            assert ids == ["my-dpo", *[f"my-dpo@{x}" for x in PRESETS]]
            assert http.post("/v1/chat/completions", json=ask).status_code == 200  # warm-up (first call is slow)
            body = dict(model="my-dpo@1.5", messages=HELLO, stream=True, max_tokens=4000, logit_bias=EOG_BAN, **GREEDY)
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                start, n = time.monotonic(), 0
                for _ in sse_data(r.iter_lines()):
                    n += 1
                    if n == 40:
                        break
                seconds_per_token = (time.monotonic() - start) / n
        assert_engine_free(proc, paths, ask, seconds_per_token)
    finally:
        assert proc.stop(signal.SIGTERM) == 0, proc.log()


def test_client_gone_before_a_whole_answer_frees_the_engine(env, paths, tmp_path):
    """A non-streamed 4000-token answer whose client gives up after about 40 tokens' time: the server
    stops generating it (at its next token), so the next request need not wait for the rest."""
    proc, ask = long_answer_server(paths, env, tmp_path)
    long = dict(model="my-dpo@1.5", messages=HELLO, max_tokens=4000, logit_bias=EOG_BAN, **GREEDY)
    try:
        with proc.http() as http:
            assert http.post("/v1/chat/completions", json=ask).status_code == 200  # warm-up (first call is slow)
            start = time.monotonic()
            assert http.post("/v1/chat/completions", json={**long, "max_tokens": 40}).status_code == 200
            seconds_per_token = (time.monotonic() - start) / 40
        with proc.http(timeout=40 * seconds_per_token) as impatient:
            with pytest.raises(httpx.ReadTimeout):
                impatient.post("/v1/chat/completions", json=long)
        assert_engine_free(proc, paths, ask, seconds_per_token)
    finally:
        assert proc.stop(signal.SIGTERM) == 0, proc.log()
    assert "Traceback" not in proc.log(), proc.log()


def test_sigterm_ends_a_whole_answer_with_a_503(env, tmp_path):
    proc = ServerProcess(["--n-ctx", "4096", "--max-tokens", "4000"], env, tmp_path / "server.log")  # default pair
    body = dict(model="tiny@1.5", messages=HELLO, max_tokens=4000, logit_bias=EOG_BAN, **GREEDY)
    answers = []
    with proc.http() as http:
        asking = threading.Thread(target=lambda: answers.append(http.post("/v1/chat/completions", json=body)))
        asking.start()
        time.sleep(1.0)  # the answer is under way (4000 tokens take far longer)
        proc.process.send_signal(signal.SIGTERM)
        asking.join(60)
    assert answers[0].status_code == 503, answers[0].text
    assert answers[0].json()["error"]["code"] == "server_shutting_down"
    assert proc.process.wait(30) == 0
    assert "Traceback" not in proc.log(), proc.log()


def test_sigterm_ends_running_streams_and_exits_cleanly(env, tmp_path):
    proc = ServerProcess(["--n-ctx", "4096", "--max-tokens", "4000"], env, tmp_path / "server.log")  # default pair
    body = dict(model="tiny@1.5", messages=HELLO, stream=True, max_tokens=4000, logit_bias=EOG_BAN, **GREEDY)
    with proc.http() as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]][0] == "tiny"
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            head = [next(lines) for _ in range(20)]
            proc.process.send_signal(signal.SIGTERM)
            events = sse_json(iter([*head, *lines]))
    assert events[-1]["error"]["code"] == "server_shutting_down"  # ended early, said so
    assert len(events) < 2000  # of 4000
    assert proc.process.wait(30) == 0
    log = proc.log()
    assert "dera-serve: stopped" in log and "Traceback" not in log, log


def test_ctrl_c_stops_the_server_cleanly(paths, env, tmp_path):
    ref, aligned, _ = paths
    proc = ServerProcess(["--ref", str(ref), "--aligned", str(aligned), "--n-ctx", "256"], env, tmp_path / "s.log")
    with proc.http() as http:
        assert http.get("/v1/models").json()["data"][0]["id"] == "aligned"  # the aligned file's name
    assert proc.stop(signal.SIGINT) == 0
    log = proc.log()
    assert "dera-serve: stopped" in log and "Traceback" not in log and "KeyboardInterrupt" not in log, log


# ------------------------------------------------------- command line errors


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--pair", "nope"], "unknown pair 'nope'"),
        (["--pair", "tiny", "--pair", "tiny"], "given twice"),
        (["--pair", "tiny", "--alias", "x"], "--alias"),
        (["--pair", "tiny2", "--lam", "0.5"], "2 aligned"),
        (["--lam", "nan"], "finite"),
        (["--lam-presets", "0,x"], "'x' is not a number"),
    ],
)
def test_command_line_errors_are_one_line(env, args, fragment):
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("Error: ") and fragment in result.output, result.output


# ------------------------------------------------------------ weight-space mode


def test_mode_per_request_and_default_for_a_lora_pair(env, paths, tmp_path):
    """--mode weights serves the adapter at scale lam; a request's "mode" wins; a bad mode is a 400."""
    from tiny_models import write_tiny_lora

    ref = paths[0]
    adapter = write_tiny_lora(tmp_path / "adapter.gguf", seed=9)
    args = ["--ref", str(ref), "--aligned", str(adapter), "--alias", "lora", "--n-ctx", "512", "--mode", "weights"]
    proc = ServerProcess(args, env, tmp_path / "server.log")
    try:
        with proc.http() as http:
            ask = dict(messages=CAT, max_tokens=10, **GREEDY)
            got = http.post("/v1/chat/completions", json=dict(ask, model="lora@0.5")).json()
            weight_space = llama_cpp.Llama(
                model_path=str(ref), lora_path=str(adapter), lora_scale=0.5, n_ctx=512, verbose=False
            )
            assert got["choices"][0]["message"]["content"] == chat_answer(weight_space, CAT, **ask_kw(ask))[0]
            got = http.post("/v1/chat/completions", json=dict(ask, model="lora@0.5", mode="blend")).json()
            blend = DeRaLlama(str(ref), str(adapter), n_ctx=512, verbose=False)
            assert got["choices"][0]["message"]["content"] == chat_answer(blend, CAT, lam=0.5, **ask_kw(ask))[0]
            bad = http.post("/v1/chat/completions", json=dict(ask, model="lora", mode="weight"))
            assert bad.status_code == 400 and "mode" in bad.json()["error"]["message"]
    finally:
        assert proc.stop(signal.SIGTERM) == 0, proc.log()


def test_weights_mode_for_a_full_model_pair_is_refused_before_its_weights_load(env):
    result = CliRunner().invoke(main, ["--pair", "tiny", "--mode", "weights"], env=env)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "Error: " in result.output and "full GGUF model" in result.output, result.output


def test_weights_mode_on_a_full_model_pair_is_a_400(http):
    body = dict(model="tiny", messages=HELLO, max_tokens=4, mode="weights")
    answer = http.post("/v1/chat/completions", json=body)
    assert answer.status_code == 400 and "full GGUF model" in answer.json()["error"]["message"]


def ask_kw(ask: dict) -> dict:
    """A request body's sampling fields as DeRaLlama / Llama keyword arguments."""
    return {k: v for k, v in ask.items() if k != "messages"}


def test_speculative_server_streams_the_blends_greedy_answer(env, paths, tmp_path):
    """--speculative model: drafts verified in batches, streamed; the text is the blend's (plain Llamas in numpy)."""
    lam, n = 1.5, 24
    proc = ServerProcess(["--pair", "tiny", "--n-ctx", "512", "--speculative", "model"], env, tmp_path / "server.log")
    try:
        with proc.http() as http:
            body = dict(model=f"tiny@{lam}", messages=HELLO, max_tokens=n, stream=True, **GREEDY)
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                events = sse_json(r.iter_lines())
    finally:
        assert proc.stop(signal.SIGTERM) == 0, proc.log()
    content = chunk_text(events)
    models = [R.plain(paths[0]), R.plain(paths[1])]
    prompt = _chat_prompt_tokens(models[0], HELLO)
    tokens, _ = R.greedy(models, [1 - lam, lam], prompt, n, stop=[2, 4])
    assert content == models[0].detokenize([t for t in tokens if t not in (2, 4)], prev_tokens=prompt).decode(
        errors="ignore"
    )
