"""One long-lived DeRaLlama under random sequences of calls (issue 10), checked against tests/reference.py.

A DeRaLlama keeps state between calls: the KV caches of its contexts, llama-cpp-python's token
buffer and the blend it last wrote. A hypothesis state machine drives one engine through chats,
completions, token generation and abandoned streams, at lam 0 and 1 (one context decodes), in
between, outside [0, 1], and with weight 0 on some models, while prompts grow, restart, change in
the middle or repeat. Every finished greedy answer must be the argmax of the blend that fresh plain
``llama_cpp.Llama`` instances compute on the same prompt tokens. The regression tests at the end
write out the sequences that broke the engine.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import llama_cpp
import numpy as np
import pytest
import reference as R
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from llama_cpp import LlamaRAMCache, llama_chat_format
from tiny_models import WORDS, write_tiny_lora

from dera_gguf import DeRaLlama
from dera_gguf.speculation.verify import Pace

N_CTX = 512
MAX_TOKENS = 8
# Conversations restart once their rendered prompt is this long, far below N_CTX.
HISTORY_BUDGET = 160
# Two blended logits closer than this may swap places between float32 (engine) and float64
# (reference) arithmetic or between batch shapes; answers through such a near-tie are not compared
# (none came up on the CPU here). Offloaded, logits move with the batch shape by up to LOGPROB_ATOL.
NEAR_TIE = R.backend_atol(1e-3)
# Prefix reuse and n_batch=4 decode a prompt in other batch shapes than the reference's one batch,
# and llama.cpp's CPU kernels round differently per batch shape: the last prompt row's log-probs
# differed by up to 3.1e-4 (LoRA pair, n_batch=4, lam=1, where the engine leaves llama.cpp's logits
# untouched). 1e-3 still catches a wrong lam or blend; offloaded, LOGPROB_ATOL.
LOGPROB_ATOL = R.backend_atol(1e-3)

# lam values that leave some model with weight 0 (only some contexts decode: issue 10) and
# those where every model decodes.
SINGLE_LAMS = {"some weight 0": [0.0, 1.0], "all decode": [0.7, 2.0, -0.5, 0.3, 1.5]}
PAIR_LAMS = {
    "some weight 0": [(1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (0.5, 0.5), (2.0, 0.0), (0.0, -1.0)],
    "all decode": [(0.7, 0.6), (-0.5, 1.5), (0.3, 0.3)],
}
# How the next prompt comes from the previous one; extend and repeat (the ones that reuse cached
# prefixes) come up more often; revisit goes back to an earlier conversation (a prompt cache's hit).
CHANGES = ["extend", "extend", "extend", "repeat", "repeat", "edit", "restart", "revisit"]


# ------------------------------------------------------------------- the reference side


@dataclass
class Answer:
    """Greedy tokens of the blend and the blended logits row each was chosen from."""

    tokens: List[int]
    logits: List[np.ndarray]

    def near_tie_within(self, n: int) -> bool:
        """Whether any of the first ``n`` steps had a runner-up within NEAR_TIE of the best logit."""
        for z in self.logits[:n]:
            top2 = np.partition(z, -2)[-2:]
            if top2[1] - top2[0] < NEAR_TIE:
                return True
        return False

    def logprob(self, i: int) -> float:
        return float(R.log_softmax(self.logits[i])[self.tokens[i]])


class Reference:
    """Plain llama_cpp.Llama instances (one per model, made once) and their greedy blend.

    Answers are cached per (prompt, lam): hypothesis replays sequences while it shrinks them.
    """

    def __init__(self, ref_path, aligned: Sequence[tuple[Any, bool]]):
        """``aligned``: (path, is_lora_adapter) per aligned model; an adapter is applied on ref_path."""
        self.models = [R.plain(ref_path, n_ctx=N_CTX)]
        for path, is_adapter in aligned:
            if is_adapter:
                self.models.append(R.plain(ref_path, n_ctx=N_CTX, lora_path=str(path)))
            else:
                self.models.append(R.plain(path, n_ctx=N_CTX))
        first = self.models[0]
        self.eog = frozenset(t for t in range(first.n_vocab()) if llama_cpp.llama_vocab_is_eog(first._model.vocab, t))
        self.bos = first.token_bos()
        self._formatter = llama_chat_format.Jinja2ChatFormatter(
            template=first.metadata["tokenizer.chat_template"], eos_token="</s>", bos_token="<s>"
        )
        self._cache: dict = {}

    def text_tokens(self, text: str) -> List[int]:
        """Prompt tokens of create_completion(text)."""
        return self.models[0].tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def chat_tokens(self, messages) -> List[int]:
        """Prompt tokens of create_chat_completion(messages), as llama-cpp-python's Jinja2 formatter makes them."""
        result = self._formatter(messages=messages)
        return self.models[0].tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)

    def text(self, tokens: List[int], prompt: List[int]) -> str:
        """The completion text llama-cpp-python makes of ``tokens`` after ``prompt``."""
        return self.models[0].detokenize(tokens, prev_tokens=prompt).decode("utf-8", errors="ignore")

    def greedy(self, prompt: Sequence[int], lam, n: int, stop_at_eog: bool = True) -> Answer:
        lams = tuple(lam) if isinstance(lam, (list, tuple)) else (lam,)
        key = (tuple(prompt), lams, n, stop_at_eog)
        if key not in self._cache:
            weights = [1.0 - math.fsum(lams), *lams]
            stop = self.eog if stop_at_eog else ()
            self._cache[key] = Answer(*R.greedy(self.models, weights, list(prompt), n, stop=stop))
        return self._cache[key]


