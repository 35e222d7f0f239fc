"""Build tiny random-weight Llama/Mistral checkpoints the way real hub repos look.

Everything is generated here, nothing downloaded: a byte-fallback SentencePiece
BPE model trained on a small corpus, a transformers tokenizer built from it
(legacy SentencePiece behaviour, add BOS, like Zephyr's), the Zephyr chat
template, and bf16 weights saved as sharded safetensors.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)

CHAT = [
    {"role": "system", "content": "You are a friendly chatbot who always responds in the style of a pirate."},
    {
        "role": "user",
        "content": "How many helicopters can a human eat in one sitting? Ünïcödé 日本 😀\n\n  tabs\there 12345",
    },
    {"role": "assistant", "content": "Arr, none at all, matey!"},
    {"role": "user", "content": "Why not?"},
]

_WORDS = (
    "the quick brown fox jumps over a lazy dog hello world assistant user system you are friendly "
    "chatbot who always responds in style of pirate how many helicopters can human eat one sitting "
    "arr none at all matey why not"
).split()


def train_sentencepiece(vocab_size: int = 480) -> bytes:
    """A byte-fallback BPE SentencePiece model with Mistral's options, trained on a toy corpus."""
    import sentencepiece as spm

    rng = random.Random(0)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(12)) for _ in range(2000)]
    lines += ["Ünïcödé 日本語 tabs\tand\nnewlines 0123456789 !?.,;:<>|"] * 3
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _save_tokenizer(folder: Path, spm_model: bytes, template_in: str) -> int:
    """Save a transformers tokenizer built from the SentencePiece model; return its size."""
    from transformers import LlamaTokenizer

    src = folder / "_spm"
    src.mkdir()
    (src / "tokenizer.model").write_bytes(spm_model)
    tok = LlamaTokenizer.from_pretrained(src, legacy=True, add_bos_token=True, add_eos_token=False)
    shutil.rmtree(src)
    tok.chat_template = ZEPHYR_TEMPLATE
    tok.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(spm_model)  # real repos ship it; transformers 5 does not write it
    if template_in == "config":  # transformers 4 style: the template inside tokenizer_config.json
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["chat_template"] = (folder / "chat_template.jinja").read_text()
        cfg_path.write_text(json.dumps(cfg, indent=2))
        (folder / "chat_template.jinja").unlink()
    return len(tok)


def make_checkpoint(
    folder: Path,
    spm_model: bytes,
    *,
    arch: str = "mistral",
    seed: int = 0,
    template_in: str = "jinja",
    tie: bool = False,
    shard_size: str = "60KB",
    extra_vocab: int = 0,
) -> Path:
    """Write a tiny random bf16 checkpoint (sharded safetensors + tokenizer) into ``folder``.

    ``extra_vocab`` pads the embedding beyond the tokenizer, as many released models do.
    """
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_vocab = _save_tokenizer(folder, spm_model, template_in)
    config_cls, model_cls = (
        (MistralConfig, MistralForCausalLM) if arch == "mistral" else (LlamaConfig, LlamaForCausalLM)
    )
    config = config_cls(
        vocab_size=n_vocab + extra_vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2 if arch == "mistral" else 4,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=tie,
        initializer_range=0.08,
    )
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.bfloat16)
    with torch.no_grad():  # norms away from 1.0 so a mapping mistake shows in the logits
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(folder, max_shard_size=shard_size)
    return folder


def hf_logits(folder: Path, ids: list[int]):
    """Reference logits from transformers, float32, for one token sequence."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def run_cli(*args: str):
    """Run dera-convert in-process; return the click Result."""
    from click.testing import CliRunner

    from dera_gguf.cli.convert import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def load_llama(path, **kw):
    """A plain llama_cpp.Llama with every position's logits kept."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=2, **kw)
