"""``dera-pairs``: every pair of the models.toml files, ready or not, with size, beta, drafter, licence."""

from __future__ import annotations

import json
from typing import List, Optional

import click

from ..pairs import downloads as hub
from ..pairs.home import model_home
from ..pairs.registry import Pair, Registry, load_registry
from .common import MODELS_OPTION, reports_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@MODELS_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON object per pair, one per line.")
@reports_errors
def pairs_command(models_file: Optional[str], as_json: bool) -> None:
    """List the model pairs: ready or not, size, beta (and its DPO loss), drafter, licence, description."""
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


def _beta(pair: Pair) -> str:
    """``0.1``; ``5 (length-normalized)``; empty when unknown."""
    if pair.beta is None:
        return ""
    return f"{pair.beta:g}" + (" (length-normalized)" if pair.dpo == "length-normalized" else "")


def _draft(pair: Pair) -> str:
    """The drafter's column: ``ready``, its size while not pulled (``missing``: a local file that is not
    there), ``-`` for none."""
    if pair.draft is None:
        return "-"
    if pair.draft.is_available():
        return "ready"
    size = pair.draft.size()
    if pair.draft.kind != "repo":
        return "missing"
    return hub.format_size(size) if size else "not pulled"


def _draft_record(pair: Pair) -> Optional[dict]:
    if pair.draft is None:
        return None
    ready = pair.draft.is_available()
    return {
        "file": pair.draft.describe(),
        "size": pair.draft.size(),
        "status": "ready" if ready else "not pulled" if pair.draft.kind == "repo" else "missing",
        "get_with": None if ready else pair.draft_hint(),
    }


def _record(pair: Pair, registry: Registry) -> dict:
    return {
        "name": pair.name,
        "status": _status(pair),
        "size": pair.size(),
        "beta": pair.beta,
        "dpo": pair.dpo,
        "draft": _draft_record(pair),
        "license": pair.license,
        "description": pair.description,
        "default": pair.name == registry.default,
        "defined_in": str(pair.origin),
        "get_with": pair.missing_message() if pair.missing() else None,
    }


def print_pairs(registry: Registry) -> None:
    rows: List[List[str]] = [["PAIR", "STATUS", "SIZE", "BETA", "DRAFTER", "LICENSE", "DESCRIPTION"]]
    for pair in registry.pairs.values():
        size = pair.size()
        name = pair.name + (" *" if pair.name == registry.default else "")
        size_text = hub.format_size(size) if size else "?"
        rows.append([name, _status(pair), size_text, _beta(pair), _draft(pair), pair.license, pair.description])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    click.echo(f"\n* the default pair (used without --pair; if it is not pulled: {registry.fallback})")
    click.echo("get a pair with: dera-pull PAIR (and its drafter for speculative decoding: --with-draft)")
    click.echo(
        "beta: the KL strength of the aligned model's DPO training; lam realigns it to beta/lam "
        "(after length-normalized DPO only in part: docs/pairs.md)"
    )
    click.echo(f"pairs from: {', '.join(str(f) for f in registry.files)}")
    click.echo(f"user model folder: {model_home()}  (your pairs: {model_home() / 'models.toml'}; $DERA_HOME)")
    click.echo(f"hub downloads: {hub.cache_dir()}  ($HF_HOME / $HF_HUB_CACHE)")


if __name__ == "__main__":
    pairs_command()
