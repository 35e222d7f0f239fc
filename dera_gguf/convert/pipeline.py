"""One conversion, start to finish: checks first, then an unquantized GGUF, then quantization.

Every check that can fail (architecture, weights format, headers, tokenizer,
output folder, free disk) runs before the first byte is written, so bad input
costs seconds and leaves nothing behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import DeRaError
from .checkpoints import resolve_source
from .hparams import HParams, read_hparams
from .quantize import estimated_size, normalize_quant, quantize_gguf
from .safetensors_reader import TensorEntry, has_only_pickle_weights, list_tensors
from .tensors import PlannedTensor, plan_tensors
from .vocab import TokenizerData, load_tokenizer
from .writer import (
    atomic_output,
    check_free_disk,
    check_writable_folder,
    temp_path_for,
    write_unquantized_gguf,
)

_MARGIN = 64 * 1024**2  # header, tokenizer and filesystem slack


@dataclass
class Conversion:
    """A checked checkpoint, ready to write: hyperparameters, tensor headers, tokenizer."""

    folder: Path
    name: str
    hp: HParams
    entries: dict[str, TensorEntry]
    tok: TokenizerData

    def plan(self, quant: str) -> list[PlannedTensor]:
        """F16 output converts; for quantization bf16 stays bf16 (exact input for llama.cpp)."""
        return plan_tensors(self.entries, self.hp, keep_bf16=quant != "F16")

    @property
    def n_params(self) -> int:
        return sum(p.source.n_elements for p in self.plan("F16"))

    def disk_needed(self, quant: str) -> int:
        """Bytes the output folder must have free: the unquantized file, plus the quantized one."""
        unquantized = sum(p.nbytes for p in self.plan(quant)) + _MARGIN
        return unquantized if quant == "F16" else unquantized + estimated_size(self.n_params, quant) + _MARGIN


def prepare(folder: Path, name: str | None = None) -> Conversion:
    """Read and check a local checkpoint folder without writing anything."""
    folder = Path(folder)
    hp = read_hparams(folder)
    if has_only_pickle_weights(folder):
        raise DeRaError(
            f"{folder} holds only PyTorch .bin weights; dera-convert reads safetensors only "
            "(re-save the model with save_pretrained(safe_serialization=True))"
        )
    entries = list_tensors(folder)
    plan_tensors(entries, hp)  # checks names, completeness and shapes before the tokenizer
    tok = load_tokenizer(folder, hp)
    return Conversion(folder, name or folder.name, hp, entries, tok)


def write(conv: Conversion, out: Path, quant: str) -> Path:
    """Write the GGUF at ``out`` atomically; the unquantized intermediate is a hidden temp file."""
    check_free_disk(out.parent, conv.disk_needed(quant))
    with atomic_output(out) as tmp:
        if quant == "F16":
            write_unquantized_gguf(tmp, conv.hp, conv.tok, conv.plan(quant), conv.name)
        else:
            source = temp_path_for(out.with_name(out.name + ".unquantized"))
            try:
                write_unquantized_gguf(source, conv.hp, conv.tok, conv.plan(quant), conv.name)
                quantize_gguf(source, tmp, quant)
            finally:
                source.unlink(missing_ok=True)
    return out


def check_output_path(out: str | os.PathLike[str]) -> Path:
    """The output must be a .gguf path in an existing, writable folder."""
    out = Path(out).expanduser()
    if out.suffix != ".gguf":
        raise DeRaError(f"output {out} must end in .gguf")
    if out.is_dir():
        raise DeRaError(f"output {out} is a folder; give a file name ending in .gguf")
    check_writable_folder(out.parent.resolve())
    return out


def convert_checkpoint(src: str | os.PathLike[str], out: str | os.PathLike[str], quant: str = "Q4_K_M") -> Path:
    """Convert a local checkpoint folder or hub repo id to a (quantized) GGUF at ``out``."""
    quant = normalize_quant(quant)
    out_path = check_output_path(out)  # before any download
    folder = resolve_source(src)
    name = str(src) if not Path(src).exists() else folder.name
    return write(prepare(folder, name), out_path, quant)
