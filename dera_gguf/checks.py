"""Input checks that run in Python before anything reaches llama.cpp.

Every failure is a :class:`DeRaError` whose message says what is wrong, where, and
what to do, so bad input never crashes the process inside C.
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import struct
from typing import Any, Callable, List, Mapping, Sequence

import llama_cpp
import numpy as np
from llama_cpp import Llama
from llama_cpp import _internals as internals

from .errors import ContextFullError, DeRaError

GGUF_MAGIC = b"GGUF"


def check_gguf_file(path: Any, role: str) -> str:
    """Return ``path`` as a string after checking it names a readable GGUF file."""
    if not isinstance(path, (str, os.PathLike)):
        raise DeRaError(f"the {role} must be a path to a .gguf file, got {path!r}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DeRaError(f"{role} not found: {path}: check the path, or download / convert the model first")
    if os.path.isdir(path):
        raise DeRaError(f"{role} {path} is a folder: give the path of a .gguf file inside it")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise DeRaError(f"{role} {path} cannot be read ({e.strerror}): check its permissions") from None
    if magic != GGUF_MAGIC:
        raise DeRaError(
            f"{role} {path} is not a GGUF file (it does not start with the GGUF magic bytes): "
            "convert it to GGUF first (dera-convert, or llama.cpp's convert_hf_to_gguf.py)"
        )
    return path


_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF scalar types
_STRING, _ARRAY = 8, 9


def gguf_general_type(path: str) -> str:
    """``general.type`` from a GGUF header ("model", "adapter", ...); "model" when absent."""
    return gguf_strings(path, ("general.type",)).get("general.type", "model")


def gguf_strings(path: str, keys) -> dict:
    """The string values of ``keys`` in a GGUF header (absent keys are left out).

    Reads the key/value section only, stopping once every key is found, so checking a
    multi-GB model costs a few kilobytes of I/O (a key after the tokenizer's arrays, such
    as the chat template, costs a pass over their lengths) and no parsing of tensors.
    """
    wanted, found = set(keys), {}
    try:
        with open(path, "rb") as f:
            f.read(4)  # magic, checked by check_gguf_file
            version, _n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
            for _ in range(n_kv):
                key = _read_string(f)
                kind = _read_u32(f)
                if key in wanted and kind == _STRING:
                    found[key] = _read_string(f)
                    if len(found) == len(wanted):
                        break
                else:
                    _skip_value(f, kind)
    except (struct.error, ValueError, OSError) as e:
        raise DeRaError(f"{path} is not a readable GGUF file ({e}): re-download or re-convert it") from None
    return found


def _read_u32(f) -> int:
    return struct.unpack("<I", f.read(4))[0]


def _read_string(f) -> str:
    (n,) = struct.unpack("<Q", f.read(8))
    data = f.read(n)
    if len(data) != n:
        raise ValueError("truncated header")
    return data.decode("utf-8", errors="replace")


def _skip_value(f, kind: int) -> None:
    if kind in _FIXED_SIZES:
        f.seek(_FIXED_SIZES[kind], 1)
    elif kind == _STRING:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(n, 1)
    elif kind == _ARRAY:
        item, (count,) = _read_u32(f), struct.unpack("<Q", f.read(8))
        if item in _FIXED_SIZES:
            f.seek(_FIXED_SIZES[item] * count, 1)
        else:
            for _ in range(count):
                _skip_value(f, item)
    else:
        raise ValueError(f"unknown value type {kind}")


def load_vocab_only(path: str, role: str, verbose: bool) -> internals.LlamaModel:
    """Load only the vocabulary of a GGUF model (fast: no weights are read)."""
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    try:
        return internals.LlamaModel(path_model=path, params=params, verbose=verbose)
    except ValueError:
        raise DeRaError(
            f"llama.cpp could not load the {role} {path}: the file may be truncated, corrupt or of an "
            "architecture this llama.cpp build does not know; re-download or re-convert it"
        ) from None


def vocab_signature(model: internals.LlamaModel) -> tuple:
    """Everything about a vocabulary that must agree for logits to be blended token by token."""
    vocab = model.vocab
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    texts = [llama_cpp.llama_vocab_get_text(vocab, i) for i in range(n)]
    attrs = [int(llama_cpp.llama_vocab_get_attr(vocab, i)) for i in range(n)]
    return n, texts, attrs, model.token_bos(), model.token_eos()


SAME_TOKENIZER = "DeRa needs models that share one tokenizer"


def check_same_vocab(ref_path: str, ref_sig: tuple, path: str, sig: tuple) -> None:
    """Refuse a model whose vocabulary differs from the reference's in size, any token's text or type, or
    BOS/EOS (their logits are blended token by token)."""
    (n_a, texts_a, attrs_a, bos_a, eos_a), (n_b, texts_b, attrs_b, bos_b, eos_b) = ref_sig, sig
    where = f"{path} and the reference {ref_path}"
    if n_a != n_b:
        raise DeRaError(f"vocabulary sizes differ ({n_b} vs {n_a} tokens) between {where}: {SAME_TOKENIZER}")
    for i, (ta, tb, aa, ab) in enumerate(zip(texts_a, texts_b, attrs_a, attrs_b)):
        if ta != tb or aa != ab:
            raise DeRaError(f"token {i} differs between {where} ({tb!r} vs {ta!r}): {SAME_TOKENIZER}")
    if (bos_a, eos_a) != (bos_b, eos_b):
        raise DeRaError(
            f"BOS/EOS ids differ between {where} (bos {bos_b} vs {bos_a}, eos {eos_b} vs {eos_a}): {SAME_TOKENIZER}"
        )


def check_vocabularies(ref_path: str, model_paths: List[str], verbose: bool) -> None:
    """Refuse before loading any weights if a model's tokenizer differs from the reference's (a drafter's
    rule is looser: :mod:`dera_gguf.speculation.vocab`)."""
    ref_sig = _signature(ref_path, "reference model", verbose)
    for path in model_paths:
        check_same_vocab(ref_path, ref_sig, path, _signature(path, "aligned model", verbose))


def _signature(path: str, role: str, verbose: bool) -> tuple:
    model = load_vocab_only(path, role, verbose)
    try:
        return vocab_signature(model)
    finally:
        model.close()


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DeRaError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DeRaError(f"{name} must be an integer, got {value!r}")
    return value


def _in_range(name: str, value: Any, lo: float, hi: float) -> None:
    if not lo <= _number(name, value) <= hi:
        raise DeRaError(f"{name} must lie in [{lo}, {hi}], got {value!r}")


def check_sampling(kwargs: Mapping[str, Any], n_vocab: int, logits_all: bool) -> None:
    """Check the sampling arguments of a completion call (only those given)."""
    check_sampling_values(kwargs)
    _check_logprobs(kwargs, n_vocab, logits_all)
    stop = kwargs.get("stop")
    if (
        stop is not None
        and not isinstance(stop, str)
        and not (isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop))
    ):
        raise DeRaError(f"stop must be a string or a list of strings, got {stop!r}")


def check_sampling_values(kwargs: Mapping[str, Any]) -> None:
    """Check the sampler settings among ``kwargs`` (only those given): what llama.cpp's chain would misread."""
    get = kwargs.get
    if get("temperature") is not None:
        _number("temperature", get("temperature"))
    for name in ("top_p", "min_p"):
        if get(name) is not None:
            _in_range(name, get(name), 0.0, 1.0)
    if get("typical_p") is not None and not 0.0 < _number("typical_p", get("typical_p")) <= 1.0:
        raise DeRaError(f"typical_p must lie in (0, 1], got {get('typical_p')!r}")
    if get("top_k") is not None and _integer("top_k", get("top_k")) < 0:
        raise DeRaError(f"top_k must be >= 0 (0 turns top-k off), got {get('top_k')!r}")
    if get("repeat_penalty") is not None and _number("repeat_penalty", get("repeat_penalty")) <= 0:
        raise DeRaError(f"repeat_penalty must be > 0 (1.0 turns it off), got {get('repeat_penalty')!r}")
    for name in ("frequency_penalty", "presence_penalty", "mirostat_tau", "mirostat_eta"):
        if get(name) is not None:
            _number(name, get(name))
    if get("mirostat_mode") is not None and get("mirostat_mode") not in (0, 1, 2):
        raise DeRaError(f"mirostat_mode must be 0, 1 or 2, got {get('mirostat_mode')!r}")
    if get("max_tokens") is not None:
        _integer("max_tokens", get("max_tokens"))
    seed = get("seed")
    if seed is not None and not 0 <= _integer("seed", seed) < 2**32:
        raise DeRaError(f"seed must lie in [0, 2**32), got {seed!r}")


