"""dera-chat, driven as users drive it: one-shot subprocesses, a real terminal, bad input.

Every expected answer is computed by a separate engine on the same history: plain
``llama_cpp.Llama`` at lam 0 and 1, a separate DeRaLlama for streamed blends, and
plain models blended in numpy (tests/reference.py) for the JSON completion.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import llama_cpp
import pytest
import reference as R
from chat_driver import PAPER, PROMPT, Terminal, cli_env, run_cli, streamed
from click.testing import CliRunner
from llama_cpp import llama_chat_format
from tiny_models import CHAT_TEMPLATE, tiny_vocab, write_tiny_llama

from dera_gguf import DeRaError, DeRaLlama
from dera_gguf.cli.chat import _sweep_lams, main


def printable_vocab():
    """The tiny vocabulary with every byte token that is not printable ASCII made a plain
    piece, so the models write valid UTF-8 without control characters, as real models do.

    With raw bytes >= 0x80, random models write invalid UTF-8 that llama-cpp-python's
    streaming holds back (and re-decodes every token) until the answer ends.
    """
    vocab = tiny_vocab()
    for i, text in enumerate(vocab.tokens):
        if text.startswith("<0x") and not (text == "<0x0A>" or 0x20 <= int(text[3:5], 16) < 0x7F):
            vocab.types[i] = 1  # NORMAL: detokenizes to its literal text
            vocab.tokens[i] = f"[{text[1:5]}]"
    return vocab


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat_models")
    return [
        write_tiny_llama(folder / f"{name}.gguf", seed=seed, vocab=printable_vocab())
        for name, seed in [("ref", 1), ("aligned", 2), ("aligned2", 3)]
    ]


@pytest.fixture(scope="module")
def ref_path(chat_models):
    return chat_models[0]


@pytest.fixture(scope="module")
def aligned_path(chat_models):
    return chat_models[1]


@pytest.fixture(scope="module")
def aligned2_path(chat_models):
    return chat_models[2]


@pytest.fixture(scope="module")
def models_toml(tmp_path_factory, ref_path, aligned_path, aligned2_path):
    path = tmp_path_factory.mktemp("chat") / "models.toml"
    path.write_text(f"""
default = "tiny"

[pairs.tiny]
reference = {{ path = "{ref_path}" }}
aligned = [{{ path = "{aligned_path}" }}]

[pairs.tiny2]
reference = {{ path = "{ref_path}" }}
aligned = [{{ path = "{aligned_path}" }}, {{ path = "{aligned2_path}" }}]

[pairs.absent]
reference = {{ path = "{ref_path.parent / "nowhere" / "sft.gguf"}" }}
aligned = [{{ path = "{aligned_path}" }}]
make = "python scripts/make_absent.py --out-dir models"
""")
    return path


@pytest.fixture(scope="module")
def env(models_toml):
    return cli_env(models_toml)


@pytest.fixture(scope="module")
def plain_ref(ref_path):
    return llama_cpp.Llama(model_path=str(ref_path), n_ctx=512, verbose=False)


@pytest.fixture(scope="module")
def plain_aligned(aligned_path):
    return llama_cpp.Llama(model_path=str(aligned_path), n_ctx=512, verbose=False)


@pytest.fixture(scope="module")
def engine(ref_path, aligned_path):
    """A DeRaLlama of its own, for blends the plain models cannot give directly."""
    return DeRaLlama(str(ref_path), str(aligned_path), n_ctx=512, verbose=False)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ------------------------------------------------------------------ one-shot


def test_one_shot_prompt_prints_only_the_answer(env, engine):
    args = [
        "--prompt",
        "tell me about the cat",
        "--system",
        "be short",
        "--lam",
        "1.5",
        "--seed",
        "11",
        "--max-tokens",
        "24",
        "--n-ctx",
        "256",
    ]
    result = run_cli(args, env)
    assert result.returncode == 0, result.stderr
    messages = [{"role": "system", "content": "be short"}, user("tell me about the cat")]
    expected = streamed(engine, messages, lam=1.5, seed=11, max_tokens=24, **PAPER)
    assert expected and result.stdout == expected + "\n"
    assert result.stderr == ""


def test_piped_stdin_is_read_whole_as_one_prompt(env, plain_ref):
    text = "hello world\nwrite about the sun\n"
    result = run_cli(["--lam", "0", "--seed", "3", "--max-tokens", "20", "--n-ctx", "256"], env, stdin=text)
    assert result.returncode == 0, result.stderr
    expected = streamed(plain_ref, [user(text.strip())], seed=3, max_tokens=20, **PAPER)
    assert expected and result.stdout == expected + "\n"


@pytest.mark.parametrize("speculative", ["off", "lookup", "model"])
def test_json_completion_is_the_blend_of_plain_models(env, ref_path, aligned_path, speculative):
    lam, question = 0.5, "please write about the rain"
    result = run_cli(
        [
            "--speculative",
            speculative,
            "--json",
            "--prompt",
            question,
            "--lam",
            str(lam),
            "--temperature",
            "0",
            "--max-tokens",
            "16",
            "--n-ctx",
            "256",
        ],
        env,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["object"] == "chat.completion"
    choice, n = out["choices"][0], out["usage"]["completion_tokens"]
    models = [R.plain(ref_path), R.plain(aligned_path)]
    prompt = _chat_prompt_tokens(models[0], [user(question)])
    eos = models[0].token_eos()
    tokens, _ = R.greedy(models, [1 - lam, lam], prompt, n + 1, stop=[eos])
    if choice["finish_reason"] == "stop":
        assert tokens[n:] == [eos]
    expected = models[0].detokenize(tokens[:n], prev_tokens=prompt).decode("utf-8", errors="ignore")
    assert choice["message"]["content"] == expected
    assert out["usage"]["prompt_tokens"] == len(prompt)


def _chat_prompt_tokens(llm, messages):
    """The prompt tokens as llama-cpp-python's own Jinja2 chat formatter makes them."""
    formatter = llama_chat_format.Jinja2ChatFormatter(template=CHAT_TEMPLATE, eos_token="</s>", bos_token="<s>")
    result = formatter(messages=messages)
    return llm.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True)


