"""Carry the tokenizer into the GGUF file: tokens, scores, types, special ids, chat template.

Preference order is the one the model was trained with: a SentencePiece
``tokenizer.model`` (read through gguf-py's ``SentencePieceVocab``), else a
Llama-style ``tokenizer.json`` (BPE with byte fallback), which we read without
transformers. Special ids, add-BOS/EOS flags and the chat template come from
gguf-py's ``SpecialVocab`` (tokenizer_config.json, tokenizer.json, config.json);
``chat_template.jinja`` (what transformers 5 writes) fills the template when
tokenizer_config.json has none.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from ..errors import DeRaError
from .hparams import HParams

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class TokenizerData:
    """Everything tokenizer-related that goes into the GGUF header."""

    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    special_ids: dict[str, int] = field(default_factory=dict)
    add_special: dict[str, bool] = field(default_factory=dict)
    chat_template: str | None = None

    def add_to_writer(self, writer: gguf.GGUFWriter) -> None:
        """Write the ``tokenizer.ggml.*`` keys llama.cpp's SPM tokenizer reads."""
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(self.tokens)
        writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        for typ, tid in self.special_ids.items():
            getattr(writer, f"add_{typ}_token_id")(tid)
        for typ, flag in self.add_special.items():
            getattr(writer, f"add_add_{typ}_token")(flag)
        if self.chat_template is not None:
            writer.add_chat_template(self.chat_template)


def _added_tokens(folder: Path) -> list[dict]:
    """The ``added_tokens`` list of tokenizer.json, or [] when there is none."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("added_tokens") or []
    except (OSError, ValueError) as e:
        raise DeRaError(f"{path}: unreadable tokenizer.json ({e})") from e


def _from_sentencepiece(folder: Path) -> tuple[list[bytes], list[float], list[int]]:
    """Tokens of tokenizer.model plus any tokens added on top of it in tokenizer.json."""
    try:
        spm = gguf.SentencePieceVocab(folder)
    except Exception as e:  # sentencepiece raises bare RuntimeError/OSError on bad files
        raise DeRaError(f"{folder / 'tokenizer.model'}: unreadable SentencePiece model ({e})") from e
    tokens, scores, types = [], [], []
    for text, score, toktype in spm.all_tokens():
        tokens.append(text)
        scores.append(float(score))
        types.append(int(toktype))
    for added in sorted(_added_tokens(folder), key=lambda t: t["id"]):
        if added["id"] == len(tokens):
            tokens.append(added["content"].encode("utf-8"))
            scores.append(-1000.0)
            types.append(int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED))
    return tokens, scores, types


def _merge_scores(model: dict, n_tokens: int) -> list[float]:
    """SPM-style scores from BPE merge ranks: a token made by an earlier merge scores higher."""
    inv = {v: k for k, v in model["vocab"].items()}
    rank: dict[str, int] = {}
    for i, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, i)
    n_merges = len(rank)
    return [float(-rank[inv[i]]) if inv.get(i) in rank else float(-(n_merges + i)) for i in range(n_tokens)]


def _from_tokenizer_json(folder: Path) -> tuple[list[bytes], list[float], list[int]]:
    """Tokens of a Llama-style tokenizer.json (BPE with byte fallback), without transformers."""
    path = folder / "tokenizer.json"
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
        model = tok["model"]
    except (OSError, ValueError, KeyError) as e:
        raise DeRaError(f"{path}: unreadable tokenizer.json ({e})") from e
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise DeRaError(
            f"{path}: only SentencePiece-style BPE tokenizers with byte fallback are supported "
            "(add the model's tokenizer.model to the folder)"
        )
    added = {t["id"]: t for t in tok.get("added_tokens") or []}
    vocab = {v: k for k, v in model["vocab"].items()}
    n_tokens = max([*vocab, *added], default=-1) + 1
    scores = _merge_scores(model, n_tokens)
    unk = model["vocab"].get(model.get("unk_token") or "<unk>")
    tokens, types = [], []
    for i in range(n_tokens):
        text = added[i]["content"] if i in added else vocab.get(i, f"[PAD{i}]")
        tokens.append(text.encode("utf-8"))
        if i in added and added[i].get("special"):
            types.append(int(gguf.TokenType.CONTROL if i != unk else gguf.TokenType.UNKNOWN))
        elif i in added:
            types.append(int(gguf.TokenType.USER_DEFINED))
        elif i == unk:
            types.append(int(gguf.TokenType.UNKNOWN))
        elif _BYTE_TOKEN.fullmatch(text):
            types.append(int(gguf.TokenType.BYTE))
        else:
            types.append(int(gguf.TokenType.NORMAL if i in vocab else gguf.TokenType.UNUSED))
    return tokens, scores, types


def _pad(tokens: list[bytes], scores: list[float], types: list[int], n_vocab: int, folder: Path) -> None:
    """Pad the token list to the embedding size with unused ``[PADi]`` tokens."""
    if len(tokens) > n_vocab:
        raise DeRaError(
            f"{folder}: the tokenizer has {len(tokens)} tokens but the model's vocab_size is {n_vocab}; "
            "tokenizer and weights do not belong together"
        )
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))


def _chat_template(folder: Path, special: gguf.SpecialVocab) -> str | None:
    """The chat template: tokenizer_config.json's, else chat_template.jinja's."""
    template = special.chat_template
    if isinstance(template, list):  # named templates: keep the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template


def _special_vocab(folder: Path, n_tokens: int) -> gguf.SpecialVocab:
    """gguf-py's reading of special ids, add flags and template, minus its post-processor chatter."""
    log = logging.getLogger("gguf.vocab")
    level = log.level
    log.setLevel(logging.ERROR)  # it warns about HF template heuristics users cannot act on
    try:
        return gguf.SpecialVocab(folder, load_merges=False, n_vocab=n_tokens)
    finally:
        log.setLevel(level)


def load_tokenizer(folder: Path, hp: HParams) -> TokenizerData:
    """Collect the tokenizer of a checkpoint folder, or explain what is missing."""
    folder = Path(folder)
    if (folder / "tokenizer.model").is_file():
        tokens, scores, types = _from_sentencepiece(folder)
    elif (folder / "tokenizer.json").is_file():
        tokens, scores, types = _from_tokenizer_json(folder)
    else:
        raise DeRaError(
            f"{folder}: no tokenizer found (expected tokenizer.model or tokenizer.json); "
            "download the tokenizer files with the weights"
        )
    _pad(tokens, scores, types, hp.n_vocab, folder)
    special = _special_vocab(folder, len(tokens))
    ids = {k: v for k, v in special.special_token_ids.items() if k in ("bos", "eos", "unk", "pad")}
    for typ, tid in (("bos", hp.bos_token_id), ("eos", hp.eos_token_id)):
        if tid is not None and tid < len(tokens):
            ids.setdefault(typ, tid)
    if "unk" not in ids and gguf.TokenType.UNKNOWN in types:
        ids["unk"] = types.index(gguf.TokenType.UNKNOWN)
    add = {k: v for k, v in special.add_special_token.items() if k in ("bos", "eos")}
    add.setdefault("bos", True)  # the Llama/Mistral convention when nothing says otherwise
    add.setdefault("eos", False)
    return TokenizerData(tokens, scores, types, ids, add, _chat_template(folder, special))
