"""lm-evaluation-harness models for a pair: every λ of a sweep from one decode per model.

:class:`SweepModels` holds a pair and the λ of a sweep; :meth:`SweepModels.at` is the pair at
one of them as an lm-eval ``LM`` (:class:`LamLM`, a ``TemplateLM``), for ``lm_eval.simple_evaluate``:

    sweep = SweepModels(EvalPair("sft.gguf", "dpo.gguf"), lams=[0, 0.5, 1, 1.5])
    results = [lm_eval.simple_evaluate(model=sweep.at(i), tasks=["arc_easy"]) for i in range(4)]

lm-eval asks each λ's model for the same requests. The first time a request is seen, it is
answered for every λ at once and kept: a log-likelihood request (and each window of a rolling
one) decodes its tokens once per model and blends the rows at every λ
(:func:`~dera_gguf.blend.sweep_stats`, the trick dera-eval score uses); a generation request
decodes every λ's sequence in one batch per model (:func:`~dera_gguf.batch.together.decode_together`).
So a sweep costs about one λ's decoding, whatever the number of λ. lm-eval's own request
grouping, few-shot building, caching (``use_cache``) and metrics are used as they are.

Tokens: the pair's tokenizer (the aligned model's vocabulary, which the reference shares). A
context starts with BOS where the GGUF says its model adds one (as llama.cpp and lm-eval's gguf
client against llama-cpp-python's server do); an empty context, and a rolling text's windows,
start from the model's BOS (else EOS), as lm-eval's Hugging Face model does. Generations are greedy unless the
task samples (``do_sample``, ``temperature``), then drawn with a seed made from the request.
"""

from __future__ import annotations

import json
import zlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

from ..batch.sequence import Sequence as Running
from ..batch.text import ChoiceText
from ..batch.together import decode_together
from ..blend import blend_logits, mixing_weights, sweep_stats
from ..sampling.chains import new_chain
from ..sampling.settings import Sampling
from .batch import ParallelSequences
from .models import EvalPair

DEFAULT_GEN_TOKENS = 256  # lm-eval's own default for generation tasks that set no max_gen_toks


class SweepModels:
    """A pair and the λ of a sweep; each request answered once for every λ (see the module docstring)."""

    def __init__(self, pair: EvalPair, lams: Sequence[float], name: str = ""):
        self.pair, self.lams = pair, [float(x) for x in lams]
        self.name = name or f"{pair.ref_path}+{pair.aligned_path}"
        self._scores: Dict[tuple, Tuple[np.ndarray, np.ndarray]] = {}  # tokens, first -> (ll per λ, greedy per λ)
        self._texts: Dict[tuple, List[str]] = {}  # (context, gen_kwargs) -> generation per λ
        self._scorer: Optional[ParallelSequences] = None
        self._generators: Dict[int, ParallelSequences] = {}  # by the most new tokens they hold

    def at(self, index: int) -> "LamLM":
        """The pair at ``lams[index]`` as an lm-eval model."""
        return LamLM(self, index)

    def close(self) -> None:
        for decoder in [self._scorer, *self._generators.values()]:
            if decoder is not None:
                decoder.close()

    # ------------------------------------------------------------ scoring

    def score(self, requests: List[Tuple[List[int], List[int]]]) -> List[Tuple[np.ndarray, np.ndarray]]:
        """``(log-likelihood per λ, greedy per λ)`` of each ``(context, continuation)`` token pair."""
        keys = [self._key(context, continuation) for context, continuation in requests]
        todo = sorted({k for k in keys if k not in self._scores})  # shared prefixes next to each other
        if todo and self._scorer is None:
            self._scorer = ParallelSequences(self.pair)
        for key in todo:
            self._scores[key] = self._score_one(*key)
        return [self._scores[k] for k in keys]

    def _key(self, context: List[int], continuation: List[int]) -> tuple:
        """The scored tokens (the last n_ctx + 1, as they fit) and where the continuation starts."""
        tokens = (list(context) + list(continuation))[-(self.pair.n_ctx + 1) :]
        return tuple(int(t) for t in tokens), len(tokens) - len(continuation)

    def _score_one(self, tokens: tuple, start: int) -> Tuple[np.ndarray, np.ndarray]:
        rows = self._scorer.rows_after(np.asarray(tokens, dtype=np.intc), start - 1)  # rows predicting tokens[start:]
        picked = np.asarray(tokens[start:])
        logp, _ = sweep_stats(rows[0], rows[1], self.lams, picked)
        greedy = [bool(np.all(np.argmax(blend_logits([rows[0], rows[1]], mixing_weights(lam)), axis=-1) == picked))
                  for lam in self.lams]  # fmt: skip
        return logp.sum(axis=1), np.array(greedy)

    def rolling(self, token_lists: List[List[int]], prefix: int) -> List[np.ndarray]:
        """The log-likelihood per λ of each whole text, scored in lm-eval's disjoint windows after ``prefix``."""
        out = []
        for tokens in token_lists:
            windows = lm_utils.get_rolling_token_windows(
                token_list=tokens, prefix_token=prefix, max_seq_len=self.pair.n_ctx, context_len=1
            )
            pairs = [lm_utils.make_disjoint_window(w) for w in windows]
            out.append(sum(ll for ll, _ in self.score(pairs)))
        return out

    # ---------------------------------------------------------- generation

    def generate(self, context: str, gen_kwargs: dict) -> List[str]:
        """The continuation of ``context`` at every λ, as lm-eval asks (``until``, ``max_gen_toks``, sampling)."""
        key = (context, json.dumps(gen_kwargs, sort_keys=True, default=str))
        if key not in self._texts:
            self._texts[key] = self._generate(context, dict(gen_kwargs))
        return self._texts[key]

    def _generate(self, context: str, kwargs: dict) -> List[str]:
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_tokens = int(kwargs.pop("max_gen_toks", DEFAULT_GEN_TOKENS))
        prompt = self.pair.tokenize(context)[-max(self.pair.n_ctx - max_tokens, 1) :]
        seed = zlib.crc32(context.encode("utf-8"))
        settings = _sampling(kwargs, max_tokens)
        pair = self.pair
        runs, texts = [], []
        for lam in self.lams:
            text = ChoiceText(_after(pair.aligned_model, prompt), until)
            rule = lambda seq, text=text: text.update(seq.tokens) == "stop"
            runs.append(Running(mixing_weights(lam), new_chain(settings, seed), max_tokens, stop=rule, prompt=prompt))
            texts.append(text)
        for _ in decode_together(self._generator(max_tokens).runtime, prompt, runs, pair.is_eog):
            pass
        return [text.text for text in texts]

    def _generator(self, max_tokens: int) -> ParallelSequences:
        """Contexts for every λ's sequence of up to ``max_tokens`` new tokens (made once per length)."""
        if max_tokens not in self._generators:
            n = len(self.lams)
            self._generators[max_tokens] = ParallelSequences(self.pair, n_seq=n, n_extra=(n - 1) * max_tokens)
        return self._generators[max_tokens]