def check_grammar(grammar: Any, vocab) -> None:
    """Refuse a GBNF grammar that llama.cpp's own parser rejects.

    llama.cpp returns no sampler for a bad grammar, and llama-cpp-python 0.3.36 adds that
    NULL to the sampler chain anyway: the process would segfault at the first token.
    ``grammar``: a ``llama_cpp.LlamaGrammar`` or GBNF text.
    """
    text = getattr(grammar, "_grammar", grammar)
    root = getattr(grammar, "_root", "root")
    if not isinstance(text, str):
        raise DeRaError(f"grammar must be a llama_cpp.LlamaGrammar or GBNF text, got {type(grammar).__name__}")
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, text.encode("utf-8"), root.encode("utf-8"))
    if not sampler:
        raise DeRaError(f"llama.cpp cannot parse the grammar (GBNF with a {root!r} rule): fix its syntax")
    llama_cpp.llama_sampler_free(sampler)


def _check_logprobs(kwargs: Mapping[str, Any], n_vocab: int, logits_all: bool) -> None:
    logprobs = kwargs.get("logprobs")
    if logprobs is None or logprobs is False:
        return  # top_logprobs alone is ignored, as in llama-cpp-python
    for name in ("logprobs", "top_logprobs"):
        value = kwargs.get(name)
        if value is None or isinstance(value, bool):
            continue
        if not 0 <= _integer(name, value) <= n_vocab:
            raise DeRaError(f"{name} must lie in [0, {n_vocab}], got {value!r}")
    if not logits_all:
        raise DeRaError("logprobs need the logits of every position: create the DeRaLlama with logits_all=True")


