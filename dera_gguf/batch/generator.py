"""One step for every running sequence: decode one batch per model, then blend, bias, sample, emit.

A step appends to each running sequence what it needs next: a chunk of its prompt (joining
beside the others, ``chunk`` tokens at most per step in all), or its last token and the draft
after it. Each sequence's rows are blended at its own weights, their log-probs kept if asked
(before the bias, as llama-cpp-python's), biased, and sampled by its own chain, row after row
while the chain picks the drafted token; drafted positions it did not pick are dropped from
the KV cache. A sequence that finished (end of text, its stop rule, its budget, or its caller
set ``finish`` between steps) leaves. What each sequence holds is read from llama.cpp.

Several choices of one request and dera-eval's sweeps start their sequences together on one
shared prompt (:meth:`BatchGenerator.start_shared`); dera-serve's slots let them join and
leave between steps (:mod:`dera_gguf.batch.slots`).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional
from typing import Sequence as Tokens

import numpy as np

from ..blend import add_bias, blend_logits, kl_divergence, log_softmax
from ..runtime.pair import PairRuntime
from ..sampling.chains import RowSampler
from .runs import Run, batch_of, prefill, rows_by_seq
from .sequence import Scored, Sequence


class BatchGenerator:
    """The running sequences of ``runtime``'s contexts, by slot, stepped together.

    Args:
        runtime: the pair's contexts for several sequences (one per slot).
        is_eog: whether a token ends the text.
        chunk: the most prompt tokens decoded in one step beside the drawing sequences.
    """

    def __init__(self, runtime: PairRuntime, is_eog: Callable[[int], bool], chunk: Optional[int] = None):
        self.runtime, self.is_eog = runtime, is_eog
        self.chunk = chunk or runtime.n_batch
        self.running: Dict[int, Sequence] = {}
        self.ready: Dict[int, Dict[int, np.ndarray]] = {}  # rows to draw from without a decode (a shared prompt)
        self.sampler = RowSampler(runtime.n_vocab)

    # ------------------------------------------------------------ joining

    def join(self, seq: Sequence, slot: int, keep: int) -> None:
        """Run ``seq`` in ``slot``, whose KV cache holds the first ``keep`` tokens of its prompt."""
        seq.slot, seq.reused, seq.pending = slot, keep, [int(t) for t in seq.prompt[keep:]]
        self.running[slot] = seq

    def start_shared(self, prompt: Tokens[int], seqs: List[Sequence]) -> None:
        """Run ``seqs`` in slots 0, 1, ... of emptied contexts, on ``prompt`` decoded once (in the models
        any of them decodes) and shared; each draws its first token at the next step."""
        models = sorted(set().union(*(s.models() for s in seqs)))
        first = prefill(self.runtime, prompt, len(seqs), models)
        for slot, seq in enumerate(seqs):
            seq.prompt, seq.slot, seq.pending = list(prompt), slot, []
            self.running[slot] = seq
            self.ready[slot] = {m: first[m][None] for m in seq.models()}

    def leave(self, slot: int) -> Sequence:
        """Stop running the sequence in ``slot`` (its KV cells stay) and return it."""
        self.ready.pop(slot, None)
        return self.running.pop(slot)

    # ------------------------------------------------------------- a step

    def step(self) -> List[Sequence]:
        """Decode one batch per model and draw; returns the sequences that drew (or finished), in slot order.
        Sequences finished by then leave the generator."""
        for slot in [s for s, seq in self.running.items() if seq.finish is not None]:
            self.leave(slot)
        runs, drafts = self._runs()
        rows = self.runtime.decode_each([batch_of(model_runs) for model_runs in runs])
        drawn = {**rows_by_seq(runs, rows), **self.ready}
        self.ready = {}
        moved = []
        for slot in sorted(drawn):
            seq = self.running[slot]
            self._draw(seq, drawn[slot], drafts.get(slot, ()))
            moved.append(seq)
            if seq.finish is not None:
                self.leave(slot)
        return moved

    def _runs(self) -> tuple:
        """Each model's runs of this step, in ascending slot order (llama.cpp keeps such a batch whole),
        and each drawing sequence's draft."""
        runs: List[List[Run]] = [[] for _ in self.runtime.contexts]
        drafts: Dict[int, np.ndarray] = {}
        drawing = [s for s, q in self.running.items() if not q.pending and s not in self.ready]
        budget = max(self.chunk - len(drawing), 1)
        room = self.runtime.n_batch - len(drawing)
        for slot, seq in sorted(self.running.items()):
            if slot in self.ready:
                continue
            models = seq.models()
            start = self.runtime.contexts[models[0]].extent(slot)
            if seq.pending:
                tokens = seq.pending[:budget]
                del seq.pending[: len(tokens)]
                budget -= len(tokens)
                run = Run(slot, start, tokens, int(not seq.pending)) if tokens else None
            else:
                draft = self._draft(seq, room)
                room -= len(draft)
                drafts[slot] = draft
                run = Run(slot, start, [seq.tokens[-1], *draft], 1 + len(draft))
            for m in models if run is not None else ():
                runs[m].append(run)
        return runs, drafts

    @staticmethod
    def _draft(seq: Sequence, room: int) -> np.ndarray:
        if seq.drafts is None:
            return np.zeros(0, dtype=np.intc)
        return seq.drafts.propose(len(seq.prompt) + len(seq.tokens), room, seq.max_tokens - len(seq.tokens) - 1)

    def _draw(self, seq: Sequence, by_model: Dict[int, np.ndarray], draft: Tokens[int]) -> None:
        """Sample ``seq``'s next tokens from its rows: the row after its last token, then the row after each
        drafted token its chain picked; drop the drafted positions it did not pick."""
        before = len(seq.tokens)
        passed = 0
        for j in range(len(next(iter(by_model.values())))):
            token = self._sample(seq, {m: rows[j] for m, rows in by_model.items()})
            picked = j < len(draft) and token == draft[j]
            passed += int(picked)
            if seq.finish is not None or not picked:
                break
        if seq.drafts is not None:
            seq.drafts.settle(len(seq.prompt) + len(seq.tokens), len(draft), passed, seq.tokens[before:])
        if passed < len(draft) and seq.finish is None:
            self.runtime.drop_from(seq.slot, seq.position)

    def _sample(self, seq: Sequence, rows: Dict[int, np.ndarray]) -> int:
        """One token of ``seq`` from one row per model: blend, log-probs, KL, bias, the chain, emit."""
        weighed = [m for m in rows if seq.weights[m] != 0.0]
        row = blend_logits([rows[m] for m in weighed], [seq.weights[m] for m in weighed])
        scores = log_softmax(row) if seq.logprobs is not None else None
        if seq.kl is not None:
            seq.kl.append(float(kl_divergence(row, rows[0])))
        add_bias(row, seq.bias)
        token = self.sampler.sample(seq.chain, row)
        emit(seq, token, self.is_eog, scores)
        return token


def emit(seq: Sequence, token: int, is_eog: Callable[[int], bool], scores: Optional[np.ndarray]) -> None:
    """Append a drawn token (an end-of-text token ends the sequence instead), with its log-probs if kept;
    then its budget and stop rule."""
    if is_eog(token):
        seq.finish = "stop"
        return
    seq.tokens.append(token)
    if scores is not None:
        top = np.argsort(-scores, kind="stable")[: seq.logprobs]
        seq.scored.append(Scored(float(scores[token]), [(int(t), float(scores[t])) for t in top]))
    if seq.stop is not None and seq.stop(seq):
        seq.finish = "stop"
    elif len(seq.tokens) >= seq.max_tokens:
        seq.finish = "length"
