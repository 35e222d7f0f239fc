"""dera-pull and dera-pairs: the shipped hub pairs from a local cache and from a loopback hub.

Tiny GGUF models written by the fixtures stand in for the shipped pairs' files, under their real
repo ids and file names: in a Hugging Face cache laid out as huggingface_hub lays it out, or
served by tests/fake_hub.py through HF_ENDPOINT. Nothing is downloaded from the internet.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import llama_cpp
import pexpect
import pytest
from chat_driver import ROOT, default_sigint
from fake_hub import COMMIT, FakeHub
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from tiny_models import TinyVocab, tiny_vocab, write_tiny_llama

from dera_gguf.pairs.downloads import format_size as hub_format
from dera_gguf.pairs.registry import PACKAGED, load_registry

SHIPPED = load_registry(PACKAGED)  # (read at import: the tests' own $DERA_HOME is empty)
HUB_PAIRS = ["zephyr-7b", "tulu3-8b", "tulu2-7b", "olmo2-7b", "danube-1.8b"]


def hub_files(name: str):
    """``(repo, file)`` of the shipped pair's reference and aligned model."""
    return [(s.spec["repo"], s.spec["file"]) for s in SHIPPED.get(name).sources()]


def put_in_cache(cache: Path, repo: str, file: str, data: bytes) -> None:
    """A complete file in a Hugging Face cache, as huggingface_hub leaves it: blob, snapshot link, ref."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
    snapshot = folder / "snapshots" / COMMIT / file
    blob.parent.mkdir(parents=True, exist_ok=True)
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)


def env_for(tmp_path: Path, endpoint: str = "http://127.0.0.1:9", offline: bool = False, **extra) -> dict:
    """This checkout's code, a cache and user model folder of the test's own, the given hub."""
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
        DERA_HOME=str(tmp_path / "home"),
        HF_ENDPOINT=endpoint,
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONIOENCODING="utf-8",
    )
    for key in ("DERA_MODELS", "HF_HUB_OFFLINE", "HF_TOKEN"):
        env.pop(key, None)
    env.update(extra)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def run(module: str, args, env: dict, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m dera_gguf.cli.MODULE ARGS`` in ``cwd`` (a folder outside the checkout)."""
    return subprocess.run(
        [sys.executable, "-m", f"dera_gguf.cli.{module}", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def size_in(text: str, before: str):
    """The first ``<number> kB|MB|GB`` in ``text`` followed by ``before``, as bytes ± what its rounding hides."""
    match = re.search(r"(\d+)\.(\d+) (kB|MB|GB)" + re.escape(before), text)
    assert match, f"no size before {before!r} in {text!r}"
    unit = {"kB": 1e3, "MB": 1e6, "GB": 1e9}[match.group(3)]
    value = float(f"{match.group(1)}.{match.group(2)}") * unit
    return pytest.approx(value, abs=0.5 * unit / 10 ** len(match.group(2)))


@pytest.fixture
def work(tmp_path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def pair_bytes(ref_path, aligned_path):
    return ref_path.read_bytes(), aligned_path.read_bytes()


def expected_answer(path: Path, pair_name: str, prompt: str) -> dict:
    """A plain llama_cpp.Llama on the aligned file, with the chat template the pair names (if any)."""
    pair = SHIPPED.get(pair_name)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False, chat_format=pair.chat_format)
    if pair.chat_template:
        eos = llm.token_eos()
        llm.chat_handler = Jinja2ChatFormatter(
            pair.chat_template, eos_token=llm._model.token_get_text(eos), bos_token="<s>", stop_token_ids=[eos]
        ).to_chat_handler()
    out = llm.create_chat_completion([{"role": "user", "content": prompt}], temperature=0, max_tokens=8)
    return out["choices"][0]["message"]


@pytest.mark.parametrize("name", HUB_PAIRS)
def test_each_shipped_pair_from_a_populated_cache_offline(name, tmp_path, work, pair_bytes, aligned_path):
    """dera-pull finds the pair in the cache (HF_HUB_OFFLINE=1); dera-chat --pair then answers."""
    for (repo, file), data in zip(hub_files(name), pair_bytes):
        put_in_cache(tmp_path / "hf" / "hub", repo, file, data)
    env = env_for(tmp_path, offline=True)
    pulled = run("pull", [name], env, work)
    assert pulled.returncode == 0, pulled.stderr
    assert f"{name}: nothing to download" in pulled.stdout and f"pair {name} is ready" in pulled.stdout
    chat = run(
        "chat", ["--pair", name, "--json", "--prompt", "hello", "--temperature", "0", "--max-tokens", "8"], env, work
    )
    assert chat.returncode == 0, chat.stderr
    assert json.loads(chat.stdout)["choices"][0]["message"] == expected_answer(aligned_path, name, "hello")
    assert list(work.iterdir()) == []


def test_pull_downloads_says_the_size_first_and_the_pair_is_ready(tmp_path, work, pair_bytes):
    files = dict(zip(hub_files("zephyr-7b"), pair_bytes))
    with FakeHub(files) as hub:
        env = env_for(tmp_path, hub.url, HF_TOKEN="hf_test_token")
        pulled = run("pull", ["zephyr-7b"], env, work)
        assert pulled.returncode == 0, pulled.stderr
        lines = pulled.stdout.splitlines()
        size = sum(len(d) for d in pair_bytes)
        assert lines[0].startswith("zephyr-7b: ") and lines[0].endswith(f"to download into {tmp_path / 'hf' / 'hub'}")
        assert size == size_in(lines[0], " to download")
        assert (
            lines.index(
                f"downloading {hub_files('zephyr-7b')[0][0]}/{hub_files('zephyr-7b')[0][1]} on the Hugging Face hub"
            )
            > 2
        )
        assert lines[-1] == "pair zephyr-7b is ready: dera-chat --pair zephyr-7b --lam 1.5"
        resolves = [h for _, path, h in hub.requests if "/resolve/" in path]
        assert resolves and all(h.get("authorization") == "Bearer hf_test_token" for h in resolves)
        for (repo, file), data in files.items():
            path = tmp_path / "hf" / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots" / COMMIT / file
            assert path.read_bytes() == data
        n_gets = len(hub.gets())
        again = run("pull", ["zephyr-7b"], env, work)
        assert again.returncode == 0 and "zephyr-7b: nothing to download" in again.stdout
        assert len(hub.gets()) == n_gets
    listed = run("pairs", ["--json"], env_for(tmp_path, offline=True), work)
    records = {r["name"]: r for r in map(json.loads, listed.stdout.splitlines())}
    assert records["zephyr-7b"]["status"] == "ready" and records["zephyr-7b"]["size"] == size
    assert records["tulu3-8b"]["status"] == "not pulled" and records["tulu3-8b"]["get_with"].endswith("(9.84 GB)")


@pytest.fixture(scope="module")
def big_pair_bytes(models_dir):
    """A pair of ~20 MB files: huggingface_hub writes a download in 10 MiB pieces, so a part shows up."""
    vocab = TinyVocab.default(n_vocab=40000)
    paths = [write_tiny_llama(models_dir / f"big-{seed}.gguf", seed=seed, vocab=vocab) for seed in (1, 2)]
    return tuple(p.read_bytes() for p in paths)


def test_an_interrupted_pull_continues_and_the_part_is_never_used(tmp_path, work, big_pair_bytes):
    files = dict(zip(hub_files("zephyr-7b"), big_pair_bytes))
    (repo, file), data = next(iter(files.items()))
    partial = tmp_path / "hf" / "hub" / ("models--" + repo.replace("/", "--")) / "blobs"
    partial = partial / (hashlib.sha256(data).hexdigest() + ".incomplete")
    with FakeHub(files, delay=0.005, chunk=65536) as hub:
        env = env_for(tmp_path, hub.url)
        proc = subprocess.Popen(
            [sys.executable, "-m", "dera_gguf.cli.pull", "zephyr-7b"],
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=default_sigint,
        )
        deadline = time.monotonic() + 60
        while not (partial.is_file() and partial.stat().st_size > 0) and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "interrupted: what was downloaded is kept; run dera-pull zephyr-7b again to continue" in err
        assert "Traceback" not in err
        kept = partial.stat().st_size
        assert 0 < kept < len(data)

        # the part is not a model: commands that use the pair still say how to get it
        chat = run("chat", ["--pair", "zephyr-7b", "--prompt", "hi", "--max-tokens", "2"], env, work)
        assert chat.returncode == 1 and "get it with: dera-pull zephyr-7b" in chat.stderr

        hub.delay = 0.0
        again = run("pull", ["zephyr-7b"], env, work)
        assert again.returncode == 0, again.stderr
        assert kept == size_in(again.stdout, " of it downloaded before")
        assert (f"/{repo}/resolve/main/{file}", f"bytes={kept}-") in hub.gets()
    snapshot = partial.parent.parent / "snapshots" / COMMIT / file
    assert snapshot.read_bytes() == data and not partial.exists()


def test_not_enough_disk_is_refused_before_the_first_byte(tmp_path, work, pair_bytes):
    with FakeHub(dict(zip(hub_files("tulu2-7b"), pair_bytes)), claimed_size=10**17) as hub:
        pulled = run("pull", ["tulu2-7b"], env_for(tmp_path, hub.url), work)
        assert pulled.returncode == 1 and "Traceback" not in pulled.stderr
        assert "not enough free disk for the download: 200000000.00 GB needed" in pulled.stderr
        assert "HF_HOME (or HF_HUB_CACHE)" in pulled.stderr
        assert hub.gets() == []
    assert not list((tmp_path / "hf" / "hub").rglob("blobs/*")) if (tmp_path / "hf" / "hub").exists() else True


def test_a_pair_whose_vocabularies_differ_is_refused_by_token(tmp_path, work, ref_path, models_dir):
    vocab = tiny_vocab()
    vocab.tokens[300] = "\u2581different"
    other = write_tiny_llama(models_dir / "other-vocab.gguf", seed=7, vocab=vocab)
    (ref, aligned) = hub_files("olmo2-7b")
    put_in_cache(tmp_path / "hf" / "hub", *ref, ref_path.read_bytes())
    put_in_cache(tmp_path / "hf" / "hub", *aligned, other.read_bytes())
    pulled = run("pull", ["olmo2-7b"], env_for(tmp_path, offline=True), work)
    assert pulled.returncode == 1 and "Traceback" not in pulled.stderr
    assert "token 300 differs" in pulled.stderr and "is ready" not in pulled.stdout


def test_a_damaged_download_is_removed(tmp_path, work, pair_bytes):
    with FakeHub(dict(zip(hub_files("zephyr-7b"), pair_bytes)), corrupt=True) as hub:
        pulled = run("pull", ["zephyr-7b"], env_for(tmp_path, hub.url), work)
    assert pulled.returncode == 1 and "is damaged (its sha256 differs from the hub's); it was removed" in pulled.stderr
    assert not list((tmp_path / "hf" / "hub").rglob("*.incomplete"))
    assert not list((tmp_path / "hf" / "hub").rglob("snapshots/*/*"))


@pytest.mark.parametrize(
    "case, expected",
    [
        ("unknown pair", "unknown pair 'nope'; known pairs: danube-1.8b, nofile, nohub, olmo2-7b, smollm2-demo"),
        ("no network", "cannot reach the Hugging Face hub at http://127.0.0.1:9"),
        ("offline", "is not in the Hugging Face cache"),
        ("gated", "is gated: accept its terms at"),
        ("no such repo", "no repository nobody/none-GGUF on"),
        ("no such file", "has no file gone.gguf on"),
    ],
)
def test_hub_failures_are_one_clear_line(case, expected, tmp_path, work, pair_bytes):
    files = dict(zip(hub_files("zephyr-7b"), pair_bytes))
    zephyr_repo = hub_files("zephyr-7b")[0][0]
    mine = tmp_path / "mine.toml"
    mine.write_text(
        "[pairs.nohub]\n"
        'reference = { repo = "nobody/none-GGUF", file = "x.gguf" }\n'
        'aligned = { repo = "nobody/none-GGUF", file = "y.gguf" }\n'
        "[pairs.nofile]\n"
        f'reference = {{ repo = "{zephyr_repo}", file = "gone.gguf" }}\n'
        f'aligned = {{ repo = "{zephyr_repo}", file = "gone.gguf" }}\n'
    )
    pair = {"unknown pair": "nope", "no such repo": "nohub", "no such file": "nofile"}.get(case, "zephyr-7b")
    with FakeHub(files, gated=(zephyr_repo,) if case == "gated" else ()) as hub:
        endpoint = "http://127.0.0.1:9" if case == "no network" else hub.url
        env = env_for(tmp_path, endpoint, offline=case == "offline", DERA_MODELS=str(mine))
        pulled = run("pull", [pair], env, work)
    assert pulled.returncode == 1 and "Traceback" not in pulled.stderr, pulled.stderr
    assert expected in pulled.stderr
    assert len(pulled.stderr.strip().splitlines()) == 1


def test_dera_pairs_lists_every_pair(tmp_path, work):
    listed = run("pairs", [], env_for(tmp_path, offline=True), work)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:] if line and not line.startswith(" ")}
    for name in HUB_PAIRS:
        assert "not pulled" in rows[name] and " GB " in rows[name], rows[name]
    assert "ready" in rows["smollm2-demo"] and "MIT" in rows["zephyr-7b"] and " 0.1 " in rows["zephyr-7b"]
    for name in ("tulu3-8b", "olmo2-7b"):
        assert " 5 (length-normalized) " in rows[name], rows[name]
    for name, pair in SHIPPED.pairs.items():  # the drafter column: its size while it is not pulled, else "-"
        shown = hub_format(pair.draft.spec["size"]) if pair.draft is not None else "-"
        assert f"  {shown}  " in rows[name], rows[name]
    assert f"user model folder: {tmp_path / 'home'}" in listed.stdout
    assert run("pull", ["--list"], env_for(tmp_path, offline=True), work).stdout == listed.stdout


