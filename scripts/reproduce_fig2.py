"""Does DeRa match a retrained model? The paper's Figure 2 on the smollm2-demo pair.

    python scripts/reproduce_fig2.py --out runs/fig2 [--limit 3] [--samples 4]

On the 60 held-out demo prompts, sampled with the paper's settings (temperature 0.7,
top-k 50, top-p 0.95, at most 128 new tokens), n samples per prompt, for each lam:

  dera       the beta = 0.1 pair (smollm2-demo) blended at lam        (dera_gguf.eval.generate)
  retrained  the adapter DPO-trained at beta / lam, alone              (its pair at lam 1)
  weights    the beta = 0.1 adapter applied at scale lam, one model    (generate, mode="weights")

At lam = 1 the three are one model (the beta = 0.1 adapter): DeRa's samples there serve
all three. Per method and lam: mean length reward (eq. 10, 20-60 tokens) with standard
error, mean length, the length distribution, mean per-token KL to the reference; then,
along the retrained model's samples, the mean per-token KL(retrained || DeRa) and
KL(retrained || weight-space), with the beta = 0.1 model unchanged as a yardstick.

Writes OUT/summary.json, OUT/summary.csv and OUT/fig2.png; every stage keeps its finished
results under OUT (one folder per generation run, cross_kl/), so re-running with the same
--out resumes. Needs the retrained pairs of models.toml (smollm2-demo-beta0.2, -beta0.05).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
# On shared cores, OpenMP threads that spin while waiting make llama.cpp many times slower
# (see scripts/demo_adapter/base.py); set before llama.cpp is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from demo_sweep import heldout_prompts  # noqa: E402 (path set above)
from fig2 import crosskl, report  # noqa: E402
from fig2.pairs import BASE_BETA, Models, find_models  # noqa: E402
from fig2.plot import plot_fig2  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dera_gguf.eval import EvalPair, LengthReward, SamplingParams, generate  # noqa: E402
from dera_gguf.eval.data import read_rows  # noqa: E402
from dera_gguf.eval.store import atomic_write  # noqa: E402

N_CTX = 1024  # the held-out chat prompts are under 60 tokens; responses at most 128
LENGTH_RANGE = (20, 60)  # the demo adapters' length reward (eq. 10), as their cards say


@dataclass(frozen=True)
class Run:
    """One ``generate`` call: its folder under --out, method, the method lams it serves, its pair."""

    name: str
    method: str
    lams: tuple  # method lams
    pair_lams: tuple  # the lams passed to generate (1 for a retrained model alone)
    make_pair: Callable[[], EvalPair]
    mode: str = "blend"


def plan_runs(models: Models, lams: Sequence[float], n_threads) -> List[Run]:
    """DeRa and weight-space each in one run; each retrained model alone; lam 1 only once (DeRa's)."""
    kw = dict(n_ctx=N_CTX, n_threads=n_threads)
    base_pair = lambda: EvalPair(models.reference, models.adapter, **kw)
    others = tuple(lam for lam in lams if lam != 1)
    runs = [Run("dera", "dera", tuple(lams), tuple(lams), base_pair)]
    for lam in others:
        retrained = lambda path=models.retrained[lam]: EvalPair(models.reference, path, **kw)
        runs.append(Run(f"retrained-beta{BASE_BETA / lam:g}", "retrained", (lam,), (1.0,), retrained))
    if others:
        runs.append(Run("weights", "weights", others, others, base_pair, mode="weights"))
    return runs


def run_seed(seed: int, run: Run) -> int:
    """DeRa keeps --seed (its samples equal `dera-eval generate --seed`); other runs draw their own."""
    return seed if run.name == "dera" else zlib.crc32(f"{seed}|{run.name}".encode()) & 0x7FFFFFFF


def progress_bar(desc: str):
    """A dera_gguf.eval progress callback drawing a tqdm bar over prompts."""
    bar = None

    def report_progress(label: str, done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="prompt", dynamic_ncols=True)
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return report_progress


def sampling_params(args) -> SamplingParams:
    """The paper's sampling settings (its Zephyr ones: temperature 0.7, top-k 50, top-p 0.95)."""
    return SamplingParams(temperature=0.7, top_k=50, top_p=0.95, max_tokens=args.max_tokens)


def generate_all(runs: List[Run], data, args) -> Dict[str, Dict[float, list]]:
    """Every run's samples, as ``samples[method][lam]``; lam 1 of every method is DeRa's lam 1."""
    params = sampling_params(args)
    samples: Dict[str, Dict[float, list]] = {m: {} for m in report.METHODS}
    for run in runs:
        with run.make_pair() as pair:
            result = generate(
                pair,
                data,
                list(run.pair_lams),
                out_dir=os.path.join(args.out, run.name),
                params=params,
                seed=run_seed(args.seed, run),
                reward=LengthReward(*LENGTH_RANGE),
                samples=args.samples,
                progress=progress_bar(f"{run.name:>20}"),
                mode=run.mode,
            )
        for lam, pair_lam in zip(run.lams, run.pair_lams):
            samples[run.method][lam] = [r for r in result.records if r["lam"] == pair_lam]
    if 1.0 in samples["dera"]:
        for method in ("retrained", "weights"):
            samples[method][1.0] = samples["dera"][1.0]
    return samples


def cross_kl_all(models: Models, samples, lams, args) -> Dict[float, list]:
    """The ruler's records along the retrained samples of every lam != 1 (resumable)."""
    store = crosskl.open_store(
        os.path.join(args.out, "cross_kl"),
        {
            "reference": models.reference,
            "adapter": models.adapter,
            "retrained": {str(k): v for k, v in models.retrained.items()},
        },
    )
    todo = {lam: [r for r in samples["retrained"][lam] if r["sample"] < args.cross_samples] for lam in lams if lam != 1}
    bar = tqdm(total=sum(map(len, todo.values())), desc=f"{'KL to retrained':>20}", unit="sample")
    cross = {}
    for lam, retrained_samples in todo.items():
        make = lambda lam=lam: crosskl.scoring_pair(
            models.reference, models.adapter, models.retrained[lam], lam, n_ctx=N_CTX, n_threads=args.threads
        )
        cross[lam] = crosskl.score_lam(make, retrained_samples, lam, store, tick=bar.update)
    bar.close()
    return cross


def run_settings(args, models: Models, n_prompts: int) -> Dict[str, object]:
    """What summary.json says about the run."""
    return {
        "prompts": n_prompts,
        "samples_per_prompt": args.samples,
        "retrained_samples_per_prompt_in_kl_ruler": min(args.cross_samples, args.samples),
        "sampling": sampling_params(args).as_dict(),
        "reward": "length[{},{}]".format(*LENGTH_RANGE),
        "seed": args.seed,
        "models": {
            "reference": models.reference,
            "adapter": models.adapter,
            "retrained": {str(k): v for k, v in models.retrained.items()},
        },
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }


def record_time(out_dir: str, seconds: float) -> Dict[str, object]:
    """Add this call's wall time to OUT/timing.json (a resumed run's total is the sum of its calls)."""
    path = os.path.join(out_dir, "timing.json")
    timing = json.loads(Path(path).read_text()) if os.path.exists(path) else {"calls": []}
    timing["calls"].append({"ended": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(seconds)})
    timing["total_seconds"] = sum(c["seconds"] for c in timing["calls"])
    atomic_write(path, json.dumps(timing, indent=2) + "\n")
    return timing


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="runs/fig2", help="results folder (re-run with it to resume)")
    parser.add_argument("--lams", default="0.5,1,2", help="lams; each lam != 1 needs a pair retrained at 0.1/lam")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt, method and lam")
    parser.add_argument(
        "--cross-samples", type=int, default=4, help="retrained samples per prompt the KL ruler scores (the first N)"
    )
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None, help="only the first N held-out prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: as dera-eval)")
    parser.add_argument("--models", default=None, help="models.toml (default: the repository's / DERA_MODELS)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    lams = [float(x) for x in args.lams.split(",")]
    os.makedirs(args.out, exist_ok=True)
    models = find_models(lams, args.models)
    data = read_rows(str(heldout_prompts(Path(args.out) / "heldout_prompts.jsonl")), "generate", args.limit)
    start = time.perf_counter()
    samples = generate_all(plan_runs(models, lams, args.threads), data, args)
    cross = cross_kl_all(models, samples, lams, args)
    summary = report.summarize(samples, cross, lams, BASE_BETA, args.max_tokens, LENGTH_RANGE)
    summary["settings"] = run_settings(args, models, len(data.rows))
    summary["timing"] = record_time(args.out, time.perf_counter() - start)
    report.write_outputs(args.out, summary)
    plot_fig2(
        summary, os.path.join(args.out, "fig2.png"), f"{len(data.rows)} held-out prompts × {args.samples} samples"
    )
    print(report.markdown_table(summary))
    timing = summary["timing"]
    seconds, total = timing["calls"][-1]["seconds"], timing["total_seconds"]
    print(f"\n{args.out}/summary.json, summary.csv, fig2.png  ({seconds} s; all calls of this run {total} s)")


if __name__ == "__main__":
    main()
