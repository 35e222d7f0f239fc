"""Bad input: one exception type (a ValueError subclass), a message that names the problem, no crash."""

from __future__ import annotations

import math

import pytest
from tiny_models import tiny_vocab, write_tiny_llama

from dera_gguf import DeRaError, DeRaLlama


def make(ref, aligned, lam=1.0, **kw):
    return DeRaLlama(str(ref), aligned, lam=lam, n_ctx=128, verbose=False, **kw)


@pytest.fixture(scope="module")
def llm(ref_path, aligned_path):
    return make(ref_path, str(aligned_path))


def test_error_type_is_a_value_error():
    assert issubclass(DeRaError, ValueError)


def test_missing_file_is_named(ref_path, tmp_path):
    missing = tmp_path / "nope" / "aligned.gguf"
    with pytest.raises(DeRaError, match=str(missing)):
        make(ref_path, str(missing))
    with pytest.raises(DeRaError, match=str(missing)):
        make(missing, str(ref_path))


def test_non_gguf_file_is_named(ref_path, tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(DeRaError, match=f"{bogus}.*not a GGUF"):
        make(ref_path, str(bogus))
    with pytest.raises(DeRaError, match="folder"):
        make(ref_path, str(tmp_path))


def test_truncated_gguf_is_refused(ref_path, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(ref_path.read_bytes()[:200])
    with pytest.raises(DeRaError, match=str(cut)):
        make(ref_path, str(cut))


@pytest.mark.parametrize("change", ["size", "text", "type", "bos", "eos"])
def test_incompatible_vocabularies(ref_path, tmp_path, change):
    vocab = tiny_vocab()
    if change == "size":
        vocab.add("\u2581extra", 0.0, 1)
    elif change == "text":
        vocab.tokens[300] = vocab.tokens[300] + "x"
    elif change == "type":
        vocab.types[300] = 4  # USER_DEFINED instead of NORMAL
    elif change == "bos":
        vocab.bos = 3
    else:
        vocab.eos = 4
    other = write_tiny_llama(tmp_path / f"{change}.gguf", seed=5, vocab=vocab)
    with pytest.raises(DeRaError, match="tokenizer"):
        make(ref_path, str(other))


@pytest.mark.parametrize("lam", [math.nan, math.inf, -math.inf, "1.0", None, True])
def test_bad_lam(ref_path, aligned_path, llm, lam):
    with pytest.raises(DeRaError, match="lam"):
        make(ref_path, str(aligned_path), lam=lam)
    with pytest.raises(DeRaError, match="lam"):
        llm.create_completion("hello", max_tokens=2, lam=lam if lam is not None else math.nan)
    with pytest.raises(DeRaError, match="lam"):
        llm.lam = lam


def test_lam_list_must_match_aligned_models(ref_path, aligned_path, aligned2_path, llm):
    with pytest.raises(DeRaError, match="2 aligned"):
        make(ref_path, [str(aligned_path), str(aligned2_path)], lam=[0.5])
    with pytest.raises(DeRaError, match="1 aligned"):
        llm.create_chat_completion([{"role": "user", "content": "hi"}], lam=[0.5, 0.5])


def test_prompt_between_asked_and_rounded_n_ctx(llm):
    """llama.cpp rounds n_ctx=128 up to 256; a 200-token prompt must still be refused cleanly."""
    prompt = [1] + [300] * 199
    with pytest.raises(DeRaError, match="n_ctx"):
        llm.create_completion(prompt, max_tokens=2)


def test_prompt_longer_than_n_ctx(llm):
    with pytest.raises(DeRaError, match="n_ctx"):
        llm.create_completion("the cat " * 200, max_tokens=2)
    with pytest.raises(DeRaError, match="n_ctx"):
        llm.create_chat_completion([{"role": "user", "content": "the dog " * 200}], max_tokens=2)


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=math.nan),
        dict(top_p=1.5),
        dict(min_p=-0.1),
        dict(top_k=-3),
        dict(top_k=2.5),
        dict(repeat_penalty=0.0),
        dict(typical_p=0.0),
        dict(seed=-1),
        dict(seed=2**40),
        dict(mirostat_mode=3),
        dict(max_tokens="ten"),
        dict(stop=[1, 2]),
        dict(frequency_penalty=math.inf),
    ],
)
def test_invalid_sampling_values(llm, bad):
    name = next(iter(bad))
    with pytest.raises(DeRaError, match=name):
        llm.create_completion("hello", **bad)
    with pytest.raises(DeRaError, match=name):
        llm.create_chat_completion([{"role": "user", "content": "hi"}], **bad)