def _after(model, prompt: Sequence[int]):
    """``detokenize(tokens)`` of tokens that follow ``prompt``: their bytes as they read after it (a leading
    space kept), from the last few prompt tokens, which are all that decide it."""
    head = [int(t) for t in prompt[-4:]]
    skip = len(model.detokenize(head))
    return lambda tokens: model.detokenize(head + [int(t) for t in tokens])[skip:]


def _sampling(kwargs: dict, max_tokens: int) -> Sampling:
    """lm-eval's generation arguments as sampling settings: greedy unless it asks to sample."""
    sample = kwargs.get("do_sample") and float(kwargs.get("temperature", 1.0)) > 0
    if not sample:
        return Sampling(temperature=0.0, max_tokens=max_tokens)
    return Sampling(
        temperature=float(kwargs.get("temperature", 1.0)),
        top_k=int(kwargs.get("top_k", 0) or 0),
        top_p=float(kwargs.get("top_p", 1.0)),
        min_p=0.0,
        max_tokens=max_tokens,
    )


class LamLM(TemplateLM):
    """The pair at one λ of a :class:`SweepModels`, as lm-eval's ``TemplateLM``."""

    def __init__(self, sweep: SweepModels, index: int):
        super().__init__()
        self.sweep, self.index = sweep, index
        self.pair = sweep.pair

    @property
    def lam(self) -> float:
        return self.sweep.lams[self.index]

    # ------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        return int(self.pair.aligned_model.token_eos())

    @property
    def prefix_token_id(self) -> int:
        bos = int(self.pair.aligned_model.token_bos())
        return bos if bos >= 0 else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> List[int]:
        """The pair's tokens of ``string``, special-token texts parsed; a BOS as the model adds one (the
        GGUF's own rule, as llama.cpp applies it) unless ``add_special_tokens`` is False."""
        bos = add_special_tokens is not False
        return list(self.pair.aligned_model.tokenize(string.encode("utf-8"), add_bos=bos, special=True))

    @property
    def tokenizer_name(self) -> str:
        return self.sweep.name

    def chat_template(self, chat_template: Any = False) -> str:
        return self.pair.spec.chat_template or self.pair.aligned_model.metadata().get("tokenizer.chat_template", "")

    def apply_chat_template(self, chat_history: List[Dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The pair's chat template on ``chat_history`` (ready for a reply), as dera-eval renders chats."""
        return self.pair.render_chat(chat_history)

    # ------------------------------------------------------------ requests

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> List[Tuple[float, bool]]:
        scored = self.sweep.score([(context, continuation) for _, context, continuation in requests])
        out = []
        for (strings, _, _), (ll, greedy) in zip(requests, scored):
            result = (float(ll[self.index]), bool(greedy[self.index]))
            out.append(result)
            self.cache_hook.add_partial("loglikelihood", strings, result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        texts = [req.args[0] for req in requests]
        lls = self.sweep.rolling([self.tok_encode(t, add_special_tokens=False) for t in texts], self.prefix_token_id)
        out = []
        for text, ll in zip(texts, lls):
            out.append(float(ll[self.index]))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), out[-1])
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            out.append(self.sweep.generate(context, gen_kwargs)[self.index])
            self.cache_hook.add_partial("generate_until", req.args, out[-1])
        return out
