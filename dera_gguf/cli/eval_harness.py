"""``dera-eval harness``: lm-evaluation-harness tasks at every λ of a sweep (:mod:`dera_gguf.eval.harness_run`).

dera-eval harness --pair zephyr-7b --lams 0,0.5,1,1.5 --tasks arc_easy,hellaswag --out runs/h
"""

from __future__ import annotations

import click

from ..blend import format_lam, parse_lams
from ..errors import DeRaError
from .common import ModelFlags, model_options, reports_errors, sweep_spec

HINT = "pip install 'dera-gguf[harness]' (lm-evaluation-harness)"


@click.command(short_help="lm-evaluation-harness tasks at every λ, one decode per model for all λ.")
@model_options(several_aligned=False)
@click.option("--tasks", required=True, help="lm-eval task names, comma-separated (e.g. arc_easy,hellaswag,gsm8k).")
@click.option("--lams", default="0,0.5,1,1.5,2", show_default=True, help="Comma-separated λ values.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Output folder (resumes).")
@click.option(
    "--include-path", type=click.Path(file_okay=False, exists=True), default=None, help="Your own task YAMLs."
)
@click.option(
    "--num-fewshot", type=click.IntRange(min=0), default=None, help="Few-shot examples (default: the task's)."
)
@click.option("--limit", type=float, default=None, help="Documents per task (a count, or a fraction below 1).")
@click.option("--apply-chat-template", is_flag=True, help="Render prompts with the pair's chat template.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="lm-eval's batch size.")
@click.option("--beta", type=float, default=None, help="The pair's KL strength for the β/λ axis [default: its β].")
@click.option(
    "--ray",
    "ray",
    is_flag=False,
    flag_value="local",
    default=None,
    metavar="[ADDRESS]",
    help="Share the tasks out to Ray workers, each running every λ of its tasks: alone, a local Ray runtime; "
    "'auto' or ray://HOST:PORT, a cluster (pip install 'dera-gguf[cluster]').",
)
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Ray workers (default: from the cluster).")
@reports_errors
def harness(models: ModelFlags, tasks, lams, out_dir, include_path, num_fewshot, limit, apply_chat_template, **rest):
    """Run lm-evaluation-harness tasks at every λ: lm-eval's results per λ, summary.json/csv, sweep.png.

    Every log-likelihood request decodes once per model for all λ, every generation decodes all λ
    in one batch per model: a sweep costs about one λ's run. Re-running with the same --out resumes.
    """
    try:
        from ..eval.harness_run import harness as run
    except ImportError as e:
        raise DeRaError(f"dera-eval harness needs lm-evaluation-harness ({e}): {HINT}") from None
    if rest["ray"] is None and rest["workers"] is not None:
        raise DeRaError("--workers shares tasks out to Ray workers: add --ray (or --ray auto for a cluster)")
    values = [float(x) for x in parse_lams(lams)]
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    spec = sweep_spec(models)
    chosen = models.choose()
    beta = rest["beta"] if rest["beta"] is not None else (chosen.pair.beta if chosen.pair else None)
    log = lambda line: click.echo(line, err=True)
    settings = dict(num_fewshot=num_fewshot, limit=limit, include_path=include_path, beta=beta, log=log)
    settings.update(apply_chat_template=apply_chat_template, batch_size=rest["batch_size"])
    if rest["ray"] is not None:
        from ..eval.harness_ray import harness_on_ray

        result = harness_on_ray(spec, values, names, out_dir, ray=rest["ray"], workers=rest["workers"], **settings)
    else:
        result = run(spec, values, names, out_dir, **settings)
    click.echo("task\tmetric\t" + "\t".join(f"λ {format_lam(x)}" for x in values))
    rows = {}
    for row in result.summary:
        rows.setdefault((row["task"], row["metric"]), {})[row["lam"]] = row
    for (task, metric), by_lam in sorted(rows.items()):
        cells = [_cell(by_lam.get(x)) for x in values]
        click.echo(f"{task}\t{metric}\t" + "\t".join(cells))
    click.echo(f"wrote {out_dir}/summary.json, summary.csv, sweep.png and lm-eval's results per λ")
    for task, (metric, lam, value) in sorted(result.best.items()):
        click.echo(f"best lam for {task} by {metric}: {format_lam(lam)} ({value:.4g})")


def _cell(row) -> str:
    if row is None:
        return "-"
    err = f"±{row['stderr']:.2g}" if row["stderr"] is not None else ""
    return f"{row['value']:.4g}{err}"
