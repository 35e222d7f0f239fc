"""dera-serve as the clients people point at it send their requests: raw JSON bodies with every
field spelt out (``"stream": false``, nulls, defaults), log-probs, echo, content parts, structured
outputs, several prompts, the tokenizer routes.

Every expected number comes from plain ``llama_cpp.Llama`` instances of the test's own, blended in
numpy (tests/reference.py), or from a DeRaLlama of the test's own; never from the server's objects.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import openai
import pytest
import reference as R
from serve_driver import sse_json, tiny_pair, tiny_server
from test_chat import _chat_prompt_tokens

from dera_gguf import DeRaLlama

CAP = 24
GREEDY = dict(temperature=0.0, top_k=50, top_p=0.95, min_p=0.0, repeat_penalty=1.0)
EOS, IM_END = 2, 4  # the tiny vocabulary's end tokens
HELLO = [{"role": "user", "content": "hello world"}]
PROMPT = "tell me about the sun"


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module", params=["4", "1"], ids=["slots", "one-at-a-time"])
def server(tmp_path_factory, paths, request):
    args = ["--n-ctx", "512", "--max-tokens", str(CAP), "--logprobs", "--parallel", request.param]
    yield from tiny_server(tmp_path_factory, paths, *args)


@pytest.fixture(scope="module")
def http(server):
    with server.http() as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def plains(paths):
    return [R.plain(paths[0], n_ctx=512), R.plain(paths[1], n_ctx=512)]


@pytest.fixture(scope="module")
def engine(paths):
    return DeRaLlama(str(paths[0]), str(paths[1]), n_ctx=512, verbose=False)


def text_prompt(llm, text):
    """A text prompt's tokens as llama-cpp-python makes them: BOS, then the text with special tokens parsed."""
    return [llm.token_bos()] + llm.tokenize(text.encode(), add_bos=False, special=True)


def blend_logprobs(plains, lam, prompt, n):
    """Greedy tokens of the numpy blend and each step's log-probs (float64)."""
    tokens, logits = R.greedy(plains, [1 - lam, lam], prompt, n, stop=[EOS, IM_END])
    return tokens, [R.log_softmax(z) for z in logits]


def prompt_logprobs(plains, lam, prompt):
    """Row i: the blend's log-probs after prompt[: i + 1]."""
    for m in plains:
        m.reset()
    rows = R.step_logits(plains, prompt)
    return R.log_softmax(R.blend(rows, [1 - lam, lam]))


# ------------------------------------------------- bodies as clients send them

EXPLICIT_DEFAULTS = dict(stream=False, n=1, stop=None, user="someone", logit_bias=None, stream_options=None)


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_stream_false_and_defaults_spelt_out_are_answered(http, engine, route):
    """Open WebUI sends "stream": false on its title and tag requests; clients send defaults and nulls."""
    settings = dict(GREEDY, max_tokens=12)
    if route == "chat":
        body = dict(model="tiny@1.5", messages=HELLO, logprobs=False, top_logprobs=None, **EXPLICIT_DEFAULTS)
        r = http.post("/v1/chat/completions", json={**body, **settings})
        expected = engine.create_chat_completion(HELLO, lam=1.5, **settings)["choices"][0]["message"]["content"]
        got = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
    else:
        body = dict(model="tiny@1.5", prompt=PROMPT, echo=False, suffix=None, best_of=1, **EXPLICIT_DEFAULTS)
        r = http.post("/v1/completions", json={**body, **settings})
        expected = engine.create_completion(PROMPT, lam=1.5, **settings)["choices"][0]["text"]
        got = r.json()["choices"][0]["text"] if r.status_code == 200 else r.text
    assert r.status_code == 200 and got == expected


# ------------------------------------------------------------------ log-probs


