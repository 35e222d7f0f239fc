"""``dera-convert SRC [OUT.gguf]`` (one checkpoint) and ``dera-convert --pair NAME`` (a pair's two)."""

from __future__ import annotations

import signal
import sys
from typing import Optional

import click

from ..convert import DEFAULT_QUANT, QUANT_TYPES, convert_checkpoint
from ..convert.quantize import normalize_quant
from ..errors import DeRaError
from ..pairs.home import model_home, output_in_home
from ..pairs.registry import load_registry
from .common import MODELS_OPTION, reports_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src", required=False)
@click.argument("out", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--quant",
    type=click.Choice(list(QUANT_TYPES), case_sensitive=False),
    default=DEFAULT_QUANT,
    show_default=True,
    help="Output type, produced by llama.cpp's own quantizer.",
)
@click.option(
    "--pair",
    "pair_name",
    default=None,
    help="Convert both checkpoints of a pair named in models.toml (e.g. zephyr-7b) and register the result "
    "as PAIR-QUANT in $DERA_HOME/models.toml.",
)
@MODELS_OPTION
@click.option("--dry-run", is_flag=True, help="With --pair: list downloads and disk needs; write nothing.")
@click.option("--force", is_flag=True, help="With --pair: convert again even if the GGUF files exist.")
@reports_errors
def main(
    src: Optional[str],
    out: Optional[str],
    quant: str,
    pair_name: Optional[str],
    models_file: Optional[str],
    dry_run: bool,
    force: bool,
) -> None:
    """Convert SRC (a Llama/Mistral checkpoint folder or a hub repo id) to a GGUF file.

    OUT defaults to SRC's name and the quant type in the user model folder ($DERA_HOME);
    a bare file name goes there too, a path with a folder (./x.gguf) where it says.
    Files are written atomically: a partial file never has the final name.
    """
    quant = normalize_quant(quant)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill unwinds like Ctrl-C: temp files removed
    try:
        if pair_name is not None:
            _convert_pair(src, out, pair_name, models_file, quant, dry_run, force)
            return
        if src is None:
            raise DeRaError("give SRC (a checkpoint folder or hub repo id), or --pair NAME")
        if dry_run or force:
            raise DeRaError("--dry-run and --force go with --pair")
        target = output_in_home(out or f"{src.rstrip('/').split('/')[-1]}.{quant}.gguf")
        if target.parent == model_home():
            target.parent.mkdir(parents=True, exist_ok=True)
        path = convert_checkpoint(src, target, quant)
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; unfinished files were removed") from None
    click.echo(f"wrote {path}")


def _convert_pair(src, out, pair_name, models_file, quant, dry_run, force) -> None:
    from ..convert.pair import convert_pair, show_plan

    if src or out:
        raise DeRaError("--pair converts the pair's own checkpoints: give no SRC or OUT with it")
    pair = load_registry(models_file).get(pair_name)
    if dry_run:
        show_plan(pair, quant, click.echo)
        return
    name = convert_pair(pair, quant, force, click.echo)
    click.echo(f"pair {name} is registered in {model_home() / 'models.toml'}: dera-chat --pair {name} --lam 1.5")


if __name__ == "__main__":
    main()
