"""Session fixtures for the converter tests: one tiny checkpoint, converted once per type."""

from __future__ import annotations

import pytest
from tiny_checkpoint import make_checkpoint, run_cli, train_sentencepiece


@pytest.fixture(scope="session")
def spm_model() -> bytes:
    return train_sentencepiece()


@pytest.fixture(scope="session")
def mistral_ckpt(tmp_path_factory, spm_model):
    """Tiny MistralForCausalLM: GQA, bf16, 5+ safetensors shards, template in chat_template.jinja."""
    return make_checkpoint(tmp_path_factory.mktemp("mistral") / "tiny-mistral", spm_model)


@pytest.fixture(scope="session")
def converted(tmp_path_factory, mistral_ckpt):
    """Convert the tiny Mistral to a given quant once; cached per quant name."""
    cache: dict[str, object] = {}
    out_dir = tmp_path_factory.mktemp("gguf")

    def get(quant: str):
        if quant not in cache:
            out = out_dir / f"tiny-mistral.{quant}.gguf"
            result = run_cli(str(mistral_ckpt), str(out), "--quant", quant)
            assert result.exit_code == 0, result.output
            cache[quant] = out
        return cache[quant]

    return get


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes tens of seconds (deselect with -m 'not slow')")
