"""Quantize an F16 GGUF with llama.cpp's own quantizer (through llama-cpp-python).

Using ``llama_model_quantize`` rather than gguf-py's Python quantizers gives the
exact K-quant mixes (Q4_K_M's per-tensor choices, fallbacks for odd shapes) that
llama.cpp users expect, at C speed.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from ..errors import DeRaError

# name -> (llama_ftype value, approximate bits per weight for disk estimates)
QUANT_TYPES: dict[str, tuple[int, float]] = {
    "F16": (1, 16.0),
    "Q8_0": (7, 8.5),
    "Q5_K_M": (17, 5.7),
    "Q4_K_M": (15, 4.9),
    "Q4_0": (2, 4.5),  # CPUs with llama.cpp's repacked Q4_0 kernels (AVX2, ARM) batch it well
}
DEFAULT_QUANT = "Q4_K_M"


def normalize_quant(quant: str) -> str:
    """Upper-case a quant name and check it is one we offer."""
    name = quant.upper()
    if name not in QUANT_TYPES:
        raise DeRaError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANT_TYPES)}")
    return name


def estimated_size(n_params: int, quant: str) -> int:
    """Rough output size in bytes (weights only) for a quantization."""
    return int(n_params * QUANT_TYPES[normalize_quant(quant)][1] / 8)


def quantize_gguf(src: Path, dst: Path, quant: str, n_threads: int | None = None, requantize: bool = False) -> None:
    """Quantize ``src`` (F16 GGUF) into ``dst`` with llama.cpp; raise DeRaError on failure.

    ``requantize`` lets llama.cpp start from an already quantized file (lossy twice over:
    for benchmarks of kernel speed, not for models people use).
    """
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - llama-cpp-python is a main dependency
        raise DeRaError("quantizing needs llama-cpp-python; install it (pip install llama-cpp-python)") from e
    ftype = QUANT_TYPES[normalize_quant(quant)][0]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads or os.cpu_count() or 1
    params.allow_requantize = requantize
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not Path(dst).is_file():
        raise DeRaError(f"llama.cpp failed to quantize {src} to {quant} (code {rc}); see the log above")