# --------------------------------------------------------------- drafters (models.toml's draft)


def draft_file(name: str):
    """``(repo, file)`` of the shipped pair's drafter."""
    draft = SHIPPED.get(name).draft
    return draft.spec["repo"], draft.spec["file"]


@pytest.fixture(scope="module")
def drafter_bytes(models_dir):
    """A drafter llama.cpp's rule accepts for the test pair although its vocabulary is not the pair's:
    another EOS (an end-of-turn token of its own) and five tokens more."""
    vocab = TinyVocab.default(n_vocab=len(tiny_vocab().tokens) + 5)
    vocab.eos = 3
    return write_tiny_llama(models_dir / "pull-drafter.gguf", seed=12, vocab=vocab).read_bytes()


def drafter_requests(hub, name: str) -> list:
    repo, file = draft_file(name)
    return [path for _, path, _ in hub.requests if path.split("?")[0].endswith(f"/{repo}/resolve/main/{file}")]


def test_pull_with_draft_fetches_the_drafter_checks_it_and_the_commands_draft_with_it(
    tmp_path, work, pair_bytes, drafter_bytes, aligned_path
):
    files = {**dict(zip(hub_files("tulu3-8b"), pair_bytes)), draft_file("tulu3-8b"): drafter_bytes}
    with FakeHub(files) as hub:
        pulled = run("pull", ["tulu3-8b", "--with-draft"], env_for(tmp_path, hub.url), work)
    assert pulled.returncode == 0, pulled.stderr
    repo, file = draft_file("tulu3-8b")
    lines = pulled.stdout.splitlines()
    assert sum(len(d) for d in files.values()) == size_in(lines[0], " to download")
    assert any(line.startswith(f"  drafter {repo}/{file} on the Hugging Face hub: ") for line in lines)
    assert f"drafter {repo}/{file} on the Hugging Face hub can draft for the pair" in pulled.stdout
    assert lines[-1] == "pair tulu3-8b is ready: dera-chat --pair tulu3-8b --lam 1.5"
    snapshot = tmp_path / "hf" / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots" / COMMIT / file
    assert snapshot.read_bytes() == drafter_bytes

    offline = env_for(tmp_path, offline=True)
    listed = {r["name"]: r for r in map(json.loads, run("pairs", ["--json"], offline, work).stdout.splitlines())}
    assert listed["tulu3-8b"]["draft"]["status"] == "ready" and listed["tulu3-8b"]["draft"]["size"] == len(
        drafter_bytes
    )
    assert (listed["tulu3-8b"]["beta"], listed["tulu3-8b"]["dpo"]) == (5, "length-normalized")
    ask = ["--pair", "tulu3-8b", "--json", "--prompt", "hello", "--temperature", "0", "--max-tokens", "8"]
    for flags, drafts in [([], True), (["--no-draft"], False)]:
        chat = run("chat", [*ask, *flags], offline, work)
        assert chat.returncode == 0, chat.stderr
        assert ("drafting with the pair's drafter" in chat.stderr) == drafts, chat.stderr
        assert json.loads(chat.stdout)["choices"][0]["message"] == expected_answer(aligned_path, "tulu3-8b", "hello")


