"""Tiny random-weight llama-architecture GGUF models, written with gguf-py.

They load in milliseconds, so tests can compare DeRaLlama with plain
``llama_cpp.Llama`` instances on the same files. The tokenizer is a small
SentencePiece-style vocabulary with byte fallback, so any text tokenizes.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import gguf
import numpy as np

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WORDS = [
    "the",
    "a",
    "and",
    "of",
    "to",
    "is",
    "you",
    "hello",
    "world",
    "model",
    "short",
    "long",
    "answer",
    "question",
    "please",
    "write",
    "about",
    "cat",
    "dog",
    "sun",
    "rain",
    "tell",
    "me",
]


@dataclass
class TinyVocab:
    """Token texts, scores and types of a SentencePiece-like vocabulary with byte fallback."""

    tokens: List[str] = field(default_factory=list)
    scores: List[float] = field(default_factory=list)
    types: List[int] = field(default_factory=list)
    bos: int = 1
    eos: int = 2

    @classmethod
    def default(cls, n_vocab: int = 0) -> "TinyVocab":
        """The base vocabulary, padded with filler words up to ``n_vocab`` tokens if larger."""
        v = cls()
        T = gguf.TokenType
        for text, kind in [
            ("<unk>", T.UNKNOWN),
            ("<s>", T.CONTROL),
            ("</s>", T.CONTROL),
            ("<|im_start|>", T.CONTROL),
            ("<|im_end|>", T.CONTROL),
        ]:
            v.add(text, 0.0, kind)
        for b in range(256):
            v.add(f"<0x{b:02X}>", 0.0, T.BYTE)
        pieces = ["\u2581"] + list(string.ascii_lowercase) + ["\u2581" + c for c in string.ascii_lowercase]
        pieces += ["\u2581" + w for w in WORDS] + list(string.digits) + list(".,!?:\n")
        for i, p in enumerate(dict.fromkeys(pieces)):
            v.add(p, -float(i) if len(p) < 3 else float(len(p)), T.NORMAL)
        for i in range(len(v.tokens), n_vocab):
            v.add(f"\u2581w{i}", -1000.0 - i, T.NORMAL)
        return v

    def add(self, text: str, score: float, kind: int) -> None:
        self.tokens.append(text)
        self.scores.append(score)
        self.types.append(int(kind))


def tiny_vocab(**changes) -> TinyVocab:
    """The default vocabulary with some attributes replaced (for incompatible-pair tests)."""
    vocab = TinyVocab.default()
    for key, value in changes.items():
        setattr(vocab, key, value)
    return vocab


def write_tiny_llama(
    path: Path,
    seed: int,
    vocab: Optional[TinyVocab] = None,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 512,
    chat_template: Optional[str] = CHAT_TEMPLATE,
    logit_scale: float = 3.0,
    tokenizer: str = "llama",
    add_eos: bool = False,
) -> Path:
    """Write a random llama model to ``path``; ``seed`` picks the weights. ``tokenizer``: llama.cpp's
    tokenizer model ("llama": SentencePiece; "gpt2": BPE over the same token texts, one merge);
    ``add_eos``: whether a prompt ends with EOS."""
    vocab = vocab or TinyVocab.default()
    rng = np.random.default_rng(seed)
    n_vocab = len(vocab.tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"tiny-llama-{seed}")
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model(tokenizer)
    if tokenizer == "gpt2":
        w.add_tokenizer_pre("default")
        w.add_token_merges(["\u2581 a"])  # llama.cpp wants one at least
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_bos_token_id(vocab.bos)
    w.add_eos_token_id(vocab.eos)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(add_eos)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    def t(name: str, *shape: int, scale: float = 1.0) -> None:
        data = rng.standard_normal(shape).astype(np.float32) * np.float32(scale / np.sqrt(shape[-1]))
        w.add_tensor(name, data)

    head_dim = n_embd // n_head
    t("token_embd.weight", n_vocab, n_embd, scale=np.sqrt(n_embd))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        t(f"blk.{i}.attn_q.weight", n_embd, n_embd)
        t(f"blk.{i}.attn_k.weight", n_head_kv * head_dim, n_embd)
        t(f"blk.{i}.attn_v.weight", n_head_kv * head_dim, n_embd)
        t(f"blk.{i}.attn_output.weight", n_embd, n_embd)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        t(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        t(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        t(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    t("output.weight", n_vocab, n_embd, scale=logit_scale)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tiny_lora(
    path: Path,
    seed: int,
    n_embd: int = 64,
    n_layer: int = 2,
    n_ff: int = 128,
    rank: int = 4,
    alpha: float = 8.0,
    scale: float = 2.0,
) -> Path:
    """Write a random llama.cpp LoRA adapter (GGUF) for ``write_tiny_llama`` models.

    It adapts the value, output and feed-forward projections; ``lora_a`` has numpy
    shape (rank, n_in) and ``lora_b`` (n_out, rank), as llama.cpp expects.
    """
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    shapes = {"attn_output": (n_embd, n_embd), "ffn_up": (n_ff, n_embd), "ffn_down": (n_embd, n_ff)}
    for i in range(n_layer):
        for name, (n_out, n_in) in shapes.items():
            a = rng.standard_normal((rank, n_in)).astype(np.float32) * np.float32(scale / np.sqrt(n_in))
            b = rng.standard_normal((n_out, rank)).astype(np.float32) * np.float32(scale / np.sqrt(rank))
            w.add_tensor(f"blk.{i}.{name}.weight.lora_a", a)
            w.add_tensor(f"blk.{i}.{name}.weight.lora_b", b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