@pytest.mark.parametrize("models", ["pair", "paths"])
def test_several_aligned_models_take_a_lam_list(env, ref_path, aligned_path, aligned2_path, models):
    chosen = (
        ["--pair", "tiny2"]
        if models == "pair"
        else ["--ref", str(ref_path), "--aligned", str(aligned_path), "--aligned", str(aligned2_path)]
    )
    result = run_cli(
        [*chosen, "--lam", "0.5,0.8", "--prompt", "hello", "--seed", "4", "--max-tokens", "16", "--n-ctx", "256"], env
    )
    assert result.returncode == 0, result.stderr
    llm = DeRaLlama(str(ref_path), [str(aligned_path), str(aligned2_path)], lam=[0.5, 0.8], n_ctx=256, verbose=False)
    expected = streamed(llm, [user("hello")], seed=4, max_tokens=16, **PAPER)
    assert expected and result.stdout == expected + "\n"


def test_sweep_entries_for_one_and_several_aligned_models():
    assert _sweep_lams("0,0.5, 1 2", 1.0) == [0.0, 0.5, 1.0, 2.0]
    assert _sweep_lams("0,0 0.5,1;2,2", (1.0, 1.0)) == [(0.0, 0.0), (0.5, 1.0), (2.0, 2.0)]
    with pytest.raises(DeRaError, match="2 comma-separated"):
        _sweep_lams("0.5 1", (1.0, 1.0))


