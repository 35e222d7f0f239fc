"""dera-eval: sweep λ over validation data (score preference pairs, or generate and reward).

    dera-eval score --ref sft.gguf --aligned dpo.gguf --data prefs.jsonl --lams 0,0.5,1,1.5,2 --out runs/s
    dera-eval generate --pair zephyr --prompts prompts.jsonl --lams 0,1,2 --out runs/g --reward length
    dera-eval generate --pair zephyr --prompts hf:HuggingFaceH4/mt_bench_prompts --out runs/mt \
        --judge single --judge-url http://127.0.0.1:8080/v1 --judge-model local

Both write DIR/summary.json, DIR/summary.csv and DIR/sweep.png, print the best λ, and
resume an interrupted run with the same --out.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Optional, Sequence

import click

from ..blend import parse_lams
from ..errors import DeRaError
from ..sampling.settings import Sampling
from .common import (
    ModelFlags,
    max_tokens_option,
    mode_option,
    model_options,
    reports_errors,
    sampling_options,
    speculative_option,
    sweep_spec,
)
from .eval_harness import harness
from .judge_flags import JudgeFlags, judge_options

DEFAULT_LAMS = "0,0.2,0.4,0.6,0.8,1,1.2,1.4,1.6,1.8,2"


def sweep_options(fn):
    """Flags both subcommands share (besides the model flags, :class:`~.common.ModelFlags`)."""
    options = [
        click.option("--lams", default=DEFAULT_LAMS, show_default=True, help="Comma-separated λ values to sweep."),
        click.option(
            "--out",
            "out_dir",
            type=click.Path(file_okay=False),
            required=True,
            help="Output folder; re-running with the same folder resumes.",
        ),
        click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N usable rows."),
        click.option(
            "--maximize/--minimize",
            "maximize",
            default=None,
            help="Direction of --metric (default: the metric's natural one).",
        ),
        click.option("--no-progress", is_flag=True, help="No progress bar."),
        mode_option("In weights mode each λ costs a forward pass of its own."),
        click.option(
            "--ray",
            "ray",
            is_flag=False,
            flag_value="local",
            default=None,
            metavar="[ADDRESS]",
            help="Share rows out to Ray workers, each loading the pair once: alone, a local Ray runtime; "
            "'auto' or ray://HOST:PORT, an existing cluster (pip install 'dera-gguf[cluster]').",
        ),
        click.option(
            "--workers",
            type=click.IntRange(min=1),
            default=None,
            help="Ray workers (default: one per GPU with --n-gpu-layers, else the cluster's CPUs / 4, "
            "each with 4 threads or --threads).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def rows_option(flag: str, help: str) -> Callable:
    """The JSONL rows (``--data``, ``--prompts``), handed over as ``data_path`` / ``prompts_path``."""
    return click.option(flag, flag[2:] + "_path", type=click.Path(dir_okay=False), required=True, help=help)


def take(flags: Dict[str, Any], names: Sequence[str]) -> Dict[str, Any]:
    """Remove ``names`` from a command's flags and return them (each object takes its own)."""
    return {name: flags.pop(name) for name in names}


def _names(cls) -> list:
    return [f.name for f in fields(cls)]


