"""dera-serve's several choices per request (a lam list, or n samples), through a real server process.

Each choice is compared with the same request sent alone at the choice's lam (and seed),
answered by the same server's one-answer path, which tests/test_serve.py checks against
separate engines and plain models blended in numpy; the decoding itself is checked against
plain Llamas in tests/test_choices.py. The tiny test models give the same greedy tokens in a
batch of several sequences as alone (their top-2 margins lie far above llama.cpp's
batch-shape drift here, as tests/test_choices.py measures).
"""

from __future__ import annotations

import signal
import time

import openai
import pytest
from serve_driver import ServerProcess, sse_data, sse_json
from test_serve import (  # noqa: F401 (fixtures)
    CAP,
    CAT,
    EOG_BAN,
    GREEDY,
    HELLO,
    KEY,
    _openai,
    assert_engine_free,
    env,
    long_answer_server,
    paths,
)

LAMS = [0.0, 0.5, 1.0, 1.5, 2.0]
SAMPLED = dict(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0)


@pytest.fixture(scope="module")
def server(env, tmp_path_factory):  # noqa: F811 (fixture)
    args = ["--pair", "tiny", "--pair", "tiny2", "--n-ctx", "512", "--max-tokens", str(CAP)]
    proc = ServerProcess(args, env, tmp_path_factory.mktemp("log") / "server.log", api_key=KEY)
    yield proc
    assert proc.stop(signal.SIGTERM) == 0, proc.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with server.http(timeout=120) as c:
        yield c


def alone(client, lam, **settings):
    """(content, finish_reason, usage) of one chat request at ``lam``."""
    resp = client.chat.completions.create(model="tiny", messages=CAT, **_openai(settings, lam=lam))
    return resp.choices[0].message.content, resp.choices[0].finish_reason, resp.usage


def test_each_choice_of_a_lam_list_is_the_request_at_its_lam(client):
    settings = dict(GREEDY, max_tokens=24)
    resp = client.chat.completions.create(model="tiny", messages=CAT, **_openai(settings, lam=LAMS))
    expected = [alone(client, lam, **settings) for lam in LAMS]
    assert len({content for content, *_ in expected}) == len(LAMS)  # the lams answer differently: a mix-up shows
    assert [c.index for c in resp.choices] == list(range(len(LAMS)))
    assert [c.model_extra["lam"] for c in resp.choices] == LAMS
    assert [(c.message.content, c.finish_reason) for c in resp.choices] == [e[:2] for e in expected]
    assert resp.usage.prompt_tokens == expected[0][2].prompt_tokens  # the prompt counted once
    assert resp.usage.completion_tokens == sum(e[2].completion_tokens for e in expected)
    assert resp.model == "tiny"


def test_n_equal_to_the_lam_list_and_an_alias_model_id(client):
    settings = dict(GREEDY, max_tokens=12)
    resp = client.chat.completions.create(model="tiny@1.5", messages=CAT, n=2, **_openai(settings, lam=[2, 0.5]))
    assert resp.model == "tiny@1.5"
    assert [(c.message.content, c.model_extra["lam"]) for c in resp.choices] == [
        (alone(client, lam, **settings)[0], lam) for lam in (2, 0.5)
    ]


def test_several_aligned_models_take_a_list_of_lam_lists(client):
    lams = [[0.5, 1.0], [1.0, 1.0], [1.5, -0.5]]
    settings = dict(GREEDY, max_tokens=12)
    resp = client.chat.completions.create(model="tiny2", messages=HELLO, **_openai(settings, lam=lams))
    for choice, lam in zip(resp.choices, lams):
        one = client.chat.completions.create(model="tiny2", messages=HELLO, **_openai(settings, lam=lam))
        assert (choice.message.content, choice.model_extra["lam"]) == (one.choices[0].message.content, lam)


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_streamed_choices_are_the_whole_answers_choices(http, route):
    """Chunks carry one choice each; joined per index they are the whole answer's texts, finish reasons
    and (with include_usage) usage."""
    lams = [0.5, 1.5, 2.0]
    ask = dict(model="tiny", lam=lams, max_tokens=20, **GREEDY)
    ask.update(dict(messages=HELLO) if route == "chat" else dict(prompt="the cat sat on"))
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    whole = http.post(path, json=ask).json()
    with http.stream("POST", path, json=dict(ask, stream=True, stream_options={"include_usage": True})) as r:
        events = sse_json(r.iter_lines())
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"] == whole["usage"]
    texts, finishes = [""] * len(lams), [None] * len(lams)
    for event in events[:-2]:
        (choice,) = event["choices"]
        assert choice["lam"] == lams[choice["index"]]
        piece = choice["delta"].get("content") if route == "chat" else choice["text"]
        texts[choice["index"]] += piece or ""
        finishes[choice["index"]] = choice["finish_reason"] or finishes[choice["index"]]
    key = "message" if route == "chat" else None
    assert texts == [c[key]["content"] if key else c["text"] for c in whole["choices"]]
    assert finishes == [c["finish_reason"] for c in whole["choices"]]
    if route == "chat":  # every choice's first chunk names the role
        firsts = {e["choices"][0]["index"]: e["choices"][0]["delta"] for e in reversed(events[:-2])}
        assert all(delta == {"role": "assistant"} for delta in firsts.values())


