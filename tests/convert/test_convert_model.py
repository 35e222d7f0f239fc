"""The converted GGUF behaves like the checkpoint, with transformers as the reference."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from tiny_checkpoint import (
    CHAT,
    ZEPHYR_TEMPLATE,
    hf_logits,
    load_llama,
    make_checkpoint,
    run_cli,
)
from transformers import AutoTokenizer


@pytest.fixture(scope="module")
def hf_tokenizer(mistral_ckpt):
    return AutoTokenizer.from_pretrained(mistral_ckpt)


@pytest.fixture(scope="module")
def prompt_ids(hf_tokenizer):
    """The HF tokenizer's ids for a Zephyr chat prompt (BOS added by the tokenizer)."""
    text = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    return text, hf_tokenizer(text).input_ids


@pytest.fixture(scope="module")
def reference_logits(mistral_ckpt, prompt_ids):
    return hf_logits(mistral_ckpt, prompt_ids[1])


def assert_same_argmax(ours, ref) -> None:
    """Same argmax at every position whose reference top-2 gap exceeds twice the worst logit error.

    Random tiny models have occasional near-ties (gaps of 1e-4) that F16 rounding may flip on
    another CPU; only those positions are excluded, and they must stay rare.
    """
    noise = 2 * np.abs(ours - ref).max()
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > noise
    assert decisive.mean() > 0.9
    np.testing.assert_array_equal(ours.argmax(-1)[decisive], ref.argmax(-1)[decisive])


def llama_logits(path, ids):
    llm = load_llama(path)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def test_tokenization_matches_transformers(converted, prompt_ids):
    text, hf_ids = prompt_ids
    llm = load_llama(converted("F16"), vocab_only=True)
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf_ids
    assert hf_ids[0] == llm.token_bos() == 1


def test_special_tokens_and_flags(converted, hf_tokenizer):
    llm = load_llama(converted("F16"), vocab_only=True)
    assert llm.token_bos() == hf_tokenizer.bos_token_id
    assert llm.token_eos() == hf_tokenizer.eos_token_id
    assert llm.metadata["tokenizer.ggml.add_bos_token"] == "true"
    assert llm.metadata["tokenizer.ggml.add_eos_token"] == "false"
    assert llm.n_vocab() == len(hf_tokenizer)


def test_chat_template_survives(converted, hf_tokenizer):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = load_llama(converted("F16"), vocab_only=True)
    template = llm.metadata["tokenizer.chat_template"]
    assert template == ZEPHYR_TEMPLATE
    rendered = Jinja2ChatFormatter(template, eos_token="</s>", bos_token="<s>")(messages=CHAT).prompt
    assert rendered == hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)


def test_f16_logits_match_transformers(converted, prompt_ids, reference_logits):
    ours = llama_logits(converted("F16"), prompt_ids[1])
    assert ours.shape == reference_logits.shape
    scale = np.abs(reference_logits).max()
    assert np.abs(ours - reference_logits).max() < 0.01 * scale + 1e-3
    assert_same_argmax(ours, reference_logits)


def test_q8_0_logits_close(converted, prompt_ids, reference_logits):
    ours = llama_logits(converted("Q8_0"), prompt_ids[1])
    scale = np.abs(reference_logits).max()
    assert np.abs(ours - reference_logits).max() < 0.05 * scale
    assert (ours.argmax(-1) == reference_logits.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q5_K_M", "Q4_0"])
def test_4_and_5_bit_quants_run_and_are_smaller(converted, prompt_ids, reference_logits, quant):
    """4/5-bit types: llama.cpp accepts them (with its fallbacks for tiny shapes) and they are smaller."""
    path = converted(quant)
    assert path.stat().st_size < converted("F16").stat().st_size
    ours = llama_logits(path, prompt_ids[1])
    assert np.isfinite(ours).all()
    assert np.corrcoef(ours.ravel(), reference_logits.ravel())[0, 1] > 0.9


def test_llama_arch_with_tied_embeddings(tmp_path, spm_model, hf_tokenizer, prompt_ids):
    """LlamaForCausalLM, no GQA, tied embeddings, template in tokenizer_config.json."""
    ckpt = make_checkpoint(tmp_path / "tiny-llama", spm_model, arch="llama", seed=1, tie=True, template_in="config")
    out = tmp_path / "tiny-llama.gguf"
    assert run_cli(str(ckpt), str(out), "--quant", "F16").exit_code == 0
    ids = prompt_ids[1]
    ref = hf_logits(ckpt, ids)
    ours = llama_logits(out, ids)
    assert np.abs(ours - ref).max() < 0.01 * np.abs(ref).max() + 1e-3
    assert_same_argmax(ours, ref)
    assert load_llama(out, vocab_only=True).metadata["tokenizer.chat_template"] == ZEPHYR_TEMPLATE


def test_tokenizer_json_only(tmp_path, mistral_ckpt, prompt_ids):
    """Without tokenizer.model the vocabulary comes from tokenizer.json and still tokenizes the same."""
    ckpt = tmp_path / "no-spm"
    shutil.copytree(mistral_ckpt, ckpt)
    (ckpt / "tokenizer.model").unlink()
    out = tmp_path / "no-spm.gguf"
    result = run_cli(str(ckpt), str(out), "--quant", "F16")
    assert result.exit_code == 0, result.output
    llm = load_llama(out, vocab_only=True)
    text, hf_ids = prompt_ids
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf_ids
    assert llm.metadata["tokenizer.chat_template"] == ZEPHYR_TEMPLATE


def test_embedding_padded_beyond_tokenizer(tmp_path, spm_model, prompt_ids):
    """vocab_size larger than the tokenizer: padded with unused tokens, same ids, same logits."""
    ckpt = make_checkpoint(tmp_path / "padded", spm_model, seed=2, extra_vocab=20)
    out = tmp_path / "padded.gguf"
    result = run_cli(str(ckpt), str(out), "--quant", "F16")
    assert result.exit_code == 0, result.output
    text, ids = prompt_ids
    llm = load_llama(out)
    n_vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    assert llm.n_vocab() == n_vocab == len(AutoTokenizer.from_pretrained(ckpt)) + 20
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids
    ref = hf_logits(ckpt, ids)
    ours = llama_logits(out, ids)
    assert np.abs(ours - ref).max() < 0.01 * np.abs(ref).max() + 1e-3
