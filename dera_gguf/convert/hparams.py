"""Read a Llama / Mistral ``config.json`` into the few numbers llama.cpp needs.

Only ``LlamaForCausalLM`` and ``MistralForCausalLM`` are accepted: both map to
llama.cpp's ``llama`` architecture. Anything else is refused up front, before
any tensor is read, because a silently wrong conversion gives garbage logits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DeRaError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


@dataclass(frozen=True)
class HParams:
    """Model shape and rope settings, named after the GGUF keys they fill."""

    architecture: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx_train: int
    rms_eps: float
    rope_theta: float
    rope_linear_factor: float | None
    tie_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | None


def load_config(folder: Path) -> dict:
    """Load config.json, with a clear error when it is missing or not JSON."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise DeRaError(f"{folder}: no config.json; SRC must be a Hugging Face checkpoint folder or repo id")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DeRaError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise DeRaError(f"{path}: expected a JSON object")
    return config


def _architecture(config: dict, path: Path) -> str:
    """The single supported architecture named in the config, or a DeRaError."""
    archs = config.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and len(archs) == 1 else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise DeRaError(
            f"{path}: unsupported architecture {archs or config.get('model_type')!r}; "
            f"dera-convert handles {', '.join(SUPPORTED_ARCHITECTURES)} only "
            "(for other models use llama.cpp's convert_hf_to_gguf.py)"
        )
    return arch


def _rope(config: dict, path: Path) -> tuple[float, float | None]:
    """rope theta and linear scaling factor; transformers 5 nests them in rope_parameters."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type == "linear":
        return float(theta), float(params["factor"])
    raise DeRaError(f"{path}: rope scaling type {rope_type!r} is not supported by dera-convert")


def _token_id(value: object) -> int | None:
    """A single token id; configs sometimes hold a list (first wins) or null."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) else None


def read_hparams(folder: Path) -> HParams:
    """Check the architecture and collect the hyperparameters of a checkpoint folder."""
    path = Path(folder) / "config.json"
    config = load_config(folder)
    arch = _architecture(config, path)
    try:
        n_embd = int(config["hidden_size"])
        n_head = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or n_embd // n_head)
        theta, linear = _rope(config, path)
        return HParams(
            architecture=arch,
            n_vocab=int(config["vocab_size"]),
            n_embd=n_embd,
            n_layer=int(config["num_hidden_layers"]),
            n_ff=int(config["intermediate_size"]),
            n_head=n_head,
            n_head_kv=int(config.get("num_key_value_heads") or n_head),
            head_dim=head_dim,
            n_ctx_train=int(config.get("max_position_embeddings", 4096)),
            rms_eps=float(config.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_linear_factor=linear,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            bos_token_id=_token_id(config.get("bos_token_id")),
            eos_token_id=_token_id(config.get("eos_token_id")),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise DeRaError(f"{path}: missing or invalid field {e}; is this a complete {arch} config?") from e