# ----------------------------------------------------------- checks of one finished call


def check_answer(
    ref: Reference,
    prompt: List[int],
    lam,
    text: str,
    n: int,
    finish: str,
    logprobs: Optional[List[float]],
    max_tokens: int,
) -> None:
    """A finished greedy answer of ``n`` tokens is the reference's: same text, length, end and log-probs."""
    # n may pass max_tokens: llama-cpp-python goes on while the text ends in what looks like an
    # incomplete UTF-8 character (random tiny models emit many byte tokens).
    assert len(prompt) + max(n, max_tokens) < N_CTX, "the answer ran to the end of the context"
    expected = ref.greedy(prompt, lam, max(n, max_tokens) + 1)
    if expected.near_tie_within(n + 1):
        return
    body = [t for t in expected.tokens if t not in ref.eog]
    assert n <= len(body), f"{n} tokens answered, the reference ends after {len(body)}"
    assert text == ref.text(body[:n], prompt)
    if finish == "stop":
        assert expected.tokens[n] in ref.eog, "stopped where the reference goes on"
    else:
        assert finish == "length" and n >= max_tokens
    if logprobs is not None:
        # llama-cpp-python leaves completion tokens equal to BOS out of the log-probs
        wanted = [expected.logprob(i) for i, t in enumerate(body[:n]) if t != ref.bos]
        assert logprobs == pytest.approx(wanted, abs=LOGPROB_ATOL)


def lam_of(llm: DeRaLlama, lam):
    """The lam a call with ``lam=`` runs at (None: the default, which the state machine checks)."""
    return llm.lam if lam is None else lam


def chat_checked(
    llm: DeRaLlama, ref: Reference, messages, lam, max_tokens: int = MAX_TOKENS, logprobs: bool = False
) -> str:
    """create_chat_completion, greedy, checked against the reference; returns the answer text."""
    extra = dict(logprobs=True, top_logprobs=1) if logprobs else {}
    out = llm.create_chat_completion(messages, lam=lam, max_tokens=max_tokens, temperature=0.0, **extra)
    choice = out["choices"][0]
    got_logprobs = [c["logprob"] for c in choice["logprobs"]["content"]] if logprobs else None
    text = choice["message"]["content"]
    check_answer(
        ref,
        ref.chat_tokens(messages),
        lam_of(llm, lam),
        text,
        out["usage"]["completion_tokens"],
        choice["finish_reason"],
        got_logprobs,
        max_tokens,
    )
    return text