def test_pull_without_a_draft_flag_off_a_terminal_fetches_no_drafter_and_says_how(
    tmp_path, work, pair_bytes, drafter_bytes
):
    files = {**dict(zip(hub_files("tulu2-7b"), pair_bytes)), draft_file("tulu2-7b"): drafter_bytes}
    with FakeHub(files) as hub:
        plain = run("pull", ["tulu2-7b"], env_for(tmp_path, hub.url), work)
        assert plain.returncode == 0, plain.stderr
        size = hub_format(SHIPPED.get("tulu2-7b").draft.spec["size"])
        assert f"get it with: dera-pull tulu2-7b --with-draft ({size})" in plain.stdout
        skipped = run("pull", ["tulu2-7b", "--no-draft"], env_for(tmp_path, hub.url), work)
        assert skipped.returncode == 0 and "drafter" not in skipped.stdout
        assert drafter_requests(hub, "tulu2-7b") == []
        no_drafter = run("pull", ["olmo2-7b", "--with-draft"], env_for(tmp_path, hub.url), work)
    assert no_drafter.returncode == 1 and "pair 'olmo2-7b' names no drafter" in no_drafter.stderr


def test_pull_asks_on_a_terminal_whether_to_fetch_the_drafter(tmp_path, work, pair_bytes, drafter_bytes):
    files = {**dict(zip(hub_files("zephyr-7b"), pair_bytes)), draft_file("zephyr-7b"): drafter_bytes}
    with FakeHub(files) as hub:
        child = pexpect.spawn(
            sys.executable,
            ["-m", "dera_gguf.cli.pull", "zephyr-7b"],
            env=env_for(tmp_path, hub.url),
            cwd=str(work),
            encoding="utf-8",
            timeout=60,
        )
        repo, file = draft_file("zephyr-7b")
        child.expect_exact(f"zephyr-7b has a drafter for speculative decoding, {repo}/{file} on the Hugging Face hub")
        child.expect_exact("fetch it too? [y/N]")
        child.sendline("y")
        child.expect_exact("pair zephyr-7b is ready")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
        assert drafter_requests(hub, "zephyr-7b")


