"""Read (sharded) safetensors checkpoints one tensor at a time.

We parse the tiny safetensors header ourselves (8-byte length, then JSON) so
that the converter needs neither torch nor the whole file in memory, and so a
corrupt file fails with a message naming the file instead of a C-level crash.
Tensor data is read with a single ``readinto`` per tensor (or per chunk for the
bf16 -> float widening), so peak memory stays near the size of one tensor.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DeRaError

# Source dtypes we accept, and their size in bytes.
DTYPE_SIZES = {"BF16": 2, "F16": 2, "F32": 4}
_HEADER_LIMIT = 100 * 1024 * 1024  # a real header is a few hundred KB at most
_CHUNK_ELEMENTS = 16 * 1024 * 1024  # bf16 widening works in chunks of this many values


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, byte offset of its data, dtype and shape."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse one .safetensors file's header and check every entry fits the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise DeRaError(f"{path}: not a safetensors file (shorter than 8 bytes); re-download it")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_HEADER_LIMIT, size - 8):
                raise DeRaError(
                    f"{path}: corrupt safetensors header (claims {header_len} header bytes in a "
                    f"{size}-byte file); the download is probably truncated or damaged, re-download it"
                )
            header_bytes = f.read(header_len)
    except OSError as e:
        raise DeRaError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DeRaError(f"{path}: corrupt safetensors header ({e}); re-download the file") from e
    if not isinstance(header, dict):
        raise DeRaError(f"{path}: corrupt safetensors header (not a JSON object); re-download the file")
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, info, data_start, size)
    return entries


def _entry(path: Path, name: str, info: object, data_start: int, file_size: int) -> TensorEntry:
    """Validate one header entry and turn it into a TensorEntry."""
    try:
        dtype = info["dtype"]  # type: ignore[index]
        shape = tuple(int(d) for d in info["shape"])  # type: ignore[index]
        begin, end = (int(x) for x in info["data_offsets"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError) as e:
        raise DeRaError(f"{path}: corrupt safetensors header entry for {name!r}; re-download the file") from e
    if dtype not in DTYPE_SIZES:
        raise DeRaError(f"{path}: tensor {name!r} has dtype {dtype}; only BF16, F16 and F32 checkpoints are supported")
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if end - begin != n * DTYPE_SIZES[dtype] or begin < 0 or data_start + end > file_size:
        raise DeRaError(
            f"{path}: tensor {name!r} does not fit the file (offsets {begin}..{end}, shape {shape}); "
            "the file is truncated or corrupt, re-download it"
        )
    return TensorEntry(name, path, dtype, shape, data_start + begin, end - begin)


def list_tensors(folder: Path) -> dict[str, TensorEntry]:
    """All tensors of a checkpoint folder: sharded (with index) or a single file."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DeRaError(f"{index}: unreadable safetensors index ({e}); re-download it") from e
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        weight_map = None
    if not files:
        raise DeRaError(f"{folder}: no .safetensors files found")
    entries: dict[str, TensorEntry] = {}
    for fname in files:
        path = folder / fname
        if not path.is_file():
            raise DeRaError(f"{folder}: shard {fname} listed in the index is missing; re-download the checkpoint")
        entries.update(read_header(path))
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(entries))
        if missing:
            raise DeRaError(f"{folder}: tensors listed in the index are missing from the shards: {missing[:5]}")
    return entries


def read_raw(entry: TensorEntry, begin: int = 0, count: int | None = None) -> np.ndarray:
    """Read ``count`` raw elements of a tensor starting at element ``begin`` (no conversion)."""
    size = DTYPE_SIZES[entry.dtype]
    count = entry.n_elements - begin if count is None else count
    np_dtype = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}[entry.dtype]
    out = np.empty(count, dtype=np_dtype)
    with open(entry.path, "rb") as f:
        f.seek(entry.offset + begin * size)
        got = f.readinto(memoryview(out).cast("B"))
    if got != count * size:
        raise DeRaError(f"{entry.path}: tensor {entry.name!r} is truncated; re-download the file")
    return out


def read_tensor(entry: TensorEntry, out_dtype: type) -> np.ndarray:
    """Read a tensor as ``out_dtype`` (float16 or float32), widening bf16 chunk by chunk.

    Values beyond float16's range become inf without a warning; the caller checks.
    """
    with np.errstate(over="ignore"):
        if entry.dtype != "BF16":
            return read_raw(entry).astype(out_dtype, copy=False).reshape(entry.shape)
        out = np.empty(entry.n_elements, dtype=out_dtype)
        for begin in range(0, entry.n_elements, _CHUNK_ELEMENTS):
            raw = read_raw(entry, begin, min(_CHUNK_ELEMENTS, entry.n_elements - begin))
            out[begin : begin + raw.size] = (raw.astype(np.uint32) << 16).view(np.float32)
    return out.reshape(entry.shape)


def has_only_pickle_weights(folder: Path) -> bool:
    """True when a folder holds PyTorch .bin / .pt weights but no safetensors."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        return False
    return any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth"))


__all__ = ["TensorEntry", "read_header", "list_tensors", "read_raw", "read_tensor", "has_only_pickle_weights"]