def test_stop_strings_cut_each_choice_as_they_cut_one_answer(client):
    settings = dict(GREEDY, max_tokens=24)
    texts = [alone(client, lam, **settings)[0] for lam in LAMS]
    stop = texts[3][6:8]  # two characters of the lam 1.5 answer: it stops there, others maybe elsewhere
    settings["stop"] = [stop]
    resp = client.chat.completions.create(model="tiny", messages=CAT, **_openai(settings, lam=LAMS))
    expected = [alone(client, lam, **settings)[:2] for lam in LAMS]
    assert expected[3] == (texts[3][: texts[3].index(stop)], "stop")
    assert [(c.message.content, c.finish_reason) for c in resp.choices] == expected
    stream = client.chat.completions.create(model="tiny", messages=CAT, stream=True, **_openai(settings, lam=LAMS))
    joined = [""] * len(LAMS)
    for chunk in stream:
        joined[chunk.choices[0].index] += chunk.choices[0].delta.content or ""
    assert joined == [e[0] for e in expected]


def test_n_samples_of_one_lam_are_seeded_and_reproduce(client):
    """n samples at one lam draw with seed, seed + 1, ...: each is the request alone with that seed."""
    settings = dict(SAMPLED, max_tokens=16, seed=11)
    ask = lambda: client.chat.completions.create(model="tiny", messages=CAT, n=3, **_openai(settings, lam=1.5))
    first, again = ask(), ask()
    contents = [c.message.content for c in first.choices]
    assert contents == [c.message.content for c in again.choices]
    assert len(set(contents)) > 1  # samples, not copies
    assert [c.model_extra["lam"] for c in first.choices] == [1.5] * 3
    assert contents == [alone(client, 1.5, **dict(settings, seed=11 + i))[0] for i in range(3)]


def test_sampled_lam_list_draws_every_choice_with_the_requests_seed(client):
    settings = dict(SAMPLED, max_tokens=16, seed=5)
    resp = client.chat.completions.create(model="tiny", messages=CAT, **_openai(settings, lam=[0.5, 1.5]))
    assert [c.message.content for c in resp.choices] == [alone(client, lam, **settings)[0] for lam in (0.5, 1.5)]


def test_completions_with_n_and_token_id_prompts(http):
    ask = dict(model="tiny", prompt=[1, 5, 6, 7, 8], max_tokens=10, lam=[0.0, 2.0], **GREEDY)
    resp = http.post("/v1/completions", json=ask).json()
    singles = [http.post("/v1/completions", json=dict(ask, lam=lam)).json() for lam in (0.0, 2.0)]
    assert resp["object"] == "text_completion"
    assert [c["text"] for c in resp["choices"]] == [s["choices"][0]["text"] for s in singles]
    assert resp["usage"]["prompt_tokens"] == 5


def test_the_server_answers_one_answer_requests_as_before_after_several(client):
    settings = dict(GREEDY, max_tokens=12)
    before = alone(client, 1.5, **settings)
    client.chat.completions.create(model="tiny", messages=HELLO, **_openai(settings, lam=[0, 1, 2]))
    assert alone(client, 1.5, **settings) == before


def test_logit_bias_by_token_id_applies_to_every_choice(client):
    settings = dict(GREEDY, max_tokens=CAP, logit_bias=EOG_BAN)
    resp = client.chat.completions.create(model="tiny", messages=HELLO, **_openai(settings, lam=[0.5, 2.0]))
    for choice, lam in zip(resp.choices, (0.5, 2.0)):
        one = client.chat.completions.create(model="tiny", messages=HELLO, **_openai(settings, lam=lam))
        assert (choice.message.content, choice.finish_reason) == (one.choices[0].message.content, "length")
    assert resp.usage.completion_tokens == 2 * CAP


# ------------------------------------------------------ process lifecycle


def test_client_disconnect_mid_stream_of_several_choices_frees_the_engine(env, paths, tmp_path):  # noqa: F811
    """Eight 4000-token choices dropped after 40 chunks: the next request need not wait for the rest."""
    proc, ask = long_answer_server(paths, env, tmp_path)
    lams = [0, 0.25, 0.5, 0.75, 1.25, 1.5, 1.75, 2]
    body = dict(model="my-dpo", messages=HELLO, max_tokens=40, logit_bias=EOG_BAN, lam=lams, **GREEDY)
    try:
        with proc.http() as http:
            assert http.post("/v1/chat/completions", json=ask).status_code == 200  # warm-up (first call is slow)
            assert http.post("/v1/chat/completions", json=body).status_code == 200  # (makes the choices' contexts)
            start = time.monotonic()
            assert http.post("/v1/chat/completions", json=body).status_code == 200
            seconds_per_step = (time.monotonic() - start) / 40
            with http.stream("POST", "/v1/chat/completions", json=dict(body, stream=True, max_tokens=4000)) as r:
                for n, _ in enumerate(sse_data(r.iter_lines())):
                    if n == 40:
                        break
        assert_engine_free(proc, paths, ask, seconds_per_step)
    finally:
        assert proc.stop(signal.SIGTERM) == 0, proc.log()


def test_sigterm_ends_a_stream_of_several_choices_cleanly(env, paths, tmp_path):  # noqa: F811
    proc, ask = long_answer_server(paths, env, tmp_path)
    body = dict(ask, stream=True, max_tokens=4000, logit_bias=EOG_BAN, lam=[0.5, 1.5])
    with proc.http() as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(lines)
            proc.process.send_signal(signal.SIGTERM)
            events = sse_json(iter([first, *lines]))
    assert proc.process.wait(60) == 0, proc.log()
    assert events[-1]["error"]["code"] == "server_shutting_down"
    assert "Traceback" not in proc.log(), proc.log()
