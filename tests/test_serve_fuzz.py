"""No request body a client can send gets a 5xx from dera-serve, on slots and one at a time.

Hypothesis draws bodies for both routes from every field the routes take, each with good
values, edge values, wrong types, nulls and the field's default spelt out (as many clients
send it), in any combination. Every answer must be a 2xx or an OpenAI-shaped 4xx; a stream
must not end in a server error event. After the run the server answers a fixed request as
a DeRaLlama of the test's own does, so nothing it went through changed what it serves.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_driver import tiny_pair, tiny_server

from dera_gguf import DeRaLlama

CAP = 4  # --max-tokens: short answers keep the run fast
GREEDY = dict(temperature=0.0, top_k=50, top_p=0.95, min_p=0.0, repeat_penalty=1.0)

anything = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=5)
)
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=8)})
odd_part = st.sampled_from(
    [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "text"},
        {"kind": "text"},
    ]
)
user = st.fixed_dictionaries(
    {"role": st.just("user"), "content": st.one_of(st.text(max_size=12), st.lists(text_part, min_size=1, max_size=3))}
)
turn = st.one_of(
    user,
    st.fixed_dictionaries({"role": st.sampled_from(["system", "assistant"]), "content": st.text(max_size=8)}),
    st.just({"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}),
    st.just({"role": "tool", "content": "42", "tool_call_id": "c"}),
    st.just({"role": "user", "content": "hi", "name": "ann"}),
)  # fmt: skip
odd_turn = st.one_of(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["function", "developer", "x", ""])}, optional={"content": anything}
    ),
    st.fixed_dictionaries({"role": st.just("user"), "content": st.lists(st.one_of(text_part, odd_part), max_size=3)}),
    st.fixed_dictionaries({"role": st.just("user"), "content": st.one_of(st.none(), st.integers())}),
    anything,
)
good_schema = st.sampled_from(
    [
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
        {"type": "string", "maxLength": 3},
    ]
)
odd_schema = st.sampled_from([{"$ref": "#/missing"}, {"type": "nonsense"}, [], "x"])
json_schema = lambda schema: st.builds(
    lambda sc, strict: {"type": "json_schema", "json_schema": {"name": "r", "schema": sc, "strict": strict}},
    schema,
    st.booleans(),
)
tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}

# Values a client may well send (defaults spelt out and nulls included) ...
GOOD = {
    "model": st.sampled_from(["tiny", "tiny@0", "tiny@1", "tiny@1.5", "tiny@-0.5"]),
    "lam": st.one_of(st.none(), st.floats(-1, 2.5), st.lists(st.floats(0, 2), min_size=2, max_size=3)),
    "mode": st.sampled_from(["blend", None]),
    "temperature": st.one_of(st.none(), st.sampled_from([0.0, 0.7, 1.0]), st.floats(0, 2)),
    "top_p": st.one_of(st.none(), st.floats(0, 1)),
    "top_k": st.one_of(st.none(), st.integers(0, 100)),
    "min_p": st.one_of(st.none(), st.floats(0, 1)),
    "repeat_penalty": st.one_of(st.none(), st.floats(0.5, 2)),
    "presence_penalty": st.one_of(st.none(), st.floats(-2, 2)),
    "frequency_penalty": st.one_of(st.none(), st.floats(-2, 2)),
    "max_tokens": st.one_of(st.none(), st.integers(1, 8)),
    "seed": st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    "n": st.one_of(st.none(), st.integers(1, 3)),
    "stop": st.one_of(st.none(), st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3)),
    "stream": st.one_of(st.booleans(), st.none()),
    "stream_options": st.one_of(st.none(), st.fixed_dictionaries({"include_usage": st.booleans()})),
    "logit_bias": st.one_of(
        st.none(), st.dictionaries(st.sampled_from(["1", "5", "30"]), st.floats(-100, 100), max_size=2)
    ),
    "logit_bias_type": st.sampled_from(["input_ids", None]),
    "user": st.one_of(st.none(), st.text(max_size=4)),
    "grammar": st.sampled_from([None, 'root ::= "a" | "b"']),
    "min_tokens": st.one_of(st.none(), st.integers(0, 3)),
    "mirostat_mode": st.sampled_from([None, 0, 1, 2]),
    "mirostat_tau": st.one_of(st.none(), st.floats(0.1, 10)),
    "mirostat_eta": st.one_of(st.none(), st.floats(0.01, 1)),
    "best_of": st.sampled_from([None, 1]),
}
CHAT = {
    **GOOD,
    "messages": st.lists(turn, min_size=1, max_size=3),
    "logprobs": st.one_of(st.none(), st.booleans()),
    "top_logprobs": st.one_of(st.none(), st.integers(0, 5)),
    "response_format": st.one_of(
        st.none(), st.sampled_from([{"type": "text"}, {"type": "json_object"}]), json_schema(good_schema)
    ),
    "tools": st.sampled_from([None, [], [tool]]),
    "tool_choice": st.sampled_from([None, "auto", "none"]),
    "max_completion_tokens": st.one_of(st.none(), st.integers(1, 8)),
}
COMPLETION = {
    **GOOD,
    "prompt": st.one_of(
        st.text(min_size=1, max_size=12),
        st.lists(st.integers(3, 300), min_size=1, max_size=5),
        st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=3),
        st.lists(st.lists(st.integers(3, 300), min_size=1, max_size=4), min_size=1, max_size=3),
    ),
    "logprobs": st.one_of(st.none(), st.integers(0, 5)),
    "echo": st.one_of(st.booleans(), st.none()),
    "suffix": st.one_of(st.none(), st.text(max_size=4)),
}
# ... and values at the edges or wrong, a few of which replace good ones in a body.
ODD = {
    "model": st.sampled_from(["tiny@x", "nope", "", None, 3, "tiny@1,2"]),
    "lam": st.one_of(
        st.floats(-1e6, 1e6),
        st.lists(st.lists(st.floats(0, 1), max_size=2), max_size=2),
        anything,
        st.lists(st.floats(0, 1), max_size=40),
    ),
    "mode": st.sampled_from(["weights", "other", 1]),
    "temperature": st.one_of(st.floats(-5, 1e9), anything),
    "top_p": st.one_of(st.floats(-1, 5), anything),
    "top_k": st.one_of(st.integers(-5, 10**9), anything),
    "min_p": st.one_of(st.floats(-1, 5), anything),
    "repeat_penalty": st.one_of(st.floats(-3, 0), anything),
    "max_tokens": st.one_of(st.integers(-3, 0), st.just(10**9), anything),
    "seed": st.one_of(st.integers(-(2**40), -1), st.integers(2**32, 2**64), anything),
    "n": st.one_of(st.integers(-2, 0), st.integers(9, 300), anything),
    "stop": st.one_of(
        st.lists(st.just(""), min_size=1, max_size=2), st.lists(st.text(max_size=3), min_size=5, max_size=9), anything
    ),
    "stream_options": anything,
    "logit_bias": st.dictionaries(
        st.sampled_from(["-1", "999999", "a", "1.5"]), st.floats(-1e9, 1e9), min_size=1, max_size=2
    ),
    "logit_bias_type": st.sampled_from(["tokens", "x"]),
    "grammar": st.sampled_from(["root ::= (", "", "x ::= 'a'", 5]),
    "min_tokens": st.one_of(st.integers(-3, 10**6), anything),
    "mirostat_mode": st.sampled_from([3, -1, "x"]),
    "best_of": st.integers(-1, 5),
    "messages": st.one_of(st.just([]), st.lists(odd_turn, min_size=1, max_size=3), anything),
    "response_format": st.one_of(
        json_schema(odd_schema), st.sampled_from([{"type": "xml"}, "json", {"type": "json_schema"}])
    ),
    "tools": st.sampled_from(["x", [{"type": "function"}], [{}]]),
    "tool_choice": st.sampled_from([{"type": "function", "function": {"name": "f"}}, 3, "required"]),
    "top_logprobs": st.one_of(st.integers(-3, -1), st.integers(6, 10**6), anything),
    "prompt": st.one_of(
        st.just(""),
        st.just([]),
        st.lists(st.integers(-5, 10**6), max_size=4),
        st.just([[]]),
        st.lists(st.just("a" * 600), min_size=1, max_size=2),
        anything,
    ),
    "echo": anything,
    "suffix": anything,
}


def bodies(fields: dict, required: tuple):
    """A body with the ``required`` fields, any of the others (good values), then up to two odd values."""
    good = st.fixed_dictionaries(
        {k: fields[k] for k in required}, optional={k: v for k, v in fields.items() if k not in required}
    )
    names = sorted(set(ODD) & set(fields))
    odd = st.lists(st.sampled_from(names), max_size=2, unique=True).flatmap(
        lambda chosen: st.fixed_dictionaries({n: ODD[n] for n in chosen})
    )
    return st.builds(lambda g, o: {**g, **o}, good, odd)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module", params=["4", "1"], ids=["slots", "one-at-a-time"])
def server(tmp_path_factory, paths, request):
    args = ["--n-ctx", "256", "--max-tokens", str(CAP), "--logprobs", "--parallel", request.param]
    yield from tiny_server(tmp_path_factory, paths, *args)


def answered_without_server_error(http: httpx.Client, route: str, body: dict) -> None:
    stream = isinstance(body, dict) and body.get("stream") is True
    if not stream:
        r = http.post(route, json=body)
        assert r.status_code < 500, (body, r.text)
        assert r.status_code < 300 or set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
        return
    with http.stream("POST", route, json=body) as r:
        assert r.status_code < 500, (body, r.read())
        if r.status_code >= 300:
            return
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[len("data: ") :])
                assert "error" not in event or event["error"]["type"] != "server_error", (body, event)


SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


ROUTES = [("/v1/chat/completions", CHAT, ("model", "messages")), ("/v1/completions", COMPLETION, ("model", "prompt"))]


@pytest.mark.parametrize("route,fields,required", ROUTES, ids=["chat", "completions"])
def test_no_body_gets_a_5xx_and_the_server_serves_the_same_after(server, paths, route, fields, required):
    with server.http(timeout=60) as http:

        @SETTINGS
        @given(body=bodies(fields, required))
        def check(body):
            answered_without_server_error(http, route, body)

        check()
        messages = [{"role": "user", "content": "hello world"}]
        r = http.post("/v1/chat/completions", json=dict(model="tiny@1.5", messages=messages, max_tokens=CAP, **GREEDY))
    engine = DeRaLlama(str(paths[0]), str(paths[1]), n_ctx=256, verbose=False)
    expected = engine.create_chat_completion(messages, lam=1.5, max_tokens=CAP, **GREEDY)
    assert r.status_code == 200 and r.json()["choices"][0]["message"] == expected["choices"][0]["message"]