@pytest.mark.parametrize("lam", [0.0, 1.0, 1.5])
def test_completion_logprobs_whole_and_streamed_are_the_blends(http, plains, lam):
    n, k = 8, 3
    tokens, rows = blend_logprobs(plains, lam, text_prompt(plains[0], PROMPT), n)
    body = dict(model="tiny", lam=lam, prompt=PROMPT, logprobs=k, max_tokens=n, **GREEDY)
    whole = http.post("/v1/completions", json=body)
    assert whole.status_code == 200, whole.text
    lp = whole.json()["choices"][0]["logprobs"]
    with http.stream("POST", "/v1/completions", json=dict(body, stream=True)) as r:
        chunks = [c for c in sse_json(r.iter_lines()) if isinstance(c, dict) and c["choices"]]
    streamed = [v for c in chunks if c["choices"][0]["logprobs"] for v in c["choices"][0]["logprobs"]["token_logprobs"]]
    kept = [i for i, t in enumerate(tokens) if t not in (EOS, IM_END)]
    for got in (lp["token_logprobs"], streamed):
        assert len(got) == len(kept)
        for value, i in zip(got, kept):
            assert isinstance(value, float) and value == pytest.approx(rows[i][tokens[i]], abs=R.LOGPROB_ATOL)
    for top, i in zip(lp["top_logprobs"], kept):  # the k largest of the row, plus the drawn token
        assert sorted(top.values(), reverse=True)[:k] == pytest.approx(np.sort(rows[i])[::-1][:k], abs=R.LOGPROB_ATOL)


@pytest.mark.parametrize("lam", [0.0, 1.0, 1.5])
def test_chat_logprobs_through_the_openai_client(client, plains, lam):
    n = 8
    tokens, rows = blend_logprobs(plains, lam, _chat_prompt_tokens(plains[0], HELLO), n)
    kept = [i for i, t in enumerate(tokens) if t not in (EOS, IM_END)]
    extra = dict(extra_body=dict(lam=lam, top_k=50, min_p=0.0, repeat_penalty=1.0))
    resp = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=n, temperature=0, logprobs=True, top_logprobs=2, **extra
    )
    content = resp.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([rows[i][tokens[i]] for i in kept], abs=R.LOGPROB_ATOL)
    for c, i in zip(content, kept):
        assert [t.logprob for t in c.top_logprobs][:1] == pytest.approx([rows[i].max()], abs=R.LOGPROB_ATOL)
    stream = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=n, temperature=0, logprobs=True, top_logprobs=2, stream=True, **extra
    )
    streamed = [c.logprob for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for c in chunk.choices[0].logprobs.content or []]  # fmt: skip
    assert streamed == pytest.approx([c.logprob for c in content], abs=R.LOGPROB_ATOL)


@pytest.mark.parametrize("lam", [0.0, 1.0, 0.5])
def test_echo_gives_the_prompts_logprobs_under_the_blend(http, plains, lam):
    prompt = text_prompt(plains[0], PROMPT)
    rows = prompt_logprobs(plains, lam, prompt)
    body = dict(model="tiny", lam=lam, prompt=PROMPT, echo=True, logprobs=2, max_tokens=1, **GREEDY)
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    shown = prompt[1:]  # a text prompt is echoed without the BOS the model adds
    assert choice["text"].startswith(PROMPT) and len(lp["tokens"]) == len(shown) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    # shown[i] (prompt[i + 1]) is predicted by row i
    expected = [rows[i][shown[i]] for i in range(1, len(shown))] + [rows[-1].max()]
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=R.LOGPROB_ATOL)
    pieces = [plains[0].detokenize([t], prev_tokens=shown[:i]).decode() for i, t in enumerate(shown)]
    assert lp["tokens"][:-1] == pieces
    assert lp["text_offset"][:-1] == [len("".join(pieces[:i])) for i in range(len(shown))]


def test_echo_of_token_ids_shows_every_token_sent(http, plains):
    prompt = plains[0].tokenize(b"the cat sat", add_bos=False)  # no BOS: echoed as sent
    rows = prompt_logprobs(plains, 1.0, prompt)
    body = dict(model="tiny@1", prompt=prompt, echo=True, logprobs=1, max_tokens=1, **GREEDY)
    lp = http.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(prompt) + 1
    expected = [rows[i - 1][prompt[i]] for i in range(1, len(prompt))]
    assert lp["token_logprobs"][1 : len(prompt)] == pytest.approx(expected, abs=R.LOGPROB_ATOL)


def test_echo_lists_an_end_token_drawn_first(http, plains):
    """lm-eval drops the last entry as the generated token: it must be there when the answer ends at once."""
    prompt = text_prompt(plains[0], PROMPT)
    rows = prompt_logprobs(plains, 0.5, prompt)
    body = dict(model="tiny@0.5", prompt=PROMPT, echo=True, logprobs=1, max_tokens=1, logit_bias={str(EOS): 100})
    choice = http.post("/v1/completions", json=dict(body, **GREEDY)).json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == PROMPT
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(prompt)  # the prompt without BOS, then the end token
    assert lp["tokens"][-1] == plains[0].detokenize([EOS], special=True).decode()
    assert lp["token_logprobs"][-1] == pytest.approx(rows[-1][EOS], abs=R.LOGPROB_ATOL)


