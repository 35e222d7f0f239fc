"""dera-convert --pair zephyr-7b end to end, offline, against a Hugging Face cache built here.

The shipped zephyr-7b pair names its checkpoints (HuggingFaceH4/mistral-7b-sft-beta and
zephyr-7b-beta); tiny checkpoints stand in for them under those repo ids.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib
from tiny_checkpoint import load_llama, make_checkpoint, run_cli

REPO_ROOT = Path(__file__).resolve().parents[2]
REFERENCE = "HuggingFaceH4/mistral-7b-sft-beta"
ALIGNED = "HuggingFaceH4/zephyr-7b-beta"


def put_in_hub_cache(hub: Path, repo_id: str, checkpoint: Path, sha: str) -> None:
    """Lay a checkpoint out as the hub cache does: blobs, snapshots/<sha>/ links, refs/main."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / sha
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(checkpoint.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (snap / "pytorch_model.bin").write_bytes(b"not a pickle: must never be read")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, spm_model):
    """HF_HOME with both repos cached: SFT (template in chat_template.jinja), DPO (in tokenizer_config.json)."""
    root = tmp_path_factory.mktemp("hf")
    build = tmp_path_factory.mktemp("build")
    ref = make_checkpoint(build / "sft", spm_model, seed=10)
    ali = make_checkpoint(build / "dpo", spm_model, seed=11, template_in="config")
    put_in_hub_cache(root / "hub", REFERENCE, ref, "a" * 40)
    put_in_hub_cache(root / "hub", ALIGNED, ali, "b" * 40)
    return root


