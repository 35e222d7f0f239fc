"""Sessions: save_state / load_state of a whole pair, llama-cpp-python's prompt caches, dera-chat's
/save, /load and --session, dera-serve's prompt cache.

Expected answers come from independent computations: plain ``llama_cpp.Llama`` instances blended
in numpy (tests/reference.py), a plain Llama with the same cache, or a server with the cache off.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import zipfile

import llama_cpp
import pytest
from chat_driver import ROOT, Terminal, cli_env
from llama_cpp import LlamaRAMCache
from test_engine_state import Reference, chat_checked
from tiny_models import write_tiny_lora

from dera_gguf import DeRaError, DeRaLlama
from dera_gguf.runtime.states import read_state_file, write_state_file

N_CTX = 512
FIRST = [{"role": "user", "content": "tell me about the sun and the rain"}]


def grow(messages, answer, text="and the dog"):
    return messages + [{"role": "assistant", "content": answer}, {"role": "user", "content": text}]


def engine(ref_path, aligned, lam=1.5, n_ctx=N_CTX, **kwargs) -> DeRaLlama:
    return DeRaLlama(str(ref_path), str(aligned), lam=lam, n_ctx=n_ctx, verbose=False, **kwargs)


def greedy_text(llm, messages, **kwargs) -> str:
    out = llm.create_chat_completion(messages, temperature=0.0, max_tokens=10, **kwargs)
    return out["choices"][0]["message"]["content"]


def checked(llm, ref_path, aligned_path, messages, lam) -> str:
    """The greedy answer, checked against plain models blended in numpy (test_engine_state's check)."""
    return chat_checked(llm, Reference(ref_path, [(aligned_path, False)]), messages, lam, max_tokens=10)


@pytest.fixture(scope="module")
def lora_path(models_dir):
    return write_tiny_lora(models_dir / "session_adapter.gguf", seed=5)


# ------------------------------------------------------------ save_state / load_state


def test_a_state_goes_on_exactly_in_another_process(ref_path, aligned_path, tmp_path):
    """Saved in this process (pickled, and as a state file), loaded in another: its next answer is the
    saving engine's next answer, and the blend's (plain models in numpy)."""
    llm = engine(ref_path, aligned_path)
    first = greedy_text(llm, FIRST)
    state = llm.save_state()
    (tmp_path / "state.pickle").write_bytes(pickle.dumps(state))
    write_state_file(tmp_path / "state.dera", state, {"note": "from the test"})
    following = grow(FIRST, first)
    expected = greedy_text(llm, following)
    assert expected == checked(engine(ref_path, aligned_path), ref_path, aligned_path, following, 1.5)
    script = f"""
import json, pickle, sys
from dera_gguf import DeRaLlama
from dera_gguf.runtime.states import read_state_file
out = {{}}
for kind in ("pickle", "dera"):
    llm = DeRaLlama({str(ref_path)!r}, {str(aligned_path)!r}, lam=1.5, n_ctx={N_CTX}, verbose=False)
    path = {str(tmp_path)!r} + "/state." + kind
    state = pickle.load(open(path, "rb")) if kind == "pickle" else read_state_file(path)[0]
    llm.load_state(state)
    held = [c.extent() for c in llm.runtime.contexts]
    answer = llm.create_chat_completion({following!r}, temperature=0.0, max_tokens=10)
    out[kind] = [answer["choices"][0]["message"]["content"], held]
print(json.dumps(out))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], env=cli_env(), cwd=str(ROOT), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["pickle"][0] == out["dera"][0] == expected
    assert out["pickle"][1] == [state.n_tokens, state.n_tokens]  # both contexts held the saved tokens
    assert read_state_file(tmp_path / "state.dera")[1] == {"note": "from the test"}


def test_a_state_serves_every_lam_and_restores_what_each_context_held(ref_path, aligned_path):
    """At lam 1 only the aligned context decodes; its state loads, and the next answer at another lam
    (the reference catches up) is the blend's."""
    llm = engine(ref_path, aligned_path, lam=1.0)
    first = greedy_text(llm, FIRST)
    state = llm.save_state()
    held = [len(s.tokens) for s in state.sequences]
    assert held[1] == state.n_tokens and held[0] < held[1]
    other = engine(ref_path, aligned_path, lam=0.3)
    other.load_state(state)
    assert [c.extent() for c in other.runtime.contexts] == held
    following = grow(FIRST, first)
    checked(other, ref_path, aligned_path, following, 0.3)


def test_states_of_other_pairs_are_refused_and_change_nothing(ref_path, aligned_path, aligned2_path, lora_path):
    llm = engine(ref_path, aligned_path)
    greedy_text(llm, FIRST)
    state = llm.save_state()
    for other in (engine(ref_path, aligned2_path), engine(ref_path, lora_path)):
        before = [c.extent() for c in other.runtime.contexts]
        with pytest.raises(DeRaError, match=r"saved by another pair \(ref.gguf \+ aligned.gguf\), not this one"):
            other.load_state(state)
        assert [c.extent() for c in other.runtime.contexts] == before
    lora = engine(ref_path, lora_path)
    greedy_text(lora, FIRST)
    with pytest.raises(DeRaError, match=r"saved by another pair \(ref.gguf \+ session_adapter.gguf\)"):
        llm.load_state(lora.save_state())
    small = engine(ref_path, aligned_path, n_ctx=16)
    with pytest.raises(DeRaError, match=r"holds \d+ tokens but this engine's context holds 16"):
        small.load_state(state)
    plain = llama_cpp.Llama(model_path=str(aligned_path), n_ctx=64, verbose=False)
    plain.eval(plain.tokenize(b"hello"))
    with pytest.raises(DeRaError, match="takes a state from DeRaLlama.save_state, got LlamaState"):
        llm.load_state(plain.save_state())


def test_damaged_state_files_are_refused(ref_path, aligned_path, tmp_path):
    llm = engine(ref_path, aligned_path)
    greedy_text(llm, FIRST)
    path = tmp_path / "s.dera"
    write_state_file(path, llm.save_state())
    data = path.read_bytes()
    (tmp_path / "cut.dera").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # inside a context's KV bytes: the zip's CRC sees it
    (tmp_path / "flipped.dera").write_bytes(bytes(flipped))
    (tmp_path / "text.dera").write_text("hello")
    for name in ("cut", "flipped", "text"):
        with pytest.raises(DeRaError, match="is not a dera-gguf state file, or it is damaged"):
            read_state_file(tmp_path / f"{name}.dera")
    with pytest.raises(DeRaError, match="does not exist"):
        read_state_file(tmp_path / "missing.dera")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.dera", "flipped.dera", "s.dera", "text.dera"]
    with zipfile.ZipFile(path) as z:  # no pickle inside: reading a state file runs no code
        assert all(n.endswith((".json", ".npy", ".bin")) for n in z.namelist())


# ------------------------------------------------------------------------ prompt caches


def calls(llm, seed: int = 7):
    """Two conversations in turns: A, B, then A again with a new turn (a prompt cache's hit)."""
    other = [{"role": "user", "content": "write about the cat"}]
    kw = dict(temperature=0.7, top_k=50, top_p=0.95, seed=seed, max_tokens=12)
    a = llm.create_chat_completion(FIRST, **kw)["choices"][0]["message"]["content"]
    b = llm.create_chat_completion(other, **kw)["choices"][0]["message"]["content"]
    c = llm.create_chat_completion(grow(FIRST, a), **kw)["choices"][0]["message"]["content"]
    return [a, b, c]


def prompt_tokens_decoded(llm) -> list:
    """Prompt tokens each context has decoded so far, by llama.cpp's own counters."""
    contexts = llm.runtime.contexts if isinstance(llm, DeRaLlama) else []
    return [llama_cpp.llama_perf_context(c.ctx.ctx).n_p_eval for c in contexts]


def test_a_ram_cache_works_as_on_a_plain_llama(ref_path):
    """A model paired with itself is the model: the same calls with a RAM cache answer alike, sampled."""
    plain = llama_cpp.Llama(model_path=str(ref_path), n_ctx=N_CTX, verbose=False)
    plain.set_cache(LlamaRAMCache())
    pair = engine(ref_path, ref_path, lam=0.5)
    pair.set_cache(LlamaRAMCache())
    assert calls(pair) == calls(plain)


def test_the_cache_restores_a_conversation_instead_of_recomputing_it(ref_path, aligned_path):
    without = engine(ref_path, aligned_path)
    expected = calls(without)
    cached = engine(ref_path, aligned_path)
    cached.set_cache(LlamaRAMCache())
    assert calls(cached) == expected
    # coming back to A, the cached engine decoded only the new turn, the other the whole of A again
    assert all(c < w for c, w in zip(prompt_tokens_decoded(cached), prompt_tokens_decoded(without)))


def test_a_disk_cache_survives_a_restart(ref_path, aligned_path, tmp_path):
    script = f"""
import json, sys
from llama_cpp import LlamaDiskCache
from dera_gguf import DeRaLlama
llm = DeRaLlama({str(ref_path)!r}, {str(aligned_path)!r}, lam=1.5, n_ctx={N_CTX}, verbose=False)
llm.set_cache(LlamaDiskCache(cache_dir={str(tmp_path / "cache")!r}))
messages = json.loads(sys.argv[1])
out = llm.create_chat_completion(messages, temperature=0.0, max_tokens=10)
import llama_cpp
print(json.dumps([out["choices"][0]["message"]["content"],
                  [llama_cpp.llama_perf_context(c.ctx.ctx).n_p_eval for c in llm.runtime.contexts]]))
"""

    def run(messages):
        proc = subprocess.run(
            [sys.executable, "-c", script, json.dumps(messages)],
            env=cli_env(),
            cwd=str(ROOT),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.splitlines()[-1])

    first, _ = run(FIRST)
    following = grow(FIRST, first)
    answer, decoded = run(following)  # a new process: the state comes from the disk cache
    assert answer == greedy_text(engine(ref_path, aligned_path), following)
    fresh = engine(ref_path, aligned_path)
    greedy_text(fresh, following)
    assert all(d < f for d, f in zip(decoded, prompt_tokens_decoded(fresh)))


# ------------------------------------------------------------------------------ dera-chat


@pytest.fixture(scope="module")
def chat_env(tmp_path_factory, ref_path, aligned_path, aligned2_path):
    toml = tmp_path_factory.mktemp("sessions") / "models.toml"
    toml.write_text(
        f'[pairs.tiny]\nreference = {{ path = "{ref_path}" }}\naligned = [{{ path = "{aligned_path}" }}]\n'
        f'[pairs.other]\nreference = {{ path = "{ref_path}" }}\naligned = [{{ path = "{aligned2_path}" }}]\n'
    )
    return cli_env(toml)


def test_dera_chat_saves_and_goes_on_from_a_session(chat_env, tmp_path, ref_path, aligned_path):
    args = ["--pair", "tiny", "--temperature", "0", "--max-tokens", "10", "--n-ctx", str(N_CTX), "--lam", "0.7"]
    path = tmp_path / "chat.dera"
    chat = Terminal(args + ["--session", str(path)], chat_env)
    first, _ = chat.ask(FIRST[0]["content"])
    chat.command("/lam 1.5")
    assert chat.quit("eof") == 0  # leaving saves the session
    assert path.is_file()

    again = Terminal(args + ["--session", str(path)], chat_env)
    history = again.command("/history")
    assert f"you: {FIRST[0]['content']}" in history and f"assistant: {first}" in history
    answer, status = again.ask("and the dog")
    assert status.group(1) == "1.5"  # the session's lam, not --lam's
    following = grow(FIRST, first)
    assert answer == greedy_text(engine(ref_path, aligned_path, lam=1.5), following)
    again.command(f"/save {tmp_path / 'second.dera'}")
    assert again.quit() == 0

    other = Terminal(["--pair", "other", "--n-ctx", str(N_CTX)], chat_env)
    refused = other.command(f"/load {path}")
    assert "error: the state was saved by another pair (ref.gguf + aligned.gguf), not this one" in refused
    assert "(no messages yet)" in other.command("/history")
    assert other.quit() == 0


# ----------------------------------------------------------------------------- dera-serve


def test_dera_serve_answers_alike_with_and_without_its_prompt_cache(chat_env, tmp_path):
    """Two conversations alternating through the openai client: the cache changes nothing but the time."""
    import openai
    from serve_driver import ServerProcess

    def conversation_turns(server) -> list:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        kw = dict(model="tiny", temperature=0.0, max_tokens=10)
        a, b = list(FIRST), [{"role": "user", "content": "write about the cat"}]
        answers = []
        for turn in range(3):
            for convo in (a, b):
                text = client.chat.completions.create(messages=convo, **kw).choices[0].message.content
                answers.append(text)
                convo += [{"role": "assistant", "content": text}, {"role": "user", "content": f"more {turn}"}]
        return answers

    got = {}
    for size in ("0", "64MB"):
        server = ServerProcess(
            ["--pair", "tiny", "--n-ctx", str(N_CTX), "--cache-size", size], chat_env, tmp_path / f"{size}.log"
        )
        try:
            got[size] = conversation_turns(server)
        finally:
            assert server.stop() == 0, server.log()
    assert got["64MB"] == got["0"]
