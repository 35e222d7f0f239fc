"""Bad input fails with a clear DeRaError and leaves nothing under (or next to) the final name."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dera_gguf.convert import convert_checkpoint
from dera_gguf.convert.safetensors_reader import list_tensors, read_tensor
from dera_gguf.errors import DeRaError

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ckpt(tmp_path, mistral_ckpt):
    """A private copy of the tiny checkpoint that a test may break."""
    return Path(shutil.copytree(mistral_ckpt, tmp_path / "ckpt"))


def assert_nothing_written(out_dir: Path) -> None:
    """No final file and no leftover temp file in the output folder."""
    assert [p.name for p in out_dir.iterdir()] == []


def convert_fails(src, out_dir: Path, match: str, quant: str = "F16") -> DeRaError:
    out_dir.mkdir(exist_ok=True)
    with pytest.raises(DeRaError, match=match) as info:
        convert_checkpoint(src, out_dir / "model.gguf", quant)
    assert_nothing_written(out_dir)
    return info.value


def test_reader_matches_safetensors_library(mistral_ckpt):
    """Our header parser and bf16 widening agree with the safetensors package (torch backend)."""
    from safetensors import safe_open

    entries = list_tensors(mistral_ckpt)
    checked = 0
    for shard in sorted(mistral_ckpt.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                expected = f.get_tensor(name).float().numpy()
                np.testing.assert_array_equal(read_tensor(entries[name], np.float32), expected)
                checked += 1
    assert checked == len(entries) > 10


def test_unknown_architecture(ckpt, tmp_path):
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(config))
    convert_fails(ckpt, tmp_path / "out", "unsupported architecture .*GPT2LMHeadModel")


def test_bin_only_checkpoint(ckpt, tmp_path):
    for shard in ckpt.glob("*.safetensors"):
        shard.rename(shard.with_suffix(".bin"))
    (ckpt / "model.safetensors.index.json").unlink()
    convert_fails(ckpt, tmp_path / "out", r"only PyTorch \.bin weights")


def test_missing_tokenizer(ckpt, tmp_path):
    (ckpt / "tokenizer.model").unlink()
    (ckpt / "tokenizer.json").unlink()
    convert_fails(ckpt, tmp_path / "out", "no tokenizer found")


def test_corrupt_safetensors_header(ckpt, tmp_path):
    shard = sorted(ckpt.glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[8:40] = b"{not json at all" + b"!" * 16
    shard.write_bytes(bytes(data))
    err = convert_fails(ckpt, tmp_path / "out", "corrupt safetensors header")
    assert shard.name in str(err)


def test_truncated_shard(ckpt, tmp_path):
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    convert_fails(ckpt, tmp_path / "out", "truncated or corrupt")


def test_float16_overflow_is_refused_but_quantizing_keeps_bf16(ckpt, tmp_path):
    """A bf16 weight beyond the float16 range: F16 output refuses, quantization reads bf16 exactly."""
    entry = list_tensors(ckpt)["model.layers.0.mlp.up_proj.weight"]
    big = np.array([1e6], dtype=np.float32).view(np.uint32) >> 16
    with open(entry.path, "r+b") as f:
        f.seek(entry.offset)
        f.write(big.astype(np.uint16).tobytes())
    convert_fails(ckpt, tmp_path / "out", "beyond the float16 range", quant="F16")
    out = convert_checkpoint(ckpt, tmp_path / "q8.gguf", "Q8_0")
    assert out.is_file()


def test_output_folder_missing(mistral_ckpt, tmp_path):
    with pytest.raises(DeRaError, match="does not exist"):
        convert_checkpoint(mistral_ckpt, tmp_path / "nope" / "model.gguf", "F16")
    assert not (tmp_path / "nope").exists()


def test_output_folder_not_writable(mistral_ckpt, tmp_path):
    out_dir = tmp_path / "readonly"
    out_dir.mkdir()
    out_dir.chmod(0o500)
    try:
        if os.access(out_dir, os.W_OK) and os.geteuid() == 0:
            # root ignores permission bits: make "writing" fail the way a read-only mount does
            target = Path("/proc/model.gguf")
            with pytest.raises(DeRaError, match="not writable"):
                convert_checkpoint(mistral_ckpt, target, "F16")
            return
        with pytest.raises(DeRaError, match="not writable"):
            convert_checkpoint(mistral_ckpt, out_dir / "model.gguf", "F16")
        assert list(out_dir.iterdir()) == []
    finally:
        out_dir.chmod(0o700)


@pytest.mark.parametrize("quant", ["F16", "Q4_K_M"])
def test_not_enough_disk(mistral_ckpt, tmp_path, monkeypatch, quant):
    import dera_gguf.convert.writer as writer

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    err = convert_fails(mistral_ckpt, tmp_path / "out", "not enough free disk space", quant)
    assert "needs about" in str(err) and "MB" in str(err)


def test_interrupted_write_leaves_nothing(mistral_ckpt, tmp_path, monkeypatch):
    """Ctrl-C in the middle of the tensor data: temp file removed, no final file."""
    import dera_gguf.convert.writer as writer

    calls = {"n": 0}
    real = writer.iter_tensors

    def interrupted(plan):
        for item in real(plan):
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(writer, "iter_tensors", interrupted)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(mistral_ckpt, out_dir / "model.gguf", "Q8_0")
    assert calls["n"] == 5
    assert_nothing_written(out_dir)


def test_cli_error_is_one_line_without_traceback(ckpt, tmp_path):
    (ckpt / "tokenizer.model").unlink()
    (ckpt / "tokenizer.json").unlink()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "dera_gguf.cli.convert", str(ckpt), str(tmp_path / "m.gguf"), "--quant", "F16"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "no tokenizer found" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "m.gguf").exists()
