"""Sample responses from the reference through llama.cpp, cached in a jsonl so a run resumes.

Each sample keeps its exact llama.cpp token ids (prompt and response), so the DPO
sequences later are the very tokens the reference produced, and the length reward counts
those tokens.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SamplerSettings:
    """Sampling settings of the reference; temperature 1 keeps the model's own spread."""

    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 0.95
    max_tokens: int = 128


def sample_one(llm, prompt_tokens: list[int], settings: SamplerSettings, seed: int):
    """One response: (token ids without the end token, the end token or None if cut off)."""
    import llama_cpp

    llm.set_seed(seed)
    vocab = llm._model.vocab
    response: list[int] = []
    for token in llm.generate(
        prompt_tokens,
        temp=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        min_p=0.0,
        repeat_penalty=1.0,
        reset=True,
    ):
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            return response, int(token)
        response.append(int(token))
        if len(response) >= settings.max_tokens:
            break
    return response, None


def read_cache(path: Path) -> list[dict]:
    """Samples already written (a torn last line from an interrupted run is dropped)."""
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def sample_prompts(
    llm,
    prompts: list[dict],
    n_samples: int,
    settings: SamplerSettings,
    cache: Path,
    base_seed: int,
    prompt_tokens_fn,
    max_samples: int | None = None,
) -> list[dict]:
    """Fill ``cache`` with ``n_samples`` responses per prompt, skipping what it holds.

    ``max_samples`` stops once the cache holds that many samples in all (the shipped
    adapter's run was stopped after 391, partway through its 98th prompt).
    """
    rows = read_cache(cache)
    done = {(r["id"], r["k"]) for r in rows}
    cache.parent.mkdir(parents=True, exist_ok=True)
    t0, n_new, n_tok = time.time(), 0, 0
    with open(cache, "a", encoding="utf-8") as f:
        for i, prompt in enumerate(prompts):
            todo = [k for k in range(n_samples) if (prompt["id"], k) not in done]
            if max_samples is not None:
                todo = todo[: max(max_samples - len(rows), 0)]
            if not todo:
                continue
            ptoks = prompt_tokens_fn(prompt["prompt"])
            for k in todo:
                seed = base_seed + 1000 * i + k
                response, end_token = sample_one(llm, ptoks, settings, seed)
                row = {
                    "id": prompt["id"],
                    "k": k,
                    "seed": seed,
                    "prompt_tokens": ptoks,
                    "response_tokens": response,
                    "stopped": end_token is not None,
                    "end_token": end_token,
                    "text": llm.detokenize(response).decode("utf-8", errors="replace"),
                }
                f.write(json.dumps(row) + "\n")
                f.flush()
                rows.append(row)
                n_new += 1
                n_tok += len(response)
            rate = n_tok / max(time.time() - t0, 1e-9)
            print(f"[sample] prompt {i + 1}/{len(prompts)}  new samples {n_new}  {rate:.0f} tok/s", flush=True)
    return rows