@dataclass(frozen=True)
class SweepFlags:
    """What both subcommands are asked besides the models: λ values, output, rows, mode, Ray, metric."""

    lams: str
    out_dir: str
    limit: Optional[int]
    maximize: Optional[bool]
    no_progress: bool
    mode: str
    ray: Optional[str]
    workers: Optional[int]
    metric: str

    def checked(self, metrics) -> "SweepFlags":
        """Refuse bad flags before anything is read or loaded."""
        parse_lams(self.lams)
        if self.metric not in metrics:
            raise DeRaError(f"--metric {self.metric}: choose one of {', '.join(metrics)}")
        self.cluster_args()
        return self

    def cluster_args(self) -> dict:
        """score()/generate()'s Ray arguments from --ray / --workers (worker lines go to stderr)."""
        if self.ray is None:
            if self.workers is not None:
                raise DeRaError("--workers shares rows out to Ray workers: add --ray (or --ray auto for a cluster)")
            return {}
        return {"ray": self.ray, "workers": self.workers, "log": lambda line: click.echo(line, err=True)}

    def run(self, sweep: Callable, models: ModelFlags, data_path: str, command: str, metrics, **extra) -> Any:
        """Read the rows, run ``sweep`` (:func:`~dera_gguf.eval.score` or ``generate``) and report it."""
        from ..eval import read_rows

        data = read_rows(data_path, command, self.limit)
        if data.bad:
            click.echo(data.report(), err=True)
        pair = sweep_spec(models)
        with progress_bar(not self.no_progress) as bar:
            result = sweep(
                pair,
                data,
                parse_lams(self.lams),
                out_dir=self.out_dir,
                progress=bar,
                mode=self.mode,
                **extra,
                **self.cluster_args(),
            )
        report(result, self.metric, self.maximize, metrics, len(data.bad))
        return result


class ProgressBar:
    """The sweep's ``progress(label, done, total)`` callback, drawn as a click progress bar on stderr."""

    def __init__(self):
        self.bar = None
        self.label = ""

    def __call__(self, label: str, done: int, total: int) -> None:
        if self.bar is not None and (label != self.label or total != self.bar.length):
            self.bar.__exit__(None, None, None)  # the next stage (judging), or more of it to wait for
            self.bar = None
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True, show_eta=True)
            self.bar.__enter__()
            self.label = label
        self.bar.update(done - self.bar.pos)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


def progress_bar(show: bool):
    """A progress callback (or None) to hand to the sweep, as a context manager that ends the bar."""
    return ProgressBar() if show else contextlib.nullcontext()


def report(result, metric: str, maximize, metrics, n_listed: int) -> None:
    """Skipped rows, what was reused, the summary table, the plot, and the best λ."""
    from ..eval import best_lam

    if result.skipped:
        click.echo(result.skipped_report(n_listed), err=True)
    if result.reused:
        click.echo(f"resumed: reused {result.reused} finished result(s) from {result.out_dir}", err=True)
    if result.judge_report:
        click.echo(result.judge_report, err=True)
    names = list(metrics)
    counts = [c for c in ("judged", "judge_failed") if result.summary and c in result.summary[0]]
    click.echo("lam\tn\t" + "".join(f"{c}\t" for c in counts) + "\t".join(names))
    for e in result.summary:
        cells = ["-" if e[m] is None else f"{e[m]:.4g}±{e[m + '_stderr'] or 0:.2g}" for m in names]
        click.echo(f"{e['lam']:g}\t{e['n']}\t" + "".join(f"{e[c]}\t" for c in counts) + "\t".join(cells))
    click.echo(f"wrote {os.path.join(result.out_dir, 'summary.json')} and summary.csv")
    if result.by_category:
        click.echo(category_table(result.by_category, metric))
        click.echo(f"wrote {os.path.join(result.out_dir, 'summary_by_category.json')} and .csv")
    if result.plot_message:
        click.echo(result.plot_message, err=True)
    else:
        click.echo(f"wrote {os.path.join(result.out_dir, 'sweep.png')}")
    best = best_lam(result.summary, metric, metrics, maximize)
    if best is None:
        click.echo(f"no results for {metric}: no best lam", err=True)
    else:
        click.echo(f"best lam by {metric}: {best['lam']:g} ({metric} = {best[metric]:.4g})")


def category_table(by_category, metric: str) -> str:
    """``metric`` per category (rows) and λ (columns)."""
    lams = list(dict.fromkeys(e["lam"] for e in by_category))
    lines = [f"{metric} by category\t" + "\t".join(f"{lam:g}" for lam in lams)]
    for category in dict.fromkeys(e["category"] for e in by_category):
        values = {e["lam"]: e.get(metric) for e in by_category if e["category"] == category}
        lines.append(category + "\t" + "\t".join("-" if values[lam] is None else f"{values[lam]:.3g}" for lam in lams))
    return "\n".join(lines)


