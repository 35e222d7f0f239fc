"""``dera-pull PAIR`` (download a pair's hub files, check the pair) and ``dera-pairs`` (list the pairs)."""

from __future__ import annotations

import json
import signal
import sys
from typing import List, Optional

import click

from .. import hub
from ..home import model_home
from ..pull import pull
from ..registry import Pair, Registry, load_registry
from .common import reports_errors

_MODELS = click.option(
    "--models",
    "models_file",
    type=click.Path(dir_okay=False),
    default=None,
    envvar="DERA_MODELS",
    help="A models.toml whose pairs are added to the shipped ones and $DERA_HOME/models.toml [env: DERA_MODELS].",
)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("pair", required=False)
@_MODELS
@click.option("--list", "list_pairs", is_flag=True, help="List the pairs instead (as dera-pairs).")
@click.option("--dry-run", is_flag=True, help="Say what would be downloaded and check the disk; download nothing.")
@reports_errors
def pull_command(pair: Optional[str], models_file: Optional[str], list_pairs: bool, dry_run: bool) -> None:
    """Download the GGUF files of PAIR into the Hugging Face cache and check that they form a pair.

    Says what it will fetch and how big first, and refuses when the disk is too small.
    Downloads go through huggingface_hub (HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE, HF_HOME,
    proxies and progress bars as in every hub tool). Ctrl-C keeps what was downloaded: the
    next dera-pull continues from there. A partial file is never used as a model.
    """
    registry = load_registry(models_file)
    if list_pairs:
        _print_pairs(registry)
        return
    if pair is None:
        raise click.UsageError(f"name a pair to pull: {', '.join(sorted(registry.pairs))} (see dera-pairs)")
    if dry_run:
        from ..pull import check_room, describe_plan, plan

        planned = plan(registry.get(pair))
        for line in describe_plan(registry.get(pair), planned):
            click.echo(line)
        check_room(planned)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill unwinds like Ctrl-C: the part is kept
    try:
        pull(pair, models_file, say=click.echo)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: what was downloaded is kept; run dera-pull {pair} again to continue", err=True)
        sys.exit(130)
    click.echo(f"pair {pair} is ready: dera-chat --pair {pair} --lam 1.5")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@_MODELS
@click.option("--json", "as_json", is_flag=True, help="One JSON object per pair, one per line.")
@reports_errors
def pairs_command(models_file: Optional[str], as_json: bool) -> None:
    """List the model pairs: ready or not, size, beta, licence, description."""
    registry = load_registry(models_file)
    if as_json:
        for pair in registry.pairs.values():
            click.echo(json.dumps(_record(pair, registry)))
        return
    _print_pairs(registry)


def _status(pair: Pair) -> str:
    missing = pair.missing()
    if not missing:
        return "ready"
    if all(s.kind == "repo" for s in missing):
        return "not pulled"
    return "missing files"


def _record(pair: Pair, registry: Registry) -> dict:
    return {
        "name": pair.name,
        "status": _status(pair),
        "size": pair.size(),
        "beta": pair.beta,
        "license": pair.license,
        "description": pair.description,
        "default": pair.name == registry.default,
        "defined_in": str(pair.origin),
        "get_with": pair.missing_message() if pair.missing() else None,
    }


def _print_pairs(registry: Registry) -> None:
    rows: List[List[str]] = [["PAIR", "STATUS", "SIZE", "BETA", "LICENSE", "DESCRIPTION"]]
    for pair in registry.pairs.values():
        size = pair.size()
        name = pair.name + (" *" if pair.name == registry.default else "")
        beta = "" if pair.beta is None else f"{pair.beta:g}"
        rows.append([name, _status(pair), hub.format_size(size) if size else "?", beta, pair.license, pair.description])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    click.echo(f"\n* the default pair (used without --pair; if it is not pulled: {registry.fallback})")
    click.echo("get a pair with: dera-pull PAIR")
    click.echo(f"pairs from: {', '.join(str(f) for f in registry.files)}")
    click.echo(f"user model folder: {model_home()}  (your pairs: {model_home() / 'models.toml'}; $DERA_HOME)")
    click.echo(f"hub downloads: {hub.cache_dir()}  ($HF_HOME / $HF_HUB_CACHE)")
