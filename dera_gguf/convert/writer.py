"""Write GGUF files safely: disk check first, temp name, fsync, then rename.

A partial file never carries the final name: everything is written to a hidden
``.NAME.<pid>.partial`` file in the destination folder (same filesystem, so the
final ``os.replace`` is atomic) and removed on any error or Ctrl-C. Tensors go
through gguf-py's ``GGUFWriter`` one at a time: the header and tensor index are
written from the safetensors headers alone, then each tensor's data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np

from ..errors import DeRaError
from ..pairs.downloads import format_size
from .hparams import HParams
from .tensors import PlannedTensor, iter_tensors
from .vocab import TokenizerData


def check_writable_folder(folder: Path) -> None:
    """Refuse early when the output folder is missing or cannot take new files."""
    if not folder.is_dir():
        raise DeRaError(f"output folder {folder} does not exist or is not a folder; create it first")
    probe = folder / f".dera-write-test.{os.getpid()}"
    try:
        with open(probe, "wb"):
            pass
    except OSError as e:
        raise DeRaError(
            f"output folder {folder} is not writable ({e.strerror or e}); choose another output path"
        ) from e
    probe.unlink(missing_ok=True)


def check_free_disk(folder: Path, need_bytes: int) -> None:
    """Refuse before writing anything when the folder's filesystem lacks room."""
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise DeRaError(
            f"not enough free disk space in {folder}: the conversion needs about {format_size(need_bytes)} "
            f"but only {format_size(free)} is free; free some space or write the output elsewhere"
        )


def temp_path_for(final: Path) -> Path:
    """Hidden sibling name that no later step could take for a finished model."""
    return final.with_name(f".{final.name}.{os.getpid()}.partial")


def fsync_file(path: Path) -> None:
    """Flush a written file (and its folder entry) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable; not every filesystem lets a folder be opened, so best effort."""
    with contextlib.suppress(OSError):
        fsync_file(folder)


@contextlib.contextmanager
def atomic_output(final: Path) -> Iterator[Path]:
    """Yield a temp path; on success fsync it and rename it to ``final``, else delete it."""
    final = Path(final)
    tmp = temp_path_for(final)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, final)
        _fsync_folder(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _file_type(plan: list[PlannedTensor]) -> gguf.LlamaFileType:
    """MOSTLY_BF16 when matrices stayed bf16, else MOSTLY_F16."""
    bf16 = any(p.out_type == gguf.GGMLQuantizationType.BF16 for p in plan)
    return gguf.LlamaFileType.MOSTLY_BF16 if bf16 else gguf.LlamaFileType.MOSTLY_F16


def _add_hparams(writer: gguf.GGUFWriter, hp: HParams, name: str, file_type: gguf.LlamaFileType) -> None:
    """The ``general.*`` and ``llama.*`` keys llama.cpp needs to build the graph."""
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_vocab_size(hp.n_vocab)
    writer.add_context_length(hp.n_ctx_train)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim * hp.n_head != hp.n_embd:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_rope_freq_base(hp.rope_theta)
    if hp.rope_linear_factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(hp.rope_linear_factor)


def write_unquantized_gguf(path: Path, hp: HParams, tok: TokenizerData, plan: list[PlannedTensor], name: str) -> None:
    """Stream the planned tensors into an F16 (or BF16) GGUF file at ``path``; norms stay F32."""
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        _add_hparams(writer, hp, name, _file_type(plan))
        tok.add_to_writer(writer)
        for p in plan:
            writer.add_tensor_info(p.gguf_name, p.source.shape, p.np_dtype, p.nbytes, raw_dtype=p.out_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, data in iter_tensors(plan):
            writer.write_tensor_data(np.ascontiguousarray(data))
            del data
    finally:
        writer.close()
