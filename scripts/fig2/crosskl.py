"""How close each approximation is to the retrained model, token by token, on one ruler.

Along every response sampled from the model retrained at beta / lam, each position's
next-token distribution of that model (``R``) is compared with

- DeRa at lam: ``softmax((1 - lam) h_ref + lam h_aligned)``, the beta = 0.1 pair blended;
- weight-space at lam: the beta = 0.1 adapter applied at scale lam;
- two yardsticks: the beta = 0.1 model unchanged (no realignment at all), and the reference.

Each is ``KL(R || method)`` per position, averaged over the response's positions (those
that predict a response token, and the end token when the model stopped itself: the
positions ``dera-eval generate`` averages its KL to the reference over), then over
responses. The reverse ``KL(method || R)`` is kept too. All the math is dera_gguf.blend's.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
from fig2.pairs import AdapterPair

from dera_gguf.blend import blend_logits, kl_divergence, mixing_weights
from dera_gguf.eval.batch import ParallelSequences
from dera_gguf.eval.store import ResultStore, check_run_settings

RECORDS_FILE = "records.jsonl"
KEY_FIELDS = ("row", "lam", "sample")
# record field -> (p, q) of KL(p || q); the names of the rows returned by position_logits
KL_FIELDS = {
    "kl_retrained_vs_dera": ("retrained", "dera"),
    "kl_retrained_vs_weights": ("retrained", "weights"),
    "kl_retrained_vs_aligned": ("retrained", "aligned"),
    "kl_retrained_vs_reference": ("retrained", "reference"),
    "kl_dera_vs_retrained": ("dera", "retrained"),
    "kl_weights_vs_retrained": ("weights", "retrained"),
}


def scoring_pair(reference: str, adapter: str, retrained: str, lam: float, **kwargs) -> AdapterPair:
    """Contexts: the reference, the beta = 0.1 adapter, the retrained adapter, the adapter at scale lam."""
    return AdapterPair(reference, [(adapter, 1.0), (retrained, 1.0), (adapter, lam)], **kwargs)


def scored_tokens(pair, record: Dict[str, Any]) -> tuple[List[int], int]:
    """Prompt + response tokens, and the index of the first row to keep.

    ``rows_after(tokens, first)`` returns the rows of positions first..len-2; a response
    that ended with the end token gets one token appended (any: its own row is not
    computed) so that the row predicting the end is included.
    """
    prompt = pair.tokenize(record["prompt"])
    tokens = prompt + list(record["tokens"])
    if record["finish_reason"] == "stop":
        tokens.append(pair.aligned_model.token_eos())
    return tokens, len(prompt) - 1


def position_logits(decoder: ParallelSequences, pair, record: Dict[str, Any], lam: float) -> Dict[str, np.ndarray]:
    """Every model's logits at the response's positions, each (n_positions, n_vocab)."""
    tokens, first = scored_tokens(pair, record)
    h_ref, h_aligned, h_retrained, h_weights = decoder.rows_after(np.array(tokens), first)
    return {
        "reference": h_ref,
        "aligned": h_aligned,
        "retrained": h_retrained,
        "weights": h_weights,
        "dera": blend_logits([h_ref, h_aligned], mixing_weights(lam)),
    }


def cross_kl(logits: Dict[str, np.ndarray]) -> Dict[str, float]:
    """Mean per-position KL for every field of KL_FIELDS."""
    return {name: float(np.mean(kl_divergence(logits[p], logits[q]))) for name, (p, q) in KL_FIELDS.items()}


def score_record(decoder: ParallelSequences, pair, record: Dict[str, Any], lam: float) -> Dict[str, Any]:
    """The cross-KL record of one retrained sample."""
    logits = position_logits(decoder, pair, record, lam)
    return {
        "row": record["row"],
        "lam": float(lam),
        "sample": record["sample"],
        "positions": int(logits["reference"].shape[0]),
        **cross_kl(logits),
    }


def score_lam(
    make_pair: Callable[[], AdapterPair],
    samples: Sequence[Dict[str, Any]],
    lam: float,
    store: Optional[ResultStore],
    tick: Callable[[int], None] = lambda n: None,
) -> List[Dict[str, Any]]:
    """Cross-KL records of the retrained model's ``samples`` at ``lam``; those in ``store`` are kept.

    Records are written to ``store`` prompt by prompt, so an interrupted run resumes.
    """
    done = [] if store is None else [store.records[k] for k in _keys(samples, lam) if k in store.records]
    todo = [s for s in samples if store is None or not store.has(s["row"], float(lam), s["sample"])]
    tick(len(samples) - len(todo))
    if not todo:
        return done
    out = list(done)
    with make_pair() as pair, ParallelSequences(pair, n_seq=1) as decoder:
        for group in _by_row(todo):
            records = [score_record(decoder, pair, s, lam) for s in group]
            if store is not None:
                store.append(records)
            out.extend(records)
            tick(len(group))
    return out


def open_store(out_dir: str, settings: Dict[str, Any]) -> ResultStore:
    """The resumable record file under ``out_dir`` (refused if it holds another run's results)."""
    os.makedirs(out_dir, exist_ok=True)
    check_run_settings(out_dir, settings)
    return ResultStore(os.path.join(out_dir, RECORDS_FILE), KEY_FIELDS)


def _keys(samples, lam):
    return [(s["row"], float(lam), s["sample"]) for s in samples]


def _by_row(samples: Sequence[Dict[str, Any]]) -> List[List[Dict[str, Any]]]:
    """Samples grouped by prompt, in order (one store write per prompt)."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for s in samples:
        groups.setdefault(s["row"], []).append(s)
    return list(groups.values())
