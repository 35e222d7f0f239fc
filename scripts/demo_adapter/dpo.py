"""DPO (Rafailov et al. 2023; the paper's Appendix C) of a LoRA on the dequantized reference.

The policy is the reference weights, dequantized by transformers from the very GGUF that
llama.cpp runs, plus a peft LoRA; the reference log-probs come from the same model with the
LoRA switched off. The loss is

    -log sigmoid( beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))] )

Training saves a checkpoint every few steps and resumes from it.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

# q/k are left out: llama.cpp stores their rows permuted for its RoPE layout, and the
# other projections need no such care to carry the adapter over.
LORA_TARGETS = ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class DPOConfig:
    """Knobs of one DPO run (beta is the paper's KL strength)."""

    beta: float = 0.1
    rank: int = 8
    alpha: float = 16.0
    lr: float = 5e-4
    pairs_per_step: int = 4
    steps: int = 300
    warmup: int = 10
    max_minutes: float = 30.0
    save_every: int = 5
    seed: int = 0


@dataclass
class TrainState:
    """What a checkpoint holds besides the weights, so a resumed run continues the log."""

    step: int = 0
    seconds: float = 0.0
    history: list = field(default_factory=list)
    ref_logps: dict = field(default_factory=dict)


def load_policy(gguf_path: Path, config: DPOConfig):
    """The dequantized reference from the GGUF, wrapped in a fresh LoRA (B = 0: policy = ref)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(config.seed)
    base = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=list(LORA_TARGETS),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, lora)


def pad_batch(sequences: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded ids, attention mask, and a mask of the response positions to score."""
    width = max(len(p) + len(r) for p, r in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    resp = torch.zeros_like(ids, dtype=torch.bool)
    for i, (prompt, response) in enumerate(sequences):
        n_p, n = len(prompt), len(prompt) + len(response)
        ids[i, :n] = torch.tensor(prompt + response)
        attn[i, :n] = 1
        resp[i, n_p:n] = True
    return ids, attn, resp


def response_logps(model, ids, attn, resp) -> torch.Tensor:
    """Sum of log-probs of each sequence's response tokens, shape (batch,).

    The vocabulary projection runs only on the positions that predict a response token,
    which saves much of the time and memory of full logits.
    """
    causal_lm = model.get_base_model()
    hidden = causal_lm.model(input_ids=ids, attention_mask=attn).last_hidden_state
    target_mask = resp[:, 1:]
    rows = target_mask.nonzero(as_tuple=True)[0]
    logits = causal_lm.lm_head(hidden[:, :-1][target_mask]).float()
    token_logps = torch.log_softmax(logits, dim=-1).gather(1, ids[:, 1:][target_mask].unsqueeze(1)).squeeze(1)
    return torch.zeros(ids.shape[0], dtype=token_logps.dtype).index_add(0, rows, token_logps)


def pair_logps(model, pairs: list[dict], idx: list[int], pad_id: int):
    """Response log-probs of the chosen and of the rejected side of the pairs ``idx``.

    The two sides run as separate batches: chosen answers are short and rejected ones
    long, so one batch would spend most of its time on padding.
    """
    sides = []
    for key in ("chosen", "rejected"):
        seqs = [(pairs[i]["prompt_tokens"], pairs[i][key]) for i in idx]
        sides.append(response_logps(model, *pad_batch(seqs, pad_id)))
    return sides[0], sides[1]


def dpo_loss(pol_c, pol_r, ref_c, ref_r, beta: float):
    """Mean DPO loss, and the share of pairs whose implicit reward ranks chosen first."""
    margin = beta * ((pol_c - ref_c) - (pol_r - ref_r))
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean()


def batch_of(pairs: list[dict], step: int, size: int) -> list[int]:
    """Indices of the pairs of one step, cycling through the (pre-shuffled) list."""
    start = (step * size) % len(pairs)
    return [(start + j) % len(pairs) for j in range(size)]


def reference_logps(model, pairs, idx, state: TrainState, pad_id: int):
    """Reference log-probs (LoRA off) of chosen and rejected, computed once per pair."""
    missing = [i for i in idx if i not in state.ref_logps]
    if missing:
        with torch.no_grad(), model.disable_adapter():
            chosen, rejected = pair_logps(model, pairs, missing, pad_id)
        for j, i in enumerate(missing):
            state.ref_logps[i] = (float(chosen[j]), float(rejected[j]))
    ref = torch.tensor([state.ref_logps[i] for i in idx])
    return ref[:, 0], ref[:, 1]


def save_checkpoint(path: Path, model, optimizer, state: TrainState) -> None:
    """Write the LoRA weights, optimizer and log atomically (an interrupted save is harmless)."""
    from peft import get_peft_model_state_dict

    tmp = path.with_suffix(".tmp")
    torch.save(
        {"lora": get_peft_model_state_dict(model), "optimizer": optimizer.state_dict(), "state": state.__dict__}, tmp
    )
    os.replace(tmp, path)


def load_checkpoint(path: Path, model, optimizer=None) -> TrainState:
    """Restore a checkpoint written by :func:`save_checkpoint` into ``model``."""
    from peft import set_peft_model_state_dict

    ckpt = torch.load(path, weights_only=False)
    set_peft_model_state_dict(model, ckpt["lora"])
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    return TrainState(**ckpt["state"])


def train(model, pairs: list[dict], config: DPOConfig, checkpoint: Path, pad_id: int) -> TrainState:
    """Run DPO steps until ``config.steps`` or the time budget, checkpointing as it goes."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / config.warmup))
    state = load_checkpoint(checkpoint, model, optimizer) if checkpoint.exists() else TrainState()
    for _ in range(state.step):
        schedule.step()
    model.train()
    t_start = time.time() - state.seconds
    while state.step < config.steps and (time.time() - t_start) < 60 * config.max_minutes:
        idx = batch_of(pairs, state.step, config.pairs_per_step)
        ref_c, ref_r = reference_logps(model, pairs, idx, state, pad_id)
        pol_c, pol_r = pair_logps(model, pairs, idx, pad_id)
        loss, acc = dpo_loss(pol_c, pol_r, ref_c, ref_r, config.beta)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        state.step += 1
        state.seconds = time.time() - t_start
        state.history.append(
            {"step": state.step, "loss": float(loss), "acc": float(acc), "seconds": round(state.seconds, 1)}
        )
        print(
            f"[dpo] step {state.step}/{config.steps}  loss {float(loss):.4f}  "
            f"acc {float(acc):.2f}  {state.seconds / 60:.1f} min",
            flush=True,
        )
        if state.step % config.save_every == 0:
            save_checkpoint(checkpoint, model, optimizer, state)
    save_checkpoint(checkpoint, model, optimizer, state)
    return state


def recent_metrics(state: TrainState, last: int = 5) -> dict:
    """Loss and reward accuracy averaged over the last steps (single steps are noisy)."""
    tail = state.history[-last:]
    if not tail:
        return {"loss": math.nan, "reward_accuracy": math.nan}
    return {
        "loss": sum(h["loss"] for h in tail) / len(tail),
        "reward_accuracy": sum(h["acc"] for h in tail) / len(tail),
    }