# ------------------------------------------------------------ prompts, parts


def test_several_prompts_are_answered_in_order(http, engine):
    texts = [PROMPT, "the cat", "hello world"]
    ids = [engine.tokenize(t.encode(), add_bos=False) for t in texts]
    settings = dict(GREEDY, max_tokens=10)
    for prompts in (texts, ids):
        r = http.post("/v1/completions", json=dict(model="tiny@1.5", prompt=prompts, **settings))
        assert r.status_code == 200, r.text
        out = r.json()
        expected = [engine.create_completion(p, lam=1.5, **settings) for p in prompts]
        assert [c["index"] for c in out["choices"]] == [0, 1, 2]
        assert [c["text"] for c in out["choices"]] == [e["choices"][0]["text"] for e in expected]
        assert out["usage"]["prompt_tokens"] == sum(e["usage"]["prompt_tokens"] for e in expected)


def test_content_parts_are_the_joined_text(client, engine):
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]
    resp = client.chat.completions.create(
        model="tiny@1.5", messages=[{"role": "user", "content": parts}], max_tokens=12, temperature=0
    )
    joined = [{"role": "user", "content": "hello\nworld"}]
    expected = engine.create_chat_completion(joined, lam=1.5, max_tokens=12, temperature=0, top_k=50, top_p=0.95,
                                             min_p=0.0, repeat_penalty=1.0)  # fmt: skip
    assert resp.choices[0].message.content == expected["choices"][0]["message"]["content"]
    one = [{"role": "user", "content": [{"type": "text", "text": "hello world"}]}]
    alone = client.chat.completions.create(model="tiny@1.5", messages=one, max_tokens=12, temperature=0)
    plain = client.chat.completions.create(model="tiny@1.5", messages=HELLO, max_tokens=12, temperature=0)
    assert alone.choices[0].message.content == plain.choices[0].message.content


def test_a_part_the_model_cannot_read_is_a_400_naming_it(http):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, image]}]
    r = http.post("/v1/chat/completions", json=dict(model="tiny", messages=messages))
    assert r.status_code == 400 and "image_url" in r.json()["error"]["message"]


def test_tool_turns_pass_as_llama_cpp_python_takes_them(http):
    messages = [
        *HELLO,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]  # fmt: skip
    r = http.post("/v1/chat/completions", json=dict(model="tiny", messages=messages, max_tokens=4))
    assert r.status_code in (200, 400) and r.status_code < 500, r.text  # a template may refuse a role: never a 500


def test_structured_outputs_follow_the_schema(client, engine):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 6}, "n": {"type": "integer"}},
        "required": ["answer", "n"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}
    resp = client.chat.completions.create(
        model="tiny@1.5", messages=HELLO, temperature=0, max_tokens=CAP, response_format=fmt
    )
    settings = dict(GREEDY, max_tokens=CAP)
    expected = engine.create_chat_completion(
        HELLO, lam=1.5, response_format={"type": "json_object", "schema": schema}, **settings
    )["choices"][0]["message"]["content"]
    assert resp.choices[0].message.content == expected
    if resp.choices[0].finish_reason == "stop":
        parsed = json.loads(expected)
        assert set(parsed) == {"answer", "n"} and isinstance(parsed["n"], int)


def test_a_schema_that_cannot_become_a_grammar_is_a_400(http):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/definitions/missing"}}}
    r = http.post("/v1/chat/completions", json=dict(model="tiny", messages=HELLO, response_format=fmt))
    assert r.status_code == 400 and "schema" in r.json()["error"]["message"]


# ------------------------------------------------------------ tokenizer routes