def complete_checked(
    llm: DeRaLlama,
    ref: Reference,
    prompt,
    prompt_tokens: List[int],
    lam,
    max_tokens: int = MAX_TOKENS,
    logprobs: bool = False,
    via_call: bool = False,
) -> str:
    """create_completion (or ``llm(...)``) on a string or token ids, checked; returns the answer text."""
    call = llm if via_call else llm.create_completion
    extra = dict(logprobs=1) if logprobs else {}
    out = call(prompt, lam=lam, max_tokens=max_tokens, temperature=0.0, **extra)
    choice = out["choices"][0]
    got_logprobs = choice["logprobs"]["token_logprobs"] if logprobs else None
    check_answer(
        ref,
        prompt_tokens,
        lam_of(llm, lam),
        choice["text"],
        out["usage"]["completion_tokens"],
        choice["finish_reason"],
        got_logprobs,
        max_tokens,
    )
    return choice["text"]


def generate_checked(
    llm: DeRaLlama, ref: Reference, prompt: List[int], n: int, send: Optional[str] = None
) -> List[int]:
    """``n`` greedy tokens from llm.generate (at the default lam), then the generator is dropped.

    ``send``: after the first token, send() the next two tokens of the greedy text ("right") or a
    token that is not the next ("wrong"); llama-cpp-python verifies sent tokens like drafts, so the
    tokens are the greedy text either way.
    """
    expected = ref.greedy(prompt, llm.lam, max(n, 3), stop_at_eog=False)
    tokens = llm.generate(prompt, temp=0.0)
    got = [next(tokens)]
    if send is not None and n > 1:
        nxt = expected.tokens[1]
        got.append(tokens.send(list(expected.tokens[1:3]) if send == "right" else [(nxt + 1) % llm.n_vocab()]))
    while len(got) < n:
        got.append(next(tokens))
    tokens.close()
    tie = next((i for i in range(n) if expected.near_tie_within(i + 1)), n)
    assert got[:tie] == expected.tokens[:tie]
    return got


def drop_stream_after(chunks, n: int) -> None:
    """Consume ``n`` chunks of a stream and drop it unfinished."""
    for i, _ in enumerate(chunks):
        if i + 1 == n:
            break
    chunks.close()


# -------------------------------------------------------------------- the state machine


@dataclass(frozen=True)
class Engine:
    """One engine configuration: which aligned models, logits_all, n_batch, speculation."""

    aligned: tuple[str, ...]  # "aligned", "aligned2" (GGUF models) or "adapter" (LoRA on the reference)
    logits_all: bool = False
    small_batch: bool = False
    speculative: Optional[str] = None

    @property
    def lams(self) -> dict:
        return PAIR_LAMS if len(self.aligned) == 2 else SINGLE_LAMS

    @property
    def start_lam(self):
        return (0.5, 0.5) if len(self.aligned) == 2 else 1.0


# With logits_all the engine before the fix re-evaluated the whole prompt whenever lam changed, so
# issue 10 showed only in the configurations without it (the fix removed that re-evaluation).
ENGINES = {
    "full-logits": Engine(("aligned",), logits_all=True),
    "full-batch4": Engine(("aligned",), small_batch=True),
    "lora": Engine(("adapter",)),
    "lora-batch4-logits": Engine(("adapter",), logits_all=True, small_batch=True),
    "two-aligned-logits": Engine(("aligned", "aligned2"), logits_all=True),
    "two-aligned-batch4": Engine(("aligned", "aligned2"), small_batch=True),
    # drafts verified in batches (issue 15): caches trimmed past rejected drafts, answers cut mid-draft
    "lora-lookup": Engine(("adapter",), speculative="lookup"),
    "full-model-draft-batch4": Engine(("aligned",), small_batch=True, speculative="model"),
    "two-aligned-model-draft-logits": Engine(("aligned", "aligned2"), logits_all=True, speculative="model"),
}


