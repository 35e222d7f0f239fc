"""What the dera-* commands share: model selection flags, lam lists, error reporting.

Every command is a front over the Python API: these helpers only turn flags into a
``DeRaLlama`` (or its paths) and turn :class:`DeRaError` into a one-line message on
stderr with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, List, Optional, Sequence

import click

from ..blend import normalize_lam
from ..errors import DeRaError
from ..registry import Pair, load_registry


def parse_lams(text: str) -> List[float]:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]``; every value must be a finite number."""
    values = []
    for part in str(text).split(","):
        try:
            value = float(part)
        except ValueError:
            raise DeRaError(f"lam {part.strip()!r} is not a number (give e.g. 0.5 or 0,0.5,1)") from None
        if not math.isfinite(value):
            raise DeRaError(f"lam must be finite, got {part.strip()}")
        values.append(value)
    return values


def model_options(
    fn: Optional[Callable] = None, *, several_aligned: bool = True, several_pairs: bool = False
) -> Callable:
    """Flags that choose the models and how llama.cpp runs them.

    Use as ``@model_options``, or ``@model_options(several_aligned=False)`` for a command
    that blends exactly one aligned model. With ``several_pairs`` (dera-serve), ``--pair``
    may be repeated and the command gets ``pair_names``, a tuple.
    """
    if fn is None:
        return lambda f: model_options(f, several_aligned=several_aligned, several_pairs=several_pairs)
    aligned_help = "Aligned model GGUF or LoRA adapter GGUF" + (
        "; repeat for several aligned models." if several_aligned else "."
    )
    pair_help = "A pair named in models.toml (default: its `default`)" + ("; repeatable." if several_pairs else ".")
    options = [
        click.option("--pair", "pair_names" if several_pairs else "pair_name", multiple=several_pairs, help=pair_help),
        click.option(
            "--ref",
            "ref_path",
            type=click.Path(dir_okay=False),
            default=None,
            help="Reference (SFT) model GGUF, instead of --pair.",
        ),
        click.option("--aligned", "aligned_paths", multiple=True, type=click.Path(dir_okay=False), help=aligned_help),
        click.option(
            "--models",
            "models_file",
            type=click.Path(dir_okay=False),
            default=None,
            envvar="DERA_MODELS",
            help="models.toml to read pairs from [env: DERA_MODELS].",
        ),
        click.option("--n-ctx", type=click.IntRange(min=16), default=4096, show_default=True, help="Context length."),
        click.option(
            "--n-gpu-layers",
            type=int,
            default=-1,
            show_default=True,
            help="Layers to offload to the GPU (-1: all, when the llama.cpp build has a GPU).",
        ),
        click.option(
            "--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: the physical cores)."
        ),
        click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=None, help="Sampling seed."),
        click.option("--verbose", is_flag=True, help="Show llama.cpp's log."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def choose_pair(
    pair_name: Optional[str], ref_path: Optional[str], aligned_paths: Sequence[str], models_file: Optional[str]
) -> tuple[str, List[str], Optional[Pair]]:
    """Resolve the model flags to ``(reference path, aligned paths, pair or None)``."""
    if ref_path or aligned_paths:
        if pair_name:
            raise DeRaError("give either --pair or --ref/--aligned, not both")
        if not (ref_path and aligned_paths):
            raise DeRaError("--ref and --aligned go together: give the reference and at least one aligned model")
        return ref_path, list(aligned_paths), None
    registry = load_registry(models_file)
    pair = registry.get(pair_name) if pair_name else registry.default_pair()
    ref, aligned = pair.resolve()
    return ref, aligned, pair


def initial_lam(lams: Optional[List[float]], pair: Optional[Pair], n_aligned: int):
    """--lam, else the pair's own lam, else 1.0 per aligned model; one value per aligned model."""
    if lams is None:
        lams = list(pair.lam) if pair and pair.lam else [1.0] * n_aligned
    if len(lams) != n_aligned:
        raise DeRaError(
            f"{n_aligned} aligned model(s) need {n_aligned} comma-separated --lam value(s), got {len(lams)}"
        )
    return normalize_lam(lams, n_aligned)


def mode_option(note: str = "") -> Callable:
    """``--mode blend|weights``, the same in every command (``note``: what it means there)."""
    return click.option(
        "--mode",
        type=click.Choice(["blend", "weights"]),
        default="blend",
        show_default=True,
        help="blend: DeRa, the models' logits blended. weights: LoRA-aligned pairs only, the adapter applied on "
        "the reference at scale lam, one forward pass (an approximation of DeRa: the paper's weight-space "
        "alternative). " + note,
    )


_DRAFTS = {
    "lookup": "lookup: copy from the prompt and answer so far (pays on edits, quotes, code)",
    "model": "model: greedy drafts from the pair's model with the largest weight (pays on GPUs)",
}


def speculative_option(
    *kinds: str, gate: str = "Drafts are made only where this machine's measured step costs say they save time."
) -> Callable:
    """``--speculative off|KIND...``, worded alike in every command that drafts; ``gate``: what pauses drafting."""
    return click.option(
        "--speculative",
        type=click.Choice(["off", *kinds]),
        default="off",
        show_default=True,
        callback=lambda ctx, param, value: None if value == "off" else value,
        help="Draft tokens and verify them in one batch per model; the answers stay those without drafts "
        f"(up to llama.cpp's batch-shape rounding). {'; '.join(_DRAFTS[k] for k in kinds)}. {gate}",
    )


def reports_errors(fn: Callable) -> Callable:
    """Turn DeRaError (and a missing file) into click's one-line error and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DeRaError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def choose_models(
    pair_name: Optional[str], ref_path: Optional[str], aligned_paths: Sequence[str], models_file: Optional[str]
) -> tuple[str, List[str], Optional[Pair], Optional[str]]:
    """Like :func:`choose_pair`, plus a note when the default pair's files are missing.

    The note (say it on stderr) names the missing files, how to make them, and the
    fallback pair used instead, so a newcomer learns how to get the real pair.
    """
    if ref_path or aligned_paths or pair_name:
        return (*choose_pair(pair_name, ref_path, aligned_paths, models_file), None)
    pair, note = load_registry(models_file).choose_default()
    ref, aligned = pair.resolve()
    return ref, aligned, pair, note


def new_engine(
    ref: str,
    aligned: Sequence[str],
    lam,
    n_ctx: int,
    n_gpu_layers: int,
    threads: Optional[int],
    seed: Optional[int],
    verbose: bool,
    **llama_kwargs,
):
    """A DeRaLlama on resolved paths (lam: a float, or a tuple with one value per aligned model)."""
    from ..llama import DeRaLlama

    kwargs = dict(n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, n_threads=threads, verbose=verbose, **llama_kwargs)
    if seed is not None:
        kwargs["seed"] = seed
    return DeRaLlama(ref, list(aligned), lam=lam, **kwargs)
