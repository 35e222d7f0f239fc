"""HF Llama/Mistral checkpoint -> GGUF, as glue over gguf-py and llama.cpp's quantizer."""

from .pipeline import Conversion, convert_checkpoint, prepare
from .quantize import DEFAULT_QUANT, QUANT_TYPES

__all__ = ["Conversion", "convert_checkpoint", "prepare", "DEFAULT_QUANT", "QUANT_TYPES"]
