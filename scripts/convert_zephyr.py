#!/usr/bin/env python
"""Fetch, convert and quantize the paper's Zephyr pair, and register it in models.toml.

    python scripts/convert_zephyr.py [--out-dir models] [--quant Q4_K_M] [--dry-run]

Reference (SFT): HuggingFaceH4/mistral-7b-sft-beta. Aligned (DPO, beta = 0.1):
HuggingFaceH4/zephyr-7b-beta. Downloads go through the Hugging Face cache (only
the files the converter reads; resumable; HF_HUB_OFFLINE honoured), both models
are quantized the same way, checked to form a valid DeRa pair, and their paths
written into the ``zephyr-7b`` entry of models.toml.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import click

try:
    import dera_gguf  # noqa: F401
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dera_gguf.cli.common import reports_errors  # noqa: E402
from dera_gguf.convert.hub import download_checkpoint, plan_download  # noqa: E402
from dera_gguf.convert.pair import check_pair  # noqa: E402
from dera_gguf.convert.pipeline import check_output_path, prepare, write  # noqa: E402
from dera_gguf.convert.quantize import DEFAULT_QUANT, QUANT_TYPES, estimated_size  # noqa: E402
from dera_gguf.convert.writer import format_size  # noqa: E402
from dera_gguf.errors import DeRaError  # noqa: E402

REFERENCE = "HuggingFaceH4/mistral-7b-sft-beta"
ALIGNED = "HuggingFaceH4/zephyr-7b-beta"
PAIR_NAME = "zephyr-7b"
BETA = 0.1


def output_path(out_dir: Path, repo_id: str, quant: str) -> Path:
    """``models/zephyr-7b-beta.Q4_K_M.gguf`` and the like."""
    return out_dir / f"{repo_id.split('/')[-1]}.{quant}.gguf"


def convert_one(repo_id: str, out_dir: Path, quant: str, force: bool) -> Path:
    """Download (or reuse from the cache) and convert one checkpoint; reuse a finished GGUF."""
    out = check_output_path(output_path(out_dir, repo_id, quant))
    if out.is_file() and not force:
        click.echo(f"{out} exists, keeping it (use --force to convert again)")
        return out
    click.echo(f"fetching {repo_id}")
    folder = download_checkpoint(repo_id)
    click.echo(f"converting {repo_id} -> {out} ({quant})")
    return write(prepare(folder, repo_id), out, quant)


def _toml_path_value(path: Path, toml_path: Path) -> str:
    """Path as written into models.toml: relative to its folder when inside it, else absolute."""
    path, base = path.resolve(), toml_path.resolve().parent
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


def write_pair_entry(toml_path: Path, name: str, reference: Path, aligned: list[Path], beta: float) -> None:
    """Set ``[pairs.NAME]`` reference / aligned / beta in models.toml, editing only those lines.

    Other tables, keys and comments are kept byte for byte; the result is parsed back
    and written atomically. (Kept in one function so the registry's format can adopt it.)
    """
    text = toml_path.read_text(encoding="utf-8") if toml_path.exists() else ""
    path = lambda p: "{ path = " + json.dumps(_toml_path_value(p, toml_path)) + " }"  # noqa: E731
    values = {
        "reference": path(reference),
        "aligned": "[" + ", ".join(path(p) for p in aligned) + "]",
        "beta": repr(float(beta)),
    }
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    header = re.compile(rf'^\s*\[\s*pairs\s*\.\s*("{re.escape(name)}"|{re.escape(name)})\s*\]\s*(#.*)?$')
    start = next((i for i, line in enumerate(lines) if header.match(line)), None)
    if start is None:
        lines += (["\n"] if lines else []) + [f"[pairs.{name}]\n"] + [f"{k} = {v}\n" for k, v in values.items()]
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].lstrip().startswith("[")), len(lines))
        for j in range(start + 1, end):
            key = re.match(r"^\s*([A-Za-z0-9_-]+)\s*=", lines[j])
            if key and key.group(1) in values:
                lines[j] = f"{key.group(1)} = {values.pop(key.group(1))}\n"
        last = max([j for j in range(start, end) if lines[j].strip()], default=start)
        lines[last + 1 : last + 1] = [f"{k} = {v}\n" for k, v in values.items()]
    new_text = "".join(lines)
    _check_toml(new_text, toml_path, name)
    tmp = toml_path.with_name(f".{toml_path.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(new_text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, toml_path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_toml(text: str, toml_path: Path, name: str) -> None:
    """Parse the edited text back; refuse to write a models.toml we broke."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: no parser in the standard library
        return
    try:
        tomllib.loads(text)["pairs"][name]["reference"]["path"]
    except (tomllib.TOMLDecodeError, KeyError, TypeError) as e:
        raise DeRaError(
            f"{toml_path}: could not update the [pairs.{name}] entry automatically ({e}); edit it by hand"
        ) from e


def show_plan(out_dir: Path, quant: str) -> None:
    """List what would be downloaded and the disk each step needs; write nothing."""
    import shutil

    from huggingface_hub import constants

    download, f16_sizes, finals = 0, [], 0
    for repo_id in (REFERENCE, ALIGNED):
        files = plan_download(repo_id)
        click.echo(f"{repo_id}:")
        for f in files:
            click.echo(f"  {f.filename:45s} {format_size(f.size):>10s}  {'cached' if f.cached else 'to download'}")
        download += sum(f.size for f in files if not f.cached)
        weights = sum(f.size for f in files if f.filename.endswith(".safetensors"))
        size = estimated_size(weights // 2, quant)  # bf16 checkpoints: 2 bytes a weight
        f16_sizes.append(weights)
        finals += size
        click.echo(f"  -> {output_path(out_dir, repo_id, quant)} (about {format_size(size)})")
    # models are converted one after the other: one F16 intermediate at a time
    peak = finals if quant == "F16" else finals + max(f16_sizes)
    cache = Path(constants.HF_HUB_CACHE)
    cache_free = shutil.disk_usage(_existing_parent(cache)).free
    out_free = shutil.disk_usage(_existing_parent(out_dir)).free
    click.echo(f"download: {format_size(download)} into {cache} ({format_size(cache_free)} free)")
    click.echo(f"conversion: about {format_size(peak)} at peak in {out_dir} ({format_size(out_free)} free)")


def _existing_parent(path: Path) -> Path:
    """The nearest existing folder, for free-space queries on paths not created yet."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("models"),
    show_default=True,
    help="Folder for the two GGUF files.",
)
@click.option(
    "--quant",
    type=click.Choice(list(QUANT_TYPES), case_sensitive=False),
    default=DEFAULT_QUANT,
    show_default=True,
    help="Same type for both models (llama.cpp's quantizer).",
)
@click.option(
    "--models-toml",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("models.toml"),
    show_default=True,
    help="Registry file whose [pairs.zephyr-7b] entry is written.",
)
@click.option("--dry-run", is_flag=True, help="List downloads and disk needs; write nothing.")
@click.option("--force", is_flag=True, help="Convert again even if the GGUF files exist.")
@reports_errors
def main(out_dir: Path, quant: str, models_toml: Path, dry_run: bool, force: bool) -> None:
    """Build the zephyr-7b DeRa pair (reference: SFT, aligned: DPO beta=0.1) as GGUF files."""
    quant = quant.upper()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind like Ctrl-C: temp files removed
    try:
        if dry_run:
            show_plan(out_dir, quant)
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        reference = convert_one(REFERENCE, out_dir, quant, force)
        aligned = convert_one(ALIGNED, out_dir, quant, force)
        check_pair(reference, aligned)
        write_pair_entry(models_toml, PAIR_NAME, reference, [aligned], BETA)
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; unfinished files were removed") from None
    click.echo(f"{PAIR_NAME}: reference {reference}, aligned {aligned}; registered in {models_toml}")


if __name__ == "__main__":
    main()
