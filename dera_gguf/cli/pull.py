"""``dera-pull PAIR``: download a pair's hub files into the Hugging Face cache, then check the pair."""

from __future__ import annotations

import signal
import sys
from typing import Optional

import click

from ..pairs import downloads as hub
from ..pairs.pull import pull
from ..pairs.registry import Pair, load_registry
from .common import MODELS_OPTION, reports_errors
from .pairs import print_pairs


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("pair", required=False)
@MODELS_OPTION
@click.option("--list", "list_pairs", is_flag=True, help="List the pairs instead (as dera-pairs).")
@click.option("--dry-run", is_flag=True, help="Say what would be downloaded and check the disk; download nothing.")
@click.option(
    "--with-draft/--no-draft",
    "draft",
    default=None,
    help="Also fetch the pair's drafter (a small model of its family for speculative decoding), or leave it "
    "alone. Without either, dera-pull asks on a terminal, and elsewhere fetches no drafter.",
)
@reports_errors
def pull_command(
    pair: Optional[str], models_file: Optional[str], list_pairs: bool, dry_run: bool, draft: Optional[bool]
) -> None:
    """Download the GGUF files of PAIR into the Hugging Face cache and check that they form a pair.

    Says what it will fetch and how big first, and refuses when the disk is too small.
    Downloads go through huggingface_hub (HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE, HF_HOME,
    proxies and progress bars as in every hub tool). Ctrl-C keeps what was downloaded: the
    next dera-pull continues from there. A partial file is never used as a model. A drafter
    that is there is checked against the pair (llama.cpp's vocabulary rule for drafters).
    """
    registry = load_registry(models_file)
    if list_pairs:
        print_pairs(registry)
        return
    if pair is None:
        raise click.UsageError(f"name a pair to pull: {', '.join(sorted(registry.pairs))} (see dera-pairs)")
    if dry_run:
        from ..pairs.pull import check_room, describe_plan, plan

        planned = plan(registry.get(pair), bool(draft))
        for line in describe_plan(registry.get(pair), planned):
            click.echo(line)
        check_room(planned)
        return
    if draft is None:
        draft = _ask_for_draft(registry.get(pair))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill unwinds like Ctrl-C: the part is kept
    try:
        pull(pair, models_file, say=click.echo, draft=draft)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: what was downloaded is kept; run dera-pull {pair} again to continue", err=True)
        sys.exit(130)
    click.echo(f"pair {pair} is ready: dera-chat --pair {pair} --lam 1.5")


def _ask_for_draft(pair: Pair) -> Optional[bool]:
    """On a terminal, whether to fetch the pair's drafter too (None: not asked: no drafter, it is there
    already, or no terminal to ask on)."""
    if pair.draft is None or pair.draft.is_available() or not sys.stdin.isatty():
        return None
    size = pair.draft.size()
    return click.confirm(
        f"{pair.name} has a drafter for speculative decoding, {pair.draft.describe()}"
        f"{f' ({hub.format_size(size)})' if size else ''}: fetch it too?",
        default=False,
    )


if __name__ == "__main__":
    pull_command()