def test_default_pair_falls_back_and_says_what_is_missing(tmp_path, models_toml, plain_aligned):
    text = models_toml.read_text().replace('default = "tiny"', 'default = "absent"\nfallback = "tiny"')
    (tmp_path / "models.toml").write_text(text)
    result = run_cli(
        ["--prompt", "hello", "--seed", "9", "--max-tokens", "12", "--n-ctx", "256"], cli_env(tmp_path / "models.toml")
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == streamed(plain_aligned, [user("hello")], seed=9, max_tokens=12, **PAPER) + "\n"
    assert "sft.gguf" in result.stderr and "python scripts/make_absent.py --out-dir models" in result.stderr
    assert "fallback pair 'tiny'" in result.stderr


# --------------------------------------------------------------- interactive


def test_lam_change_answers_like_the_engine_on_the_whole_history(env, plain_ref, plain_aligned, engine):
    settings = dict(seed=5, max_tokens=20, **PAPER)
    chat = Terminal(["--seed", "5", "--max-tokens", "20", "--n-ctx", "512", "--system", "be brief"], env)
    history = [{"role": "system", "content": "be brief"}, user("hello there")]
    answer, status = chat.ask("hello there")
    assert status.group(1) == "1" and int(status.group(2)) > 0 and not status.group(3)
    assert answer == streamed(plain_aligned, history, **settings)  # lam 1 is the aligned model

    assert "lam 0" in chat.command("/lam 0")
    history += [assistant(answer), user("tell me about the cat")]
    answer, status = chat.ask("tell me about the cat")
    assert status.group(1) == "0"
    assert answer == streamed(plain_ref, history, **settings)  # lam 0 is the reference model

    chat.command("/lam 1.5")
    history += [assistant(answer), user("and the dog")]
    answer, status = chat.ask("and the dog")
    assert status.group(1) == "1.5"
    assert answer == streamed(engine, history, lam=1.5, **settings)
    assert chat.quit("eof") == 0


def test_status_line_counts_the_drafts_of_each_answer(env, ref_path, aligned_path):
    """--speculative lookup: each answer is still the engine's without drafts, and the status line adds
    how many drafted tokens passed of those verified in that answer (no such part without it). A new
    process drafts only once it has timed enough steps to afford a probe (dera_gguf/pacing.py): the
    conversation runs long enough for that."""
    engine = DeRaLlama(str(ref_path), str(aligned_path), n_ctx=4096, verbose=False)
    settings = dict(PAPER, seed=5, max_tokens=150, temperature=0.0)  # greedy: tiny random models repeat themselves
    args = ["--seed", "5", "--max-tokens", "150", "--temperature", "0", "--n-ctx", "4096", "--lam", "1.5"]
    chat = Terminal([*args, "--speculative", "lookup"], env)
    history, totals = [], [0, 0]
    for text in ("hello there", "tell me about the cat", "and the dog", "what else", "go on", "thanks"):
        history.append(user(text))
        answer, status = chat.ask(text)
        assert answer == streamed(engine, history, lam=1.5, **settings)
        passed, verified = int(status.group(4)), int(status.group(5))
        assert 0 <= passed <= verified
        totals = [totals[0] + passed, totals[1] + verified]
        history.append(assistant(answer))
    assert totals[1] > 0 and totals[0] > 0  # drafts were made and some passed
    assert chat.quit("eof") == 0
    plain = Terminal(["--seed", "5", "--max-tokens", "8", "--n-ctx", "512"], env)
    _, status = plain.ask("hello there")
    assert status.group(4) is None
    assert plain.quit("eof") == 0


def test_a_history_too_long_for_the_context_is_an_error_not_a_crash(env):
    chat = Terminal(["--seed", "1", "--max-tokens", "8", "--n-ctx", "256"], env)
    printed = chat.command("tell me " * 150)
    assert "larger --n-ctx" in printed, printed
    assert "no messages" in chat.command("/history")  # the unanswered message is not kept
    assert chat.quit() == 0


def test_sweep_answers_the_last_message_per_lam_and_keeps_the_history(env, plain_ref, plain_aligned, engine):
    settings = dict(seed=7, max_tokens=16, **PAPER)
    chat = Terminal(["--seed", "7", "--max-tokens", "16", "--n-ctx", "256"], env)
    assert "nothing to sweep" in chat.command("/sweep 0,1")
    first, _ = chat.ask("tell me about the dog")
    history = [user("tell me about the dog")]
    swept = chat.sweep("/sweep 0,0.5,1", 3)
    assert [label for label, _ in swept] == ["0", "0.5", "1"]
    assert swept[0][1] == streamed(plain_ref, history, **settings)
    assert swept[1][1] == streamed(engine, history, lam=0.5, **settings)
    assert swept[2][1] == streamed(plain_aligned, history, **settings)

    shown = chat.command("/history")
    assert shown.count("you: ") == 1 and shown.count("assistant: ") == 1 and f"assistant: {first}" in shown
    history += [assistant(first), user("and the cat")]
    answer, _ = chat.ask("and the cat")
    assert answer == streamed(plain_aligned, history, **settings)

    assert "cleared" in chat.command("/reset")
    assert "no messages" in chat.command("/history")
    assert chat.quit() == 0


def test_ctrl_c_stops_the_answer_and_keeps_it_marked(env, aligned_path):
    # room for the partial answer (re-tokenized, it can take more tokens) and a full one after it
    plain_aligned = llama_cpp.Llama(model_path=str(aligned_path), n_ctx=4096, verbose=False)
    settings = dict(seed=2, max_tokens=400, **PAPER)
    full = streamed(plain_aligned, [user("hello there")], **settings)
    chat = Terminal(["--seed", "2", "--max-tokens", "400", "--n-ctx", "4096"], env)
    partial, status = chat.interrupt_answer("hello there")
    assert status.group(3) == " · interrupted"
    assert full.startswith(partial) and 0 < len(partial) < len(full), (partial, full)
    assert f"assistant: {partial} [interrupted]" in chat.command("/history")

    history = [user("hello there"), assistant(partial), user("tell me more")]
    answer, status = chat.ask("tell me more")  # the partial answer stays in the history
    assert not status.group(3)
    assert answer == streamed(plain_aligned, history, **settings)

    chat.child.expect_exact(PROMPT)  # input() is waiting (under load the key could come before it)
    time.sleep(0.2)
    chat.child.sendintr()  # Ctrl-C at the prompt does not leave
    chat.child.expect_exact("/quit leaves")
    assert "/sweep" in chat.command("/help")
    assert chat.quit() == 0


def test_system_command_changes_the_following_answers(env, plain_aligned):
    chat = Terminal(["--seed", "8", "--max-tokens", "12", "--n-ctx", "256"], env)
    chat.command("/system answer like a cat")
    answer, _ = chat.ask("hello")
    messages = [{"role": "system", "content": "answer like a cat"}, user("hello")]
    assert answer == streamed(plain_aligned, messages, seed=8, max_tokens=12, **PAPER)
    assert "error" in chat.command("/lam inf") and "lam 1" in chat.command("/lam")
    assert "unknown command" in chat.command("/bogus")
    assert chat.quit() == 0


# ----------------------------------------------------------------- bad input


def invoke(args, env_vars):
    """Run dera-chat in-process (one-shot: the runner's stdin is not a terminal)."""
    return CliRunner().invoke(main, args, env={"DERA_MODELS": env_vars["DERA_MODELS"]})


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_pair_lists_the_known_ones(env):
    # (the shipped pairs are listed too: a user's models.toml adds to them)
    assert_one_line_error(
        invoke(["--pair", "nope", "--prompt", "hi"], env), "nope", "known pairs: absent,", "tiny, tiny2"
    )


@pytest.mark.parametrize("lam", ["nan", "inf", "-inf", "1e999", "abc", "0.5,nan"])
def test_non_finite_lam_is_refused(env, lam):
    assert_one_line_error(invoke(["--lam", lam, "--prompt", "hi"], env), "lam")


def test_lam_count_must_match_the_aligned_models(env):
    assert_one_line_error(invoke(["--pair", "tiny2", "--lam", "0.5", "--prompt", "hi"], env), "2 aligned")
    assert_one_line_error(invoke(["--pair", "tiny", "--lam", "0.5,1", "--prompt", "hi"], env), "1 aligned")


def test_missing_file_of_a_pair_says_how_to_make_it(env, ref_path):
    result = invoke(["--pair", "absent", "--prompt", "hi"], env)
    assert_one_line_error(
        result, str(ref_path.parent / "nowhere" / "sft.gguf"), "python scripts/make_absent.py --out-dir models"
    )


def test_missing_model_path_is_named(env, ref_path, tmp_path):
    missing = tmp_path / "none.gguf"
    assert_one_line_error(
        invoke(["--ref", str(ref_path), "--aligned", str(missing), "--prompt", "hi"], env), str(missing)
    )


def test_incompatible_models_are_refused(env, ref_path, tmp_path):
    vocab = tiny_vocab()
    vocab.tokens[300] += "x"
    other = write_tiny_llama(tmp_path / "other.gguf", seed=4, vocab=vocab)
    assert_one_line_error(invoke(["--ref", str(ref_path), "--aligned", str(other), "--prompt", "hi"], env), str(other))


def test_flags_that_contradict_each_other(env, ref_path):
    assert_one_line_error(invoke(["--pair", "tiny", "--ref", str(ref_path), "--prompt", "hi"], env), "--pair")
    assert_one_line_error(invoke(["--ref", str(ref_path), "--prompt", "hi"], env), "--aligned")
    assert_one_line_error(invoke(["--prompt", "   "], env), "empty")


def test_one_shot_prompt_longer_than_the_context(env):
    assert_one_line_error(invoke(["--n-ctx", "256", "--prompt", "tell me " * 150], env), "--n-ctx")


def test_errors_in_a_real_process_exit_non_zero_without_traceback(tmp_path, models_toml):
    # (without a fallback of its own the shipped one, the demo pair, would answer)
    text = models_toml.read_text().replace('default = "tiny"', 'default = "absent"\nfallback = "absent"')
    (tmp_path / "models.toml").write_text(text)
    result = run_cli(["--prompt", "hi"], cli_env(tmp_path / "models.toml"))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "sft.gguf" in result.stderr and "make_absent.py" in result.stderr


def test_lam_changes_sweeps_and_more_turns_stay_exact(env, ref_path, aligned_path):
    """Issue 10's kind of sequence through the terminal: a blend, lam 0, a /sweep with lam 0 and 1
    in it, then more turns at other lams. A long-lived engine must answer every turn as a fresh
    DeRaLlama (one that has seen no other call) answers that history alone."""
    settings = dict(seed=3, max_tokens=10, **PAPER)
    chat = Terminal(["--seed", "3", "--max-tokens", "10", "--n-ctx", "512", "--lam", "0.7"], env)

    def fresh(history, lam):
        llm = DeRaLlama(str(ref_path), str(aligned_path), n_ctx=512, verbose=False)
        return streamed(llm, history, lam=lam, **settings)

    history = [user("hello world")]
    answer, _ = chat.ask("hello world")
    assert answer == fresh(history, 0.7)
    chat.command("/lam 0")
    history += [assistant(answer), user("the sea story")]
    answer, _ = chat.ask("the sea story")
    assert answer == fresh(history, 0.0)
    swept = chat.sweep("/sweep 1,-0.5,0.7,0", 4)  # ends at lam 0: only the reference decodes last
    assert [text for _, text in swept] == [fresh(history, lam) for lam in (1.0, -0.5, 0.7, 0.0)]
    for lam, text in [("2", "and the dog"), ("1", "and the cat"), ("0.3", "more")]:
        chat.command(f"/lam {lam}")
        history += [assistant(answer), user(text)]
        answer, status = chat.ask(text)
        assert status.group(1) == lam and answer == fresh(history, float(lam))
    assert chat.quit() == 0


def test_mode_flag_and_command_switch_between_weight_space_and_blend(env, ref_path, aligned_path, tmp_path):
    from tiny_models import write_tiny_lora

    adapter = write_tiny_lora(tmp_path / "adapter.gguf", seed=9)
    settings = dict(seed=4, max_tokens=10, **PAPER)
    args = ["--ref", str(ref_path), "--aligned", str(adapter), "--seed", "4", "--max-tokens", "10", "--n-ctx", "512"]
    chat = Terminal([*args, "--lam", "0.5", "--mode", "weights"], env)
    history = [user("hello world")]
    answer, status = chat.ask("hello world")
    weight_space = llama_cpp.Llama(
        model_path=str(ref_path), lora_path=str(adapter), lora_scale=0.5, n_ctx=512, verbose=False
    )
    assert "(weights)" in status.group(0) and answer == streamed(weight_space, history, **settings)
    assert "mode blend" in chat.command("/mode blend")
    history += [assistant(answer), user("the sea story")]
    answer, status = chat.ask("the sea story")
    blend = DeRaLlama(str(ref_path), str(adapter), n_ctx=512, verbose=False)
    assert "(weights)" not in status.group(0) and answer == streamed(blend, history, lam=0.5, **settings)
    assert "must be one of" in chat.command("/mode weight")
    assert chat.quit() == 0

    full = Terminal(["--ref", str(ref_path), "--aligned", str(aligned_path), "--n-ctx", "256"], env)
    assert "full GGUF model" in full.command("/mode weights")
    assert full.quit() == 0


@pytest.mark.parametrize("hangup", ["signalled", "ignored by the shell"])
@pytest.mark.parametrize("when", ["at the prompt", "while an answer streams"])
def test_a_terminal_that_goes_away_ends_the_chat_quietly(env, tmp_path, when, hangup):
    """A closed window or tmux pane: the chat ends without a word (stderr kept in a file to check).

    The hangup may reach it as SIGHUP, or not at all (a shell that ignores SIGHUP, nohup):
    then reading the terminal ends (EOF) and writing to it fails.
    """
    import pexpect

    err = tmp_path / "stderr.txt"
    args = ["--max-tokens", "200", "--n-ctx", "512", "--temperature", "1.5"]
    chat = f'"{sys.executable}" -m dera_gguf.cli.chat "$@" 2>"{err}"'
    script = f"exec {chat}" if hangup == "signalled" else f"trap '' HUP; {chat}"
    child = pexpect.spawn("bash", ["-c", script, "bash", *args], env=env, encoding="utf-8", timeout=30)
    child.expect_exact("you> ")
    if when == "while an answer streams":
        child.sendline("tell me a long story about the sun and the rain")
        child.expect_exact("the rain\r\n")
        child.expect(r"(?s).")  # the answer has started
    os.close(child.child_fd)  # the terminal goes away: the kernel hangs up on the chat
    deadline = time.monotonic() + 30
    while child.isalive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not child.isalive()
    # 129: the hangup; 1: a write to the gone terminal failed first (EPIPE), also without a word
    assert child.exitstatus in (0, 1, 129) or child.signalstatus == signal.SIGHUP, (child.exitstatus, err.read_text())
    text = err.read_text()
    assert "Traceback" not in text and "Error" not in text, text
