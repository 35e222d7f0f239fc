"""``dera-convert SRC OUT.gguf [--quant Q4_K_M]``: one HF checkpoint to one GGUF file."""

from __future__ import annotations

import signal
import sys

import click

from ..convert import DEFAULT_QUANT, QUANT_TYPES, convert_checkpoint
from .common import reports_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option(
    "--quant",
    type=click.Choice(list(QUANT_TYPES), case_sensitive=False),
    default=DEFAULT_QUANT,
    show_default=True,
    help="Output type, produced by llama.cpp's own quantizer.",
)
@reports_errors
def main(src: str, out: str, quant: str) -> None:
    """Convert SRC (a local Llama/Mistral checkpoint folder or a hub repo id) to OUT.gguf."""
    # a kill (SIGTERM) unwinds like Ctrl-C, so the temp files are removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        path = convert_checkpoint(src, out, quant)
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; no output was written") from None
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