def run_convert(cwd: Path, hf_home: Path, home: Path, *args: str) -> subprocess.CompletedProcess:
    """dera-convert in a subprocess, offline, with ``home`` as the user model folder."""
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO_ROOT),
        HF_HOME=str(hf_home),
        HF_HUB_CACHE=str(hf_home / "hub"),
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        DERA_HOME=str(home),
    )
    env.pop("DERA_MODELS", None)
    return subprocess.run(
        [sys.executable, "-m", "dera_gguf.cli.convert", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_dry_run_lists_files_and_writes_nothing(tmp_path, hf_home):
    home = tmp_path / "home"
    proc = run_convert(tmp_path, hf_home, home, "--pair", "zephyr-7b", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "model.safetensors.index.json" in proc.stdout and "cached" in proc.stdout
    assert "tokenizer.model" in proc.stdout
    assert "pytorch_model.bin" not in proc.stdout  # only what the converter reads
    assert "download: 0.0 kB" in proc.stdout and "conversion: about" in proc.stdout
    assert str(home / "zephyr-7b-beta.Q4_K_M.gguf") in proc.stdout
    assert list(tmp_path.iterdir()) == []  # not even the user model folder


def test_end_to_end_offline(tmp_path, hf_home, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    toml = home / "models.toml"
    toml.write_text(
        '# our models\n[pairs.other]\nreference = { path = "x.gguf" }  # keep me\naligned = [{ path = "y.gguf" }]\n'
    )
    work = tmp_path / "work"
    work.mkdir()
    proc = run_convert(work, hf_home, home, "--pair", "zephyr-7b", "--quant", "q8_0")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "dera-chat --pair zephyr-7b-q8_0" in proc.stdout

    ref = home / "mistral-7b-sft-beta.Q8_0.gguf"
    ali = home / "zephyr-7b-beta.Q8_0.gguf"
    assert sorted(p.name for p in home.glob("*.gguf")) == sorted([ref.name, ali.name])
    assert list(work.iterdir()) == []  # nothing in the current folder
    text = toml.read_text()
    assert text.startswith('# our models\n[pairs.other]\nreference = { path = "x.gguf" }  # keep me\n')
    entry = tomllib.loads(text)["pairs"]["zephyr-7b-q8_0"]
    assert entry["reference"] == {"path": ref.name} and entry["aligned"] == [{"path": ali.name}]
    assert entry["beta"] == 0.1 and entry["license"] == "MIT" and "<|assistant|>" in entry["chat_template"]
    shipped = tomllib.loads((Path(__file__).resolve().parents[2] / "models.toml").read_text())["pairs"]["zephyr-7b"]
    assert entry["dpo"] == shipped["dpo"] and entry["draft"] == shipped["draft"]  # the same training, the same drafter

    # the registered pair resolves from the user's models.toml, relative to its folder
    from dera_gguf.pairs.registry import load_registry

    monkeypatch.setenv("DERA_HOME", str(home))
    registry = load_registry()
    assert registry.get("zephyr-7b-q8_0").resolve() == (str(ref), [str(ali)])
    assert toml in registry.files

    # both load in plain llama.cpp, share the vocabulary and template, and are different models
    llms = [load_llama(p) for p in (ref, ali)]
    assert llms[0].metadata["tokenizer.chat_template"] == llms[1].metadata["tokenizer.chat_template"]
    assert llms[0].metadata["general.name"] == REFERENCE
    ids = llms[0].tokenize(b"<|user|>\nhello world</s>\n<|assistant|>\n", special=True)
    assert ids == llms[1].tokenize(b"<|user|>\nhello world</s>\n<|assistant|>\n", special=True)
    logits = []
    for llm in llms:
        llm.eval(ids)
        logits.append(np.array(llm.scores[: len(ids)]))
    assert np.abs(logits[0] - logits[1]).max() > 0.1

    # a second run reuses the finished files and leaves models.toml as it is
    again = run_convert(work, hf_home, home, "--pair", "zephyr-7b", "--quant", "q8_0")
    assert again.returncode == 0, again.stderr
    assert "exists, keeping it" in again.stdout
    assert toml.read_text() == text


def test_a_pair_without_checkpoints_says_how_to_get_it(tmp_path, hf_home):
    proc = run_convert(tmp_path, hf_home, tmp_path / "home", "--pair", "tulu3-8b")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "names no Hugging Face checkpoint" in proc.stderr and "dera-pull tulu3-8b" in proc.stderr


def test_output_defaults_to_the_user_model_folder(tmp_path, hf_home):
    """SRC alone, or a bare OUT name: into $DERA_HOME; ./OUT: into the current folder."""
    home = tmp_path / "home"
    proc = run_convert(tmp_path, hf_home, home, ALIGNED, "--quant", "q8_0")
    assert proc.returncode == 0, proc.stderr
    assert (home / "zephyr-7b-beta.Q8_0.gguf").is_file()
    proc = run_convert(tmp_path, hf_home, home, ALIGNED, "named.gguf", "--quant", "q8_0")
    assert proc.returncode == 0, proc.stderr
    assert (home / "named.gguf").is_file() and not (tmp_path / "named.gguf").exists()
    proc = run_convert(tmp_path, hf_home, home, ALIGNED, "./here.gguf", "--quant", "q8_0")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "here.gguf").is_file() and not (home / "here.gguf").exists()


def test_cli_accepts_hub_repo_id(tmp_path, hf_home):
    """dera-convert SRC may be a repo id: resolved through the (offline) HF cache."""
    out = tmp_path / "z.gguf"
    proc = run_convert(tmp_path, hf_home, tmp_path / "home", ALIGNED, str(out), "--quant", "q8_0")
    assert proc.returncode == 0, proc.stderr
    llm = load_llama(out, vocab_only=True)
    assert llm.metadata["general.name"] == ALIGNED
    assert llm.metadata["general.file_type"] == "7"  # LLAMA_FTYPE_MOSTLY_Q8_0


def test_bin_only_repo_is_refused(tmp_path, mistral_ckpt):
    """A hub repo with only PyTorch .bin weights: clear refusal, nothing written."""
    hf = tmp_path / "hf"
    only_config = tmp_path / "bin-only"
    only_config.mkdir()
    shutil.copy(mistral_ckpt / "config.json", only_config)
    put_in_hub_cache(hf / "hub", "someone/bin-only", only_config, "c" * 40)  # adds pytorch_model.bin
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HOME=str(hf), HF_HUB_CACHE=str(hf / "hub"), HF_HUB_OFFLINE="1")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "dera_gguf.cli.convert", "someone/bin-only", str(out_dir / "m.gguf")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "no .safetensors weights" in proc.stderr and "Traceback" not in proc.stderr
    assert list(out_dir.iterdir()) == []


def test_missing_from_cache_offline(tmp_path):
    empty = tmp_path / "hf"
    (empty / "hub").mkdir(parents=True)
    home = tmp_path / "home"
    proc = run_convert(tmp_path, empty, home, "--pair", "zephyr-7b")
    assert proc.returncode != 0
    assert "not in the Hugging Face cache" in proc.stderr and "Traceback" not in proc.stderr
    assert not (home / "models.toml").exists()
    assert not list(home.glob("*.gguf")) if home.exists() else True


def test_pair_check_rejects_different_templates(tmp_path, mistral_ckpt, converted):
    from dera_gguf.convert.pair import check_pair
    from dera_gguf.errors import DeRaError

    other = Path(shutil.copytree(mistral_ckpt, tmp_path / "other"))
    (other / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    out = tmp_path / "other.gguf"
    assert run_cli(str(other), str(out), "--quant", "F16").exit_code == 0
    check_pair(converted("F16"), converted("F16"))
    with pytest.raises(DeRaError, match="chat_template differs"):
        check_pair(converted("F16"), out)


def test_write_pair_entry_updates_in_place(tmp_path):
    from dera_gguf.pairs.entries import path_source, write_pair_entry

    toml = tmp_path / "models.toml"
    toml.write_text('[pairs.zephyr-7b]  # the paper\nbeta = 0.5\nnote = "keep"\n\n[pairs.next]\nbeta = 1.0\n')
    values = {
        "reference": path_source(tmp_path / "m" / "r.gguf", toml),
        "aligned": "[" + path_source(tmp_path / "m" / "a.gguf", toml) + "]",
        "beta": "0.1",
    }
    write_pair_entry(toml, "zephyr-7b", values)
    text = toml.read_text()
    assert text.startswith('[pairs.zephyr-7b]  # the paper\nbeta = 0.1\nnote = "keep"\n')
    data = tomllib.loads(text)["pairs"]
    assert data["zephyr-7b"]["reference"] == {"path": "m/r.gguf"}
    assert data["zephyr-7b"]["aligned"] == [{"path": "m/a.gguf"}]
    assert data["next"] == {"beta": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["models.toml"]


def test_a_models_toml_it_cannot_update_is_refused_and_left_as_it_was(tmp_path):
    from dera_gguf.errors import DeRaError
    from dera_gguf.pairs.entries import write_pair_entry

    toml = tmp_path / "models.toml"
    broken = '[pairs.other]\nreference = { path = "a.gguf" \n'  # unclosed inline table
    toml.write_text(broken)
    with pytest.raises(DeRaError, match=r"could not update the \[pairs.zephyr-7b\] entry.*edit it by hand"):
        write_pair_entry(toml, "zephyr-7b", {"reference": '{ path = "r.gguf" }', "aligned": '[{ path = "a.gguf" }]'})
    assert toml.read_text() == broken