# ---------------------------------------------------------- DeRaLlama's arguments

# Llama arguments that would break the lockstep or make no sense for a pair.
_REFUSED_KWARGS = {
    "model_path": "give the models as reference_model_path and aligned_model_path",
    "embedding": "DeRa blends next-token logits; use a plain llama_cpp.Llama for embeddings",
    "lora_path": "pass the LoRA adapter GGUF as an aligned model: it is applied on the reference",
    "lora_base": "pass the LoRA adapter GGUF as an aligned model: it is applied on the reference",
}
# Every keyword llama_cpp.Llama names; Llama itself swallows unknown ones (**kwargs) without a word.
_LLAMA_KWARGS = [
    n for n, p in inspect.signature(Llama.__init__).parameters.items() if n != "self" and p.kind is not p.VAR_KEYWORD
]


def check_llama_kwargs(kwargs: Mapping[str, Any], own: Sequence[str]) -> None:
    """Refuse keywords that would break the pair, and any that ``llama_cpp.Llama`` does not name
    (``own``: DeRaLlama's own keywords, suggested for a misspelt one)."""
    for name, why in _REFUSED_KWARGS.items():
        if name in kwargs and kwargs[name] not in (None, False):
            raise DeRaError(f"DeRaLlama does not take {name}=: {why}")
    for name in kwargs:
        if name not in _LLAMA_KWARGS:
            raise DeRaError(
                f"DeRaLlama got an unknown keyword argument {name}={kwargs[name]!r}"
                f"{_closest(name, _LLAMA_KWARGS + list(own))}"
            )


def bind(method: Callable, *args: Any, **kwargs: Any) -> dict:
    """The arguments of a call to ``method`` by name; an unknown keyword is refused by name."""
    signature = inspect.signature(method)
    try:
        return signature.bind(*args, **kwargs).arguments
    except TypeError as e:
        unknown = [k for k in kwargs if k not in signature.parameters]
        names = [n for n in signature.parameters if n != "self"] + ["lam"]
        hint = _closest(unknown[0], names) if unknown else ""
        raise DeRaError(f"{method.__name__}: {e}{hint}") from None


def _closest(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1)
    return f" (did you mean {close[0]}=?)" if close else ""


def check_prompt(prompt: Any, n_vocab: int, n_ctx: int, tokenize: Callable[..., List[int]]) -> None:
    """A completion's prompt: text, or token ids in the vocabulary, shorter than the context."""
    if isinstance(prompt, str):
        n = len(tokenize(prompt.encode("utf-8"), add_bos=True, special=True))
    elif isinstance(prompt, list) and all(isinstance(t, (int, np.integer)) for t in prompt):
        n = len(prompt)
        if any(not 0 <= t < n_vocab for t in prompt):
            raise DeRaError(f"prompt token ids must lie in [0, {n_vocab})")
    else:
        raise DeRaError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    if n >= n_ctx:
        raise ContextFullError(
            f"the prompt is {n} tokens but the context holds {n_ctx} (n_ctx): "
            "shorten the prompt or create the DeRaLlama with a larger n_ctx"
        )


def check_chat_template(template: Any, llama_kwargs: Mapping[str, Any]) -> None:
    """A chat template is Jinja text, and only one way of formatting chats is named."""
    if template is None:
        return
    if not isinstance(template, str) or not template.strip():
        raise DeRaError(f"chat_template must be the text of a Jinja chat template, got {template!r}")
    if llama_kwargs.get("chat_format") or llama_kwargs.get("chat_handler"):
        raise DeRaError("give one of chat_template, chat_format and chat_handler, not several")