def test_logprobs_need_logits_all(llm):
    with pytest.raises(DeRaError, match="logits_all"):
        llm.create_completion("hello", max_tokens=2, logprobs=2)


@pytest.mark.parametrize("prompt", [[-1], [10**6], 3.5, [1, "a"]])
def test_bad_prompt_tokens(llm, prompt):
    with pytest.raises(DeRaError, match="prompt"):
        llm.create_completion(prompt, max_tokens=2)


@pytest.mark.parametrize("kw", [dict(model_path="x"), dict(draft_model=object()), dict(embedding=True)])
def test_refused_llama_kwargs(ref_path, aligned_path, kw):
    with pytest.raises(DeRaError, match=next(iter(kw))):
        make(ref_path, str(aligned_path), **kw)


def test_engine_still_works_after_errors(llm):
    for bad in (dict(top_p=2.0), dict(lam=math.nan)):
        with pytest.raises(DeRaError):
            llm.create_completion("hello", **bad)
    assert llm.create_completion("hello", max_tokens=3, temperature=0.0)["choices"][0]["text"] is not None


@pytest.mark.parametrize(
    "kwargs,named,hint",
    [
        (dict(n_gpu_layer=-1), "n_gpu_layer", "n_gpu_layers"),
        (dict(speculate="lookup"), "speculate", "speculative"),
        (dict(modes="weights"), "modes", "mode"),
    ],
)
def test_unknown_constructor_keywords_are_refused_by_name(ref_path, aligned_path, kwargs, named, hint):
    # llama_cpp.Llama itself accepts and ignores these; a DeRaLlama that ran with defaults would mislead
    with pytest.raises(DeRaError, match=f"unknown keyword argument {named}=") as caught:
        make(ref_path, str(aligned_path), **kwargs)
    if hint:
        assert f"did you mean {hint}=" in str(caught.value)


@pytest.mark.parametrize("call", ["create_completion", "create_chat_completion", "__call__"])
def test_unknown_call_keywords_are_refused_by_name(llm, call):
    prompt = [{"role": "user", "content": "hi"}] if call == "create_chat_completion" else "hi"
    with pytest.raises(DeRaError, match="max_token.*did you mean max_tokens="):
        getattr(llm, call)(prompt, max_token=3)


def test_context_overflow_has_its_own_type(llm):
    from dera_gguf.errors import ContextFullError

    with pytest.raises(ContextFullError, match="n_ctx"):
        llm.create_completion("tell me " * 200, max_tokens=2)
    messages = [{"role": "user", "content": "tell me " * 200}]
    with pytest.raises(ContextFullError, match="n_ctx"):
        llm.create_chat_completion(messages, max_tokens=2)
    assert llm.create_completion("hello", max_tokens=2, temperature=0)["choices"][0]["finish_reason"]


def test_a_grammar_llama_cpp_cannot_parse_is_refused_not_a_crash(llm):
    from llama_cpp import LlamaGrammar

    broken = LlamaGrammar.from_string('root ::= "yes" | undefined-rule', verbose=False)
    with pytest.raises(DeRaError, match="grammar"):
        llm.create_completion("hello", max_tokens=2, grammar=broken)
    with pytest.raises(DeRaError, match="grammar"):
        llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=2, grammar=broken)
    fine = LlamaGrammar.from_string('root ::= "yes" | "no"', verbose=False)
    assert llm.create_completion("hello", max_tokens=4, grammar=fine)["choices"][0]["text"] in ("yes", "no")