def make_engine(
    ref_path, aligned_paths: list, lam, logits_all: bool, small_batch: bool, speculative: Optional[str] = None
) -> DeRaLlama:
    kwargs = dict(n_batch=4, n_ubatch=4) if small_batch else {}
    aligned = [str(p) for p in aligned_paths]
    llm = DeRaLlama(
        str(ref_path),
        aligned if len(aligned) > 1 else aligned[0],
        lam=lam,
        n_ctx=N_CTX,
        logits_all=logits_all,
        verbose=False,
        n_gpu_layers=R.N_GPU_LAYERS,
        speculative=speculative,
        **kwargs,
    )
    if speculative:
        llm.draft_model.pace = Pace(timed=False)  # draft at every step, however fast this machine is
    return llm


class CallSequence(RuleBasedStateMachine):
    """Drives one DeRaLlama; the rules (declared in ``machine_for``) build the next prompt, call, check.

    The conversation is the state: chat and token-id calls render it with the chat template,
    text calls join its contents with newlines. Each finished answer joins the conversation
    when the next call extends it.
    """

    def __init__(self, llm: DeRaLlama, ref: Reference, logits_all: bool, fresh=None):
        super().__init__()
        self.llm, self.ref, self.logits_all = llm, ref, logits_all
        self.fresh = fresh  # makes another engine of the same configuration (load_state in a new engine)
        self.expected_lam = llm.lam  # the default lam the engine must report
        self.messages = [{"role": "user", "content": "hello world"}]
        self.answer = ""
        self.earlier: List[tuple] = []  # conversations seen before, to come back to (a prompt cache's hits)
        self.saved: Optional[tuple] = None  # (state, conversation, answer) from save_state

    def next_messages(self, change: str, words: List[str]) -> list:
        """The conversation after ``change``; restarted when it grows past HISTORY_BUDGET."""
        text = " ".join(words)
        if change == "extend":
            messages = self.messages + [
                {"role": "assistant", "content": self.answer},
                {"role": "user", "content": text},
            ]
        elif change == "restart":
            messages = [{"role": "user", "content": text}]
        elif change == "edit":  # new words in the middle of the middle message
            i = (len(self.messages) - 1) // 2
            old = self.messages[i]["content"].split(" ")
            middle = len(old) // 2
            edited = {**self.messages[i], "content": " ".join(old[:middle] + words + old[middle + 1 :])}
            messages = self.messages[:i] + [edited] + self.messages[i + 1 :]
        elif change == "revisit" and self.earlier:  # an earlier conversation, one more turn
            old_messages, old_answer = self.earlier[len(words) % len(self.earlier)]
            messages = old_messages + [
                {"role": "assistant", "content": old_answer},
                {"role": "user", "content": text},
            ]
        else:
            messages = list(self.messages)
        self.earlier = (self.earlier + [(self.messages, self.answer)])[-4:]
        if len(self.ref.chat_tokens(messages)) > HISTORY_BUDGET:
            messages = [{"role": "user", "content": text}]
        self.messages = messages
        return messages

    def plain_text(self) -> str:
        return "\n".join(m["content"] for m in self.messages)

    # -- what the rules do

    def do_chat(self, change, words, lams) -> None:
        """The changed conversation answered at each of ``lams`` in turn (a sweep, as dera-chat's /sweep)."""
        messages = self.next_messages(change, words)
        for lam in lams:
            self.answer = chat_checked(self.llm, self.ref, messages, lam, logprobs=self.logits_all)

    def do_complete(self, form, change, words, lam) -> None:
        self.next_messages(change, words)
        if form == "ids":
            prompt = tokens = self.ref.chat_tokens(self.messages)
        else:
            prompt = self.plain_text()
            tokens = self.ref.text_tokens(prompt)
        self.answer = complete_checked(
            self.llm, self.ref, prompt, tokens, lam, logprobs=self.logits_all, via_call=form == "call"
        )

    def do_generate(self, change, words, lam, n, send) -> None:
        self.next_messages(change, words)
        if lam is not None:  # generate takes no lam=: it runs at the default
            self.set_lam(lam)
        prompt = self.ref.chat_tokens(self.messages)
        self.answer = self.ref.text(generate_checked(self.llm, self.ref, prompt, n, send), prompt)

    def do_stream(self, form, change, words, lam, n_chunks) -> None:
        messages = self.next_messages(change, words)
        kw = dict(lam=lam, max_tokens=MAX_TOKENS, temperature=0.0, stream=True)
        if form == "chat":
            chunks = self.llm.create_chat_completion(messages, **kw)
        else:
            chunks = self.llm.create_completion(self.plain_text(), **kw)
        drop_stream_after(chunks, n_chunks)

    def set_lam(self, lam) -> None:
        self.llm.lam = lam
        self.expected_lam = lam

    def do_save(self) -> None:
        """save_state, kept as a pickle would carry it to another process."""
        self.saved = (pickle.loads(pickle.dumps(self.llm.save_state())), self.messages, self.answer)

    def do_load(self, into_new_engine: bool) -> None:
        """load_state of the saved state (into this engine, or a new one that replaces it): the conversation
        goes on from the saved one, and every later call is checked as before."""
        if self.saved is None:
            return
        state, self.messages, self.answer = self.saved
        if into_new_engine:
            llm = self.fresh()
            llm.lam = self.expected_lam
            self.llm.close()
            self.llm = llm
        self.llm.load_state(state)

    def use_prompt_cache(self, on: bool) -> None:
        """llama-cpp-python's RAM cache: calls that come back to an earlier prompt restore its state."""
        self.llm.set_cache(LlamaRAMCache(capacity_bytes=64 << 20) if on else None)

    @invariant()
    def default_lam_is_kept(self) -> None:
        assert self.llm.lam == pytest.approx(self.expected_lam)

    def teardown(self) -> None:
        self.llm.close()


