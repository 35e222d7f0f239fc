"""Check that two GGUF files can be blended token by token (a valid DeRa pair).

DeRa mixes the two models' logits position by position, so both must map the
same ids to the same token strings and types, agree on BOS/EOS, and format
chats the same way. This reads only GGUF headers (memory-mapped), never weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import gguf

from ..errors import DeRaError

if TYPE_CHECKING:
    from ..pairs.registry import Pair

_SCALAR_KEYS = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template")
_ARRAY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type")


def _field(reader: gguf.GGUFReader, key: str):
    """A header value (list for arrays), or None when the key is absent."""
    f = reader.get_field(key)
    return None if f is None else f.contents()


def read_pair_fields(path: Path) -> dict[str, object]:
    """The header fields a DeRa pair must share."""
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as e:
        raise DeRaError(f"{path}: not a readable GGUF file ({e})") from e
    return {key: _field(reader, key) for key in _SCALAR_KEYS + _ARRAY_KEYS}


def _first_difference(a: list, b: list) -> str:
    """Describe where two token lists part ways."""
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} entries"
    i = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
    return f"first difference at id {i}: {a[i]!r} vs {b[i]!r}"


def check_pair(reference: Path, aligned: Path) -> None:
    """Raise DeRaError naming the first mismatch between a reference and an aligned GGUF."""
    ref, ali = read_pair_fields(reference), read_pair_fields(aligned)
    for key in _ARRAY_KEYS + _SCALAR_KEYS:
        if ref[key] != ali[key]:
            detail = (
                _first_difference(ref[key], ali[key])
                if key in _ARRAY_KEYS and ref[key] and ali[key]
                else (f"{ref[key]!r:.80} vs {ali[key]!r:.80}")
            )
            raise DeRaError(
                f"{reference} and {aligned} are not a valid DeRa pair: {key} differs ({detail}); "
                "both models must come from the same tokenizer and chat template"
            )


# ------------------------------------------------- dera-convert --pair


def converted_name(pair_name: str, quant: str) -> str:
    """The name a converted pair is registered under: ``zephyr-7b-q5_k_m``."""
    return f"{pair_name}-{quant.lower()}"


def output_path(repo_id: str, quant: str) -> Path:
    """``$DERA_HOME/zephyr-7b-beta.Q5_K_M.gguf`` and the like."""
    from ..pairs.home import model_home

    return model_home() / f"{repo_id.split('/')[-1]}.{quant}.gguf"


def checkpoints(pair: "Pair") -> list[str]:
    """The Hugging Face checkpoints the pair's files were made from (reference first)."""
    repos = [s.spec.get("checkpoint") for s in pair.sources()]
    if not all(repos):
        raise DeRaError(
            f"pair {pair.name!r} names no Hugging Face checkpoint for each of its models (models.toml's "
            f"checkpoint = ...), so dera-convert cannot make it; its ready files come with: dera-pull {pair.name}"
        )
    return repos


def show_plan(pair: "Pair", quant: str, say) -> None:
    """What ``dera-convert --pair`` would download and the disk each step needs; writes nothing."""
    from huggingface_hub import constants

    from ..pairs.downloads import format_size, free_bytes
    from .checkpoints import plan_download
    from .quantize import estimated_size

    download, weights_sizes, finals = 0, [], 0
    for repo_id in checkpoints(pair):
        files = plan_download(repo_id)
        say(f"{repo_id}:")
        for f in files:
            say(f"  {f.filename:45s} {format_size(f.size):>10s}  {'cached' if f.cached else 'to download'}")
        download += sum(f.size for f in files if not f.cached)
        weights = sum(f.size for f in files if f.filename.endswith(".safetensors"))
        size = estimated_size(weights // 2, quant)  # bf16 checkpoints: 2 bytes a weight
        weights_sizes.append(weights)
        finals += size
        say(f"  -> {output_path(repo_id, quant)} (about {format_size(size)})")
    peak = finals if quant == "F16" else finals + max(weights_sizes)  # one unquantized file at a time
    cache = Path(constants.HF_HUB_CACHE)
    out = output_path("x/x", quant).parent
    say(f"download: {format_size(download)} into {cache} ({format_size(free_bytes(cache))} free)")
    say(f"conversion: about {format_size(peak)} at peak in {out} ({format_size(free_bytes(out))} free)")


def convert_pair(pair: "Pair", quant: str, force: bool, say) -> str:
    """Convert both checkpoints of ``pair`` into the user model folder, check them, register the pair.

    Returns the name it is registered under in ``$DERA_HOME/models.toml``. A GGUF that a
    former run finished is kept (``force``: convert again).
    """
    from ..pairs.entries import path_source, toml_value, write_pair_entry
    from ..pairs.home import user_models_toml
    from .checkpoints import download_checkpoint
    from .pipeline import check_output_path, prepare, write

    paths = []
    for repo_id in checkpoints(pair):
        out = output_path(repo_id, quant)
        out.parent.mkdir(parents=True, exist_ok=True)
        check_output_path(out)
        if out.is_file() and not force:
            say(f"{out} exists, keeping it (use --force to convert again)")
        else:
            say(f"fetching {repo_id}")
            folder = download_checkpoint(repo_id)
            say(f"converting {repo_id} -> {out} ({quant})")
            write(prepare(folder, repo_id), out, quant)
        paths.append(out)
    check_pair(paths[0], paths[1])
    name = converted_name(pair.name, quant)
    toml = user_models_toml()
    values = {
        "description": toml_value(f"{pair.description} (converted to {quant} by dera-convert)"),
        "reference": path_source(paths[0], toml),
        "aligned": "[" + ", ".join(path_source(p, toml) for p in paths[1:]) + "]",
    }
    for key in ("beta", "dpo", "license", "chat_format", "chat_template"):
        if getattr(pair, key) not in (None, ""):
            values[key] = toml_value(getattr(pair, key))
    if pair.draft is not None and pair.draft.kind == "repo":  # the drafter is the same hub file
        values["draft"] = "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in pair.draft.spec.items()) + " }"
    write_pair_entry(toml, name, values)
    return name
