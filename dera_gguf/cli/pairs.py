"""``dera-pairs``: every pair of the models.toml files, ready or not, with size, beta, licence."""

from __future__ import annotations

import json
from typing import List, Optional

import click

from .. import hub
from ..home import model_home
from ..registry import Pair, Registry, load_registry
from .common import MODELS_OPTION, reports_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@MODELS_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON object per pair, one per line.")
@reports_errors
def pairs_command(models_file: Optional[str], as_json: bool) -> None:
    """List the model pairs: ready or not, size, beta, licence, description."""
    registry = load_registry(models_file)
    if as_json:
        for pair in registry.pairs.values():
            click.echo(json.dumps(_record(pair, registry)))
        return
    print_pairs(registry)


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


def print_pairs(registry: Registry) -> None:
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


if __name__ == "__main__":
    pairs_command()