def test_tokenizer_routes_are_the_models_tokenizer(http, plains):
    ref = plains[0]
    text = "hello world</s>"
    with_bos = ref.tokenize(text.encode(), add_bos=True, special=True)
    without = ref.tokenize(text.encode(), add_bos=False, special=True)
    got = http.post("/tokenize", json=dict(prompt=text)).json()
    assert got["tokens"] == with_bos and got["count"] == len(with_bos) and got["max_model_len"] == 512
    assert http.post("/tokenize", json=dict(prompt=text, add_special_tokens=False)).json()["tokens"] == without
    chat = http.post("/tokenize", json=dict(model="tiny@1.5", messages=HELLO)).json()["tokens"]
    assert chat == list(_chat_prompt_tokens(ref, HELLO))
    text_back = ref.detokenize(without, special=True).decode(errors="replace")
    assert http.post("/detokenize", json=dict(tokens=without)).json()["prompt"] == text_back
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == ref.detokenize([ref.token_eos()], special=True).decode()
    assert info["bos_token"] == ref.detokenize([ref.token_bos()], special=True).decode()
    assert info["chat_template"] == ref.metadata["tokenizer.chat_template"]
    assert http.post("/extras/tokenize", json=dict(input=text)).json()["tokens"] == with_bos
    assert http.post("/extras/tokenize/count", json=dict(input=text)).json()["count"] == len(with_bos)
    assert http.post("/extras/detokenize", json=dict(tokens=without)).json()["text"] == text_back
    bad = http.post("/detokenize", json=dict(tokens=[10**7]))
    assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_several_choices_each_carry_their_lams_logprobs(http, plains, stream):
    lams, n, k = [0.0, 1.0, 1.5], 6, 2
    body = dict(model="tiny", lam=lams, prompt=PROMPT, logprobs=k, max_tokens=n, stream=stream, **GREEDY)
    if stream:
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            chunks = [c for c in sse_json(r.iter_lines()) if isinstance(c, dict) and c["choices"]]
        got = {i: [] for i in range(len(lams))}
        for c in chunks:
            choice = c["choices"][0]
            got[choice["index"]] += (choice["logprobs"] or {}).get("token_logprobs", [])
    else:
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        got = {c["index"]: c["logprobs"]["token_logprobs"] for c in r.json()["choices"]}
    for i, lam in enumerate(lams):
        tokens, rows = blend_logprobs(plains, lam, text_prompt(plains[0], PROMPT), n)
        expected = [rows[j][t] for j, t in enumerate(tokens) if t not in (EOS, IM_END)]
        assert got[i] == pytest.approx(expected, abs=R.LOGPROB_ATOL), lam


@pytest.mark.parametrize("stream", ["--no-stream", None])
def test_llm_cli_talks_to_dera_serve_as_an_openai_model(server, engine, tmp_path, stream):
    """llm's extra-openai-models.yaml pointed at dera-serve (docs/serve.md, "llm")."""
    yaml = f"- model_id: dera-test\n  model_name: tiny@1.5\n  api_base: {server.url}/v1\n"
    (tmp_path / "extra-openai-models.yaml").write_text(yaml)
    env = dict(os.environ, LLM_USER_PATH=str(tmp_path), OPENAI_API_KEY="none")
    command = ["llm", "-m", "dera-test", "-o", "temperature", "0", "-o", "max_tokens", "12", "hello world"]
    done = subprocess.run([c for c in command + [stream] if c], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = engine.create_chat_completion(HELLO, lam=1.5, max_tokens=12, **GREEDY)["choices"][0]["message"]
    assert done.stdout.strip() == expected["content"].strip()


TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\ntools: {% for t in tools %}{{ t['function']['name'] }} {% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def tools_server(tmp_path_factory, paths):
    """Slots (--parallel 2) on a pair whose chat template shows the tools, as Open WebUI's requests carry them."""
    yield from tiny_server(tmp_path_factory, paths, "--n-ctx", "512", "--max-tokens", str(CAP), "--parallel", "2",
                           template=TOOLS_TEMPLATE)  # fmt: skip


def test_tools_the_template_shows_are_answered_as_the_engine_answers(tools_server, paths):
    """A request with tools and no tool to call is free text: on a slot it is the engine's answer for the
    prompt its template renders with the tools (which differs from the one without)."""
    engine = DeRaLlama(str(paths[0]), str(paths[1]), n_ctx=512, chat_template=TOOLS_TEMPLATE, verbose=False)
    settings = dict(GREEDY, max_tokens=12)
    with tools_server.http() as http:
        got = [
            http.post("/v1/chat/completions", json=dict(model="tiny@1.5", messages=HELLO, **extra, **settings)).json()
            for extra in ({"tools": [TOOL]}, {"tools": [TOOL], "tool_choice": "auto"}, {})
        ]
    with_tools = engine.create_chat_completion(HELLO, lam=1.5, tools=[TOOL], **settings)["choices"][0]["message"]
    without = engine.create_chat_completion(HELLO, lam=1.5, **settings)["choices"][0]["message"]
    assert with_tools["content"] != without["content"]  # the tools reach the prompt: a mix-up shows
    assert [g["choices"][0]["message"]["content"] for g in got] == [with_tools["content"]] * 2 + [without["content"]]