def test_a_drafter_that_cannot_draft_for_the_pair_is_refused_by_name(tmp_path, work, pair_bytes, models_dir):
    """In the cache but failing llama.cpp's rule: dera-pull names it; dera-chat and dera-serve refuse it (they would
    draft with it), and dera-chat runs with --no-draft."""
    vocab = tiny_vocab()
    vocab.tokens[300] = "\u2581different"
    bad = write_tiny_llama(models_dir / "pull-bad-drafter.gguf", seed=13, vocab=vocab).read_bytes()
    cache = tmp_path / "hf" / "hub"
    for (repo, file), data in [*zip(hub_files("tulu3-8b"), pair_bytes), (draft_file("tulu3-8b"), bad)]:
        put_in_cache(cache, repo, file, data)
    env = env_for(tmp_path, offline=True)
    pulled = run("pull", ["tulu3-8b"], env, work)
    assert pulled.returncode == 1 and "Traceback" not in pulled.stderr
    assert "token 300 is '\u2581different' in it" in pulled.stderr and "--no-draft" in pulled.stderr
    assert "Pair 'tulu3-8b' itself is ready" in pulled.stderr
    ask = ["--pair", "tulu3-8b", "--prompt", "hello", "--max-tokens", "4"]
    refused = run("chat", ask, env, work)
    assert refused.returncode == 1 and "cannot draft for the pair" in refused.stderr
    assert run("chat", [*ask, "--no-draft"], env, work).returncode == 0
    served = run("serve", ["--pair", "tulu3-8b", "--port", "0"], env, work)
    assert served.returncode == 1 and "cannot draft for the pair" in served.stderr
