"""The models of the Figure 2 comparison, and eval pairs that run LoRA adapters at a scale.

Three ways to reach KL strength beta / lam from the beta = 0.1 demo pair:

- DeRa: the reference and the beta = 0.1 adapter, logits blended at lam (plain EvalPair);
- retrained: the adapter trained with DPO at beta / lam, sampled as it is (its pair at lam 1);
- weight-space: the beta = 0.1 adapter applied at scale lam, one model (generate's mode="weights").

At lam = 1 all three are the beta = 0.1 model itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

from dera_gguf.errors import DeRaError
from dera_gguf.eval import EvalPair
from dera_gguf.pairs.registry import load_registry

BASE_PAIR = "smollm2-demo"
BASE_BETA = 0.1


def retrained_pair_name(lam: float) -> str:
    """models.toml pair of the model retrained at beta / lam (``smollm2-demo-beta0.2`` for lam 0.5)."""
    return BASE_PAIR if lam == 1 else f"{BASE_PAIR}-beta{BASE_BETA / lam:g}"


@dataclass(frozen=True)
class Models:
    """Paths: the reference GGUF, the beta = 0.1 adapter, and per lam the retrained adapter."""

    reference: str
    adapter: str
    retrained: Dict[float, str]


def find_models(lams: Sequence[float], models_toml: Optional[str] = None) -> Models:
    """Resolve every model from models.toml (a missing pair's error says how to get it)."""
    registry = load_registry(models_toml)
    reference, (adapter,) = registry.get(BASE_PAIR).resolve()
    retrained = {}
    for lam in lams:
        ref, (path,) = registry.get(retrained_pair_name(lam)).resolve()
        if ref != reference:
            raise DeRaError(f"pair {retrained_pair_name(lam)!r} has another reference model ({ref})")
        retrained[float(lam)] = path
    return Models(reference, adapter, retrained)


class AdapterPair(EvalPair):
    """An EvalPair whose contexts are the reference, then each LoRA adapter at its own scale.

    ``adapters`` is ``[(adapter_path, scale), ...]``, all for the reference model, whose
    weights are loaded once. ``ParallelSequences`` decodes the same tokens in every context,
    so one pass gives every model's logits along a text (the comparison's KL ruler).
    """

    def __init__(self, reference_model_path, adapters: Sequence[Tuple[str, float]], **kwargs):
        if not adapters:
            raise DeRaError("an AdapterPair needs at least one (adapter, scale)")
        super().__init__(reference_model_path, adapters[0][0], **kwargs)
        if not self.is_adapter:
            raise DeRaError(f"{adapters[0][0]} is not a LoRA adapter: weight-space scaling needs one")
        self.adapter_scales = [(str(path), float(scale)) for path, scale in adapters]

    def contexts(self, n_seq: int = 1, n_extra: int = 0, n_batch: int = 512):
        """The reference context, then one context per adapter, running it at its scale."""
        out = []
        for path, scale in self.adapter_scales:
            reference, context = super().contexts(n_seq, n_extra, n_batch)
            context.set_adapters(((self.models.adapter(path), scale),))
            out = out or [reference]  # the other calls' reference contexts stay unused
            out.append(context)
        return out
