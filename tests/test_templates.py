"""Chat templates of a pair: the aligned model's, the reference's when it has none, or the one a pair names."""

from __future__ import annotations

import llama_cpp
import pytest
from chat_driver import cli_env, run_cli
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from tiny_models import write_tiny_llama

from dera_gguf import DeRaError, DeRaLlama

OTHER_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
MESSAGES = [{"role": "user", "content": "tell me about the rain"}]


@pytest.fixture(scope="module")
def no_template(models_dir):
    """The aligned model's weights (seed 2) without a chat template."""
    return write_tiny_llama(models_dir / "aligned-no-template.gguf", seed=2, chat_template=None)


@pytest.fixture(scope="module")
def other_template(models_dir):
    return write_tiny_llama(models_dir / "aligned-other-template.gguf", seed=2, chat_template=OTHER_TEMPLATE)


def plain_with_template(path, template: str) -> llama_cpp.Llama:
    """A plain Llama formatting chats with ``template`` (as llama-cpp-python does for a GGUF's own)."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False)
    eos, bos = llm.token_eos(), llm.token_bos()
    text = llm._model.token_get_text
    llm.chat_handler = Jinja2ChatFormatter(template, text(eos), text(bos), stop_token_ids=[eos]).to_chat_handler()
    return llm


def greedy(llm, **kwargs) -> dict:
    return llm.create_chat_completion(MESSAGES, temperature=0, max_tokens=10, **kwargs)["choices"][0]["message"]


def test_an_aligned_model_without_a_template_uses_the_reference_one(ref_path, no_template):
    from tiny_models import CHAT_TEMPLATE

    llm = DeRaLlama(ref_path, no_template, lam=1.0, n_ctx=256, verbose=False)
    assert llm.pair_files.notes == (f"{no_template} has no chat template: using the reference model's ({ref_path})",)
    assert greedy(llm) == greedy(plain_with_template(no_template, CHAT_TEMPLATE))
    # without the fallback llama-cpp-python would format with its llama-2 guess: a different prompt
    guess = llama_cpp.Llama(model_path=str(no_template), n_ctx=256, verbose=False)
    assert guess.chat_format == "llama-2"


def test_differing_templates_use_the_aligned_one_and_say_so(ref_path, other_template):
    llm = DeRaLlama(ref_path, other_template, lam=1.0, n_ctx=256, verbose=False)
    assert llm.pair_files.notes == (
        f"the chat templates of the two models differ: using the aligned model's ({other_template})",
    )
    assert greedy(llm) == greedy(plain_with_template(other_template, OTHER_TEMPLATE))
    result = run_cli(
        ["--ref", str(ref_path), "--aligned", str(other_template), "--prompt", "hi", "--max-tokens", "2"], cli_env()
    )
    assert result.returncode == 0, result.stderr
    assert "the chat templates of the two models differ: using the aligned model's" in result.stderr


def test_a_named_template_or_format_wins(ref_path, aligned_path):
    llm = DeRaLlama(ref_path, aligned_path, lam=1.0, n_ctx=256, verbose=False, chat_template=OTHER_TEMPLATE)
    assert greedy(llm) == greedy(plain_with_template(aligned_path, OTHER_TEMPLATE))
    zephyr = DeRaLlama(ref_path, aligned_path, lam=1.0, n_ctx=256, verbose=False, chat_format="zephyr")
    plain = llama_cpp.Llama(model_path=str(aligned_path), n_ctx=256, verbose=False, chat_format="zephyr")
    assert greedy(zephyr) == greedy(plain)
    with pytest.raises(DeRaError, match="give one of chat_template, chat_format and chat_handler"):
        DeRaLlama(ref_path, aligned_path, chat_template=OTHER_TEMPLATE, chat_format="zephyr", verbose=False)
    with pytest.raises(DeRaError, match="chat_template must be the text of a Jinja chat template"):
        DeRaLlama(ref_path, aligned_path, chat_template=3, verbose=False)


def test_a_pair_names_its_template_in_models_toml(tmp_path, ref_path, aligned_path, monkeypatch):
    toml = tmp_path / "models.toml"
    toml.write_text(
        f'[pairs.fmt]\nchat_format = "zephyr"\nreference = {{ path = "{ref_path}" }}\n'
        f'aligned = {{ path = "{aligned_path}" }}\n'
        f"[pairs.tpl]\nchat_template = '''{OTHER_TEMPLATE}'''\nreference = {{ path = \"{ref_path}\" }}\n"
        f'aligned = {{ path = "{aligned_path}" }}\n'
    )
    monkeypatch.setenv("DERA_MODELS", str(toml))
    plain = llama_cpp.Llama(model_path=str(aligned_path), n_ctx=256, verbose=False, chat_format="zephyr")
    assert greedy(DeRaLlama.from_pair("fmt", n_ctx=256, verbose=False)) == greedy(plain)
    expected = greedy(plain_with_template(aligned_path, OTHER_TEMPLATE))
    assert greedy(DeRaLlama.from_pair("tpl", n_ctx=256, verbose=False)) == expected
    result = run_cli(
        ["--pair", "tpl", "--json", "--prompt", MESSAGES[0]["content"], "--temperature", "0", "--max-tokens", "10"],
        cli_env(toml),
    )
    assert result.returncode == 0, result.stderr
    import json

    assert json.loads(result.stdout)["choices"][0]["message"] == expected


def test_dera_eval_renders_chats_with_the_same_template(ref_path, no_template, aligned_path):
    """EvalPair: the template a spec names, else the aligned model's, else the reference's (as DeRaLlama)."""
    from tiny_models import CHAT_TEMPLATE

    from dera_gguf.eval.models import PairSpec

    def rendered(template: str) -> str:
        return Jinja2ChatFormatter(template, "</s>", "<s>")(messages=MESSAGES).prompt

    with PairSpec.check(ref_path, no_template).open() as pair:
        assert pair.render_chat(MESSAGES) == rendered(CHAT_TEMPLATE)
    with PairSpec.check(ref_path, aligned_path, chat_template=OTHER_TEMPLATE).open() as pair:
        assert pair.render_chat(MESSAGES) == rendered(OTHER_TEMPLATE)