def machine_for(lams: dict):
    """The rules of CallSequence; lam is drawn from ``lams`` (its two groups) or None (the default)."""
    some_weight_0, all_decode = (st.sampled_from(group) for group in lams.values())
    some_lam = st.one_of(some_weight_0, all_decode)
    lam = st.one_of(st.none(), some_weight_0, some_weight_0, all_decode)  # None: 1/4, weight 0 somewhere: 1/2
    words = st.lists(st.sampled_from(WORDS), min_size=1, max_size=4)
    change = st.sampled_from(CHANGES)

    class Machine(CallSequence):
        @rule(change=change, words=words, lam=lam)
        def chat(self, change, words, lam):
            self.do_chat(change, words, [lam])

        @rule(change=change, words=words, lams=st.lists(lam, min_size=2, max_size=3))
        def chat_sweep(self, change, words, lams):
            self.do_chat(change, words, lams)

        @rule(form=st.sampled_from(["text", "call", "ids"]), change=change, words=words, lam=lam)
        def complete(self, form, change, words, lam):
            self.do_complete(form, change, words, lam)

        @rule(change=change, words=words, lam=lam, n=st.integers(1, 6), send=st.sampled_from([None, "right", "wrong"]))
        def generate(self, change, words, lam, n, send):
            self.do_generate(change, words, lam, n, send)

        @rule(form=st.sampled_from(["chat", "text"]), change=change, words=words, lam=lam, n_chunks=st.integers(1, 4))
        def stream_dropped(self, form, change, words, lam, n_chunks):
            self.do_stream(form, change, words, lam, n_chunks)

        @rule(lam=some_lam)
        def set_default_lam(self, lam):
            self.set_lam(lam)

        @rule()
        def save_state(self):
            self.do_save()

        @rule(into_new_engine=st.booleans())
        def load_state(self, into_new_engine):
            self.do_load(into_new_engine)

        @rule(on=st.booleans())
        def prompt_cache(self, on):
            self.use_prompt_cache(on)

    return Machine


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def adapter_path(models_dir):
    return write_tiny_lora(models_dir / "state_adapter.gguf", seed=9)


@pytest.fixture(scope="module")
def paths(ref_path, aligned_path, aligned2_path, adapter_path) -> dict:
    return {"ref": ref_path, "aligned": aligned_path, "aligned2": aligned2_path, "adapter": adapter_path}


def reference_for(paths: dict, aligned: Sequence[str]) -> Reference:
    return Reference(paths["ref"], [(paths[name], name == "adapter") for name in aligned])


def engine_for(
    paths: dict, aligned: Sequence[str], lam, logits_all=False, small_batch=False, speculative=None
) -> DeRaLlama:
    return make_engine(paths["ref"], [paths[name] for name in aligned], lam, logits_all, small_batch, speculative)