def drafts_report(records) -> str:
    """How many drafted tokens passed, over the records that counted them (resumed ones may not have)."""
    counted = [r for r in records if "drafted" in r]
    drafted, accepted = sum(r["drafted"] for r in counted), sum(r["accepted"] for r in counted)
    share = f"{accepted / drafted:.0%}" if drafted else "-"
    return f"speculation: {drafted} drafted tokens in {len(counted)} responses, {accepted} passed ({share})"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Sweep the DeRa strength λ over validation data, as the paper does to pick a KL strength."""


@main.command(short_help="Pairwise accuracy, log-probs and KL per λ on preference data.")
@model_options(several_aligned=False)
@rows_option("--data", 'prefs.jsonl: {"prompt" or "messages", "chosen", "rejected"} per line.')
@sweep_options
@click.option("--metric", default="pairwise_accuracy", show_default=True, help="Metric that picks the best λ.")
@reports_errors
def score(**flags):
    """Pairwise accuracy (eq. 14), log-probs and KL to the reference on preference data."""
    from ..eval import SCORE_METRICS
    from ..eval import score as run

    sweep = SweepFlags(**take(flags, _names(SweepFlags))).checked(SCORE_METRICS)
    data_path = flags.pop("data_path")
    sweep.run(run, flags.pop("models"), data_path, "score", SCORE_METRICS)


@main.command(short_help="Sample per λ: length, reward and KL to the reference; an LLM judge's grades.")
@model_options(several_aligned=False)
@rows_option(
    "--prompts",
    'prompts.jsonl: {"prompt"}, {"messages"} or {"turns": [...]} per line (optional "category"); or '
    "hf:DATASET[:SPLIT] or hf:DATASET:FILE.jsonl, a dataset on the Hugging Face hub.",
)
@sweep_options
@click.option("--samples", type=click.IntRange(min=1), default=1, show_default=True, help="Responses per prompt and λ.")
@click.option(
    "--reward",
    "reward_spec",
    default="length",
    show_default=True,
    help="'length' (eq. 10) or module:function, a callable f(prompt, response) -> float.",
)
@click.option("--lmin", type=click.IntRange(min=0), default=20, show_default=True, help="Length reward: min tokens.")
@click.option("--lmax", type=click.IntRange(min=0), default=60, show_default=True, help="Length reward: max tokens.")
@sampling_options(sweep=True)
@max_tokens_option("New tokens per response (per turn).")
@click.option(
    "--metric",
    default=None,
    help="Metric that picks the best λ [default: the judge's (mean_rating, win_rate_vs_<first baseline>), "
    "else mean_reward].",
)
@speculative_option(
    "lookup",
    gate="Drafts are sized by how much of each response's earlier drafts passed, not by timing: a run repeats itself.",
)
@judge_options
@reports_errors
def generate(**flags):
    """Sample at every λ; length, reward and KL to the reference per λ (seed 0 unless --seed); with --judge,
    an LLM judge's grades or win rates per λ (and per category)."""
    from ..eval import GENERATE_METRICS, load_reward
    from ..eval import generate as run

    judge = JudgeFlags(**take(flags, _names(JudgeFlags))).to_judge()
    metrics = {**(judge.metrics() if judge else {}), **GENERATE_METRICS}
    if flags["metric"] is None:
        flags["metric"] = next(iter(metrics))
    sweep = SweepFlags(**take(flags, _names(SweepFlags))).checked(metrics)
    reward = load_reward(flags.pop("reward_spec"), flags.pop("lmin"), flags.pop("lmax"))
    params = Sampling(**take(flags, ["temperature", "top_k", "top_p", "min_p", "max_tokens"]))
    extra = take(flags, ["samples", "speculative"])
    data_path = flags.pop("prompts_path")
    models = flags.pop("models")
    seed = 0 if models.seed is None else models.seed
    result = sweep.run(
        run, models, data_path, "generate", metrics, params=params, seed=seed, reward=reward, judge=judge, **extra
    )
    if extra["speculative"]:
        click.echo(drafts_report(result.records), err=True)


main.add_command(harness)

if __name__ == "__main__":
    main()
