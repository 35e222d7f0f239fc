"""dera-gguf: decoding-time realignment (DeRa) of GGUF language models on llama.cpp.

from dera_gguf import DeRaLlama
llm = DeRaLlama("sft.Q4_K_M.gguf", "dpo.Q4_K_M.gguf", lam=1.5)
llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], lam=0.5)
"""

from .blend import blend_logits, kl_divergence, log_softmax, mixing_weights, normalize_lam, sweep_stats
from .errors import ContextFullError, DecodeError, DeRaError, Stopped
from .llama import DeRaLlama
from .pairs.pull import pull

__all__ = [
    "DeRaLlama",
    "pull",
    "DeRaError",
    "ContextFullError",
    "DecodeError",
    "Stopped",
    "blend_logits",
    "kl_divergence",
    "log_softmax",
    "mixing_weights",
    "normalize_lam",
    "sweep_stats",
]
__version__ = "0.1.0"