# --------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(ENGINES))
def test_random_call_sequences_stay_exact(paths, name):
    """A fresh engine per example, then up to 16 calls; derandomized, so CI runs the same sequences."""
    engine = ENGINES[name]
    ref = reference_for(paths, engine.aligned)
    Machine = machine_for(engine.lams)

    def new_engine():
        return engine_for(
            paths, engine.aligned, engine.start_lam, engine.logits_all, engine.small_batch, engine.speculative
        )

    def new_machine():
        return Machine(new_engine(), ref, engine.logits_all, fresh=new_engine)

    run_state_machine_as_test(
        new_machine,
        settings=settings(
            max_examples=25,
            stateful_step_count=16,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )


# -- regression: the sequences that broke the engine, written out

HELLO = [{"role": "user", "content": "hello world"}]


def grow(messages: list, answer: str, text: str = "the") -> list:
    """The next turn of a chat: the answer, then a new user message."""
    return messages + [{"role": "assistant", "content": answer}, {"role": "user", "content": text}]


@pytest.mark.parametrize("aligned", ["aligned", "adapter"])
def test_issue_10_chat_at_lam_0_then_grown_chat_at_lam_2(paths, aligned):
    """Issue 10 as reported: at lam 0 only the reference decodes, then a grown chat needs both contexts."""
    llm = engine_for(paths, [aligned], 1.0)
    ref = reference_for(paths, [aligned])
    chat_checked(llm, ref, HELLO, 0.7, max_tokens=12)
    a0 = chat_checked(llm, ref, HELLO, 0.0, max_tokens=12)
    chat_checked(llm, ref, grow(HELLO, a0, "the sea story"), 2.0, max_tokens=12)


@pytest.mark.parametrize("aligned,small_batch", [("aligned", True), ("adapter", False)])
def test_turn_repeated_at_lam_0_then_next_turn(paths, aligned, small_batch):
    """Found by the state machine (full pair with n_batch=4; LoRA pair): turns at the default lam 1,
    the last one answered again at lam 0, then the next turn at lam 1 (llama_decode returned -1)."""
    llm = engine_for(paths, [aligned], 1.0, small_batch=small_batch)
    ref = reference_for(paths, [aligned])
    messages, answer = HELLO, ""
    for _ in range(3):
        messages = grow(messages, answer)
        answer = chat_checked(llm, ref, messages, None)
    chat_checked(llm, ref, messages, None)
    answer = chat_checked(llm, ref, messages, 0.0)
    chat_checked(llm, ref, grow(messages, answer), None)


def test_turn_repeated_with_first_aligned_at_weight_0_then_next_turn(paths):
    """Found by the state machine (two aligned models, n_batch=4): lam (0, 1) leaves the first aligned
    model, whose context llama-cpp-python trims, out of one answer (llama_decode returned -1 next turn)."""
    llm = engine_for(paths, ["aligned", "aligned2"], (0.5, 0.5), small_batch=True)
    ref = reference_for(paths, ["aligned", "aligned2"])
    messages = grow(HELLO, "")
    chat_checked(llm, ref, messages, None)
    answer = chat_checked(llm, ref, messages, (0.0, 1.0))
    chat_checked(llm, ref, grow(messages, answer), None)


def test_stream_dropped_at_lam_0_then_next_turn(paths):
    """Found by the state machine (full pair, n_batch=4): generate at lam 1, a chat stream at lam 0
    dropped after its first chunk, then the next turn at lam 1 (llama_decode returned -1)."""
    llm = engine_for(paths, ["aligned"], 0.0, small_batch=True)
    ref = reference_for(paths, ["aligned"])
    llm.lam = 1.0
    the = [{"role": "user", "content": "the"}]
    prompt = ref.chat_tokens(the)
    answer = ref.text(generate_checked(llm, ref, prompt, 1), prompt)
    stream = llm.create_chat_completion(the, lam=0.0, max_tokens=MAX_TOKENS, temperature=0.0, stream=True)
    drop_stream_after(stream, 1)
    chat_checked(llm, ref, grow(the, answer), None)
