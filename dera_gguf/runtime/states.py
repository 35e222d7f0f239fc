"""A saved state of a pair: every context's sequence, the tokens, and what it belongs to.

:class:`PairState` is a ``llama_cpp.LlamaState``, so llama-cpp-python's prompt caches
(``LlamaRAMCache``, ``LlamaDiskCache``) hold it, count its bytes and pickle it as they do
a plain Llama's. Each context's KV cells and positions come from llama.cpp's sequence
state API (:meth:`~dera_gguf.runtime.contexts.Context.save`); scores are kept only where
``logits_all`` keeps them, and only for the saved tokens. No KV cache depends on lam, so
a state saved at one lam serves every lam and mode.

A state records the pair it belongs to (a fingerprint of each model and adapter file)
and is refused, with the names of both pairs, by an engine on other files. On disk
(:func:`write_state_file`) a state is a zip of a JSON description and raw arrays:
reading one runs no code, unlike a pickle.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
from llama_cpp.llama import LlamaState
from llama_cpp.llama_cache import LlamaRAMCache

from ..errors import DeRaError
from .contexts import SavedSequence

FORMAT = "dera-gguf state 1"
_EDGE = 1 << 20  # bytes read from each end of a file for its fingerprint


class PairState(LlamaState):
    """The state of every context of a pair, with the tokens (and scores) llama-cpp-python keeps."""

    def __init__(
        self,
        input_ids: np.ndarray,
        scores: np.ndarray,
        n_tokens: int,
        seed: int,
        sequences: Sequence[SavedSequence],
        owner: str,
        owner_name: str,
    ):
        sequences = tuple(sequences)
        size = sum(s.nbytes for s in sequences) + input_ids.nbytes + scores.nbytes
        super().__init__(
            input_ids=input_ids, scores=scores, n_tokens=n_tokens, llama_state=b"", llama_state_size=size, seed=seed
        )
        self.sequences = sequences
        self.owner = owner
        self.owner_name = owner_name
        self.scored = None  # the realignment the scores rows hold (logits_all), when known

    def check_owner(self, owner: str, owner_name: str, n_ctx: int) -> None:
        """Refuse a state of another pair, or one that does not fit this context."""
        if self.owner != owner:
            raise DeRaError(
                f"the state was saved by another pair ({self.owner_name}), not this one ({owner_name}): "
                "load it into an engine on the files that saved it"
            )
        if self.n_tokens > n_ctx:
            raise DeRaError(
                f"the state holds {self.n_tokens} tokens but this engine's context holds {n_ctx} (n_ctx): "
                "load it into an engine with a larger n_ctx"
            )


class SharedRAMCache(LlamaRAMCache):
    """llama-cpp-python's RAM prompt cache, safe to share between threads (an engine's calls and
    dera-serve's slots keep and look up states in the same one)."""

    def __init__(self, capacity_bytes: int = (2 << 30)):
        super().__init__(capacity_bytes)
        self.lock = threading.RLock()

    def __getitem__(self, key):
        with self.lock:
            return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        with self.lock:
            return super().__contains__(key)

    def __setitem__(self, key, value) -> None:
        with self.lock:
            super().__setitem__(key, value)


def file_fingerprint(path: str) -> str:
    """sha256 of a file's size and its first and last MiB: tells model files apart without reading GBs."""
    stat = os.stat(path)
    return _fingerprint(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _fingerprint(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(_EDGE))
        f.seek(max(size - _EDGE, 0))
        digest.update(f.read(_EDGE))
    return digest.hexdigest()


def pair_owner(reference: str, aligned: Sequence[str], is_adapter: Sequence[bool]) -> Tuple[str, str]:
    """``(fingerprint, name)`` of a pair: what its states belong to, and how errors name it."""
    parts = [f"ref:{file_fingerprint(reference)}"]
    parts += [f"{'adapter' if a else 'model'}:{file_fingerprint(p)}" for p, a in zip(aligned, is_adapter)]
    name = " + ".join(Path(p).name for p in (reference, *aligned))
    return hashlib.sha256("|".join(parts).encode()).hexdigest(), name


# ------------------------------------------------------------------ files


def write_state_file(path: os.PathLike, state: PairState, extra: Optional[dict] = None) -> None:
    """Write ``state`` (and ``extra``, JSON data such as a conversation) to ``path`` atomically."""
    path = Path(path)
    meta = {
        "format": FORMAT,
        "owner": state.owner,
        "owner_name": state.owner_name,
        "n_tokens": int(state.n_tokens),
        "seed": int(state.seed),
        "sequences": [{"adapter_scales": list(s.adapter_scales)} for s in state.sequences],
        "extra": extra or {},
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
            z.writestr("state.json", json.dumps(meta))
            z.writestr("input_ids.npy", _npy(state.input_ids))
            z.writestr("scores.npy", _npy(state.scores))
            for i, s in enumerate(state.sequences):
                z.writestr(f"seq{i}.tokens.npy", _npy(s.tokens))
                z.writestr(f"seq{i}.bin", s.data)
        os.replace(tmp, path)
    except OSError as e:
        raise DeRaError(f"cannot write {path} ({e.strerror or e}): check the folder and free disk") from None
    finally:
        tmp.unlink(missing_ok=True)


def read_state_file(path: os.PathLike) -> Tuple[PairState, dict]:
    """``(state, extra)`` from a file :func:`write_state_file` wrote; a DeRaError for anything else."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            meta = json.loads(z.read("state.json"))
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            sequences = [
                SavedSequence(_array(z, f"seq{i}.tokens.npy"), z.read(f"seq{i}.bin"), tuple(s["adapter_scales"]))
                for i, s in enumerate(meta["sequences"])
            ]
            state = PairState(
                _array(z, "input_ids.npy"),
                _array(z, "scores.npy"),
                int(meta["n_tokens"]),
                int(meta["seed"]),
                sequences,
                meta["owner"],
                meta["owner_name"],
            )
    except FileNotFoundError:
        raise DeRaError(f"{path} does not exist") from None
    except (OSError, zipfile.BadZipFile, KeyError, ValueError, TypeError) as e:
        raise DeRaError(f"{path} is not a dera-gguf state file, or it is damaged ({e})") from None
    return state, meta.get("extra", {})


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(array), allow_pickle=False)
    return out.getvalue()


def _array(z: zipfile.ZipFile, name: str) -> np.ndarray:
    return np.load(io.BytesIO(z.read(name)), allow_pickle=False)
