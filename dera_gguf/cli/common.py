"""What the dera-* commands share: model selection flags, lam lists, error reporting.

Every command is a front over the Python API: these helpers only turn flags into a
``DeRaLlama`` (or its paths) and turn :class:`DeRaError` into a one-line message on
stderr with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Sequence

import click

from ..blend import normalize_lam
from ..errors import DeRaError
from ..pairs.home import find_in_home
from ..pairs.registry import Pair, load_registry
from ..runtime.pair import MODES
from ..sampling.settings import Sampling

MODELS_OPTION = click.option(
    "--models",
    "models_file",
    type=click.Path(dir_okay=False),
    default=None,
    envvar="DERA_MODELS",
    help="A models.toml whose pairs are added to the shipped ones and $DERA_HOME/models.toml [env: DERA_MODELS].",
)


DRAFT_OPTIONS = (
    click.option(
        "--draft",
        "draft_path",
        type=click.Path(dir_okay=False),
        default=None,
        help="A small GGUF model with the pair's tokenizer (e.g. a 1B model of an 8B pair's family) that drafts "
        "tokens for the pair to verify: implies --speculative model, which then means its drafts (a bare file "
        "name is also looked for in $DERA_HOME). Without it, a --pair's own drafter drafts once dera-pull "
        "--with-draft has fetched it.",
    ),
    click.option("--no-draft", is_flag=True, help="Do not draft with the pair's drafter (models.toml's draft)."),
)


def model_options(
    fn: Optional[Callable] = None, *, several_aligned: bool = True, several_pairs: bool = False, draft: bool = False
) -> Callable:
    """Flags that choose the models and how llama.cpp runs them, handed to the command as ``models``,
    one :class:`ModelFlags`.

    Use as ``@model_options``, or ``@model_options(several_aligned=False)`` for a command
    that blends exactly one aligned model. With ``several_pairs`` (dera-serve), ``--pair``
    may be repeated; with ``draft``, ``--draft FILE`` names a small drafter.
    """
    if fn is None:
        return lambda f: model_options(f, several_aligned=several_aligned, several_pairs=several_pairs, draft=draft)
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
            help="Reference (SFT) model GGUF, instead of --pair (a bare file name is also looked for in the "
            "user model folder, $DERA_HOME).",
        ),
        click.option("--aligned", "aligned_paths", multiple=True, type=click.Path(dir_okay=False), help=aligned_help),
        MODELS_OPTION,
        *(DRAFT_OPTIONS if draft else ()),
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
    pair_key = "pair_names" if several_pairs else "pair_name"

    @functools.wraps(fn)
    def with_model_flags(*args, **kwargs):
        pairs = kwargs.pop(pair_key)
        values = {name: kwargs.pop(name) for name in ModelFlags.FLAGS}
        values["draft_path"] = kwargs.pop("draft_path", None)
        values["no_draft"] = kwargs.pop("no_draft", False)
        pairs = tuple(pairs) if several_pairs else ((pairs,) if pairs else ())
        return fn(*args, models=ModelFlags(pairs=pairs, **values), **kwargs)

    for option in reversed(options):
        with_model_flags = option(with_model_flags)
    return with_model_flags


class Chosen(NamedTuple):
    """The models the flags chose: resolved paths, the pair (None for --ref/--aligned), a note to say."""

    reference: str
    aligned: List[str]
    pair: Optional[Pair]
    note: Optional[str] = None

    @property
    def name(self) -> str:
        return f"pair {self.pair.name!r}" if self.pair else "the given models"


@dataclass(frozen=True)
class ModelFlags:
    """The flags that choose the models and how llama.cpp runs them (:func:`model_options`), as one object."""

    FLAGS = ("ref_path", "aligned_paths", "models_file", "n_ctx", "n_gpu_layers", "threads", "seed", "verbose")

    pairs: tuple  # --pair values: several only for dera-serve
    ref_path: Optional[str]
    aligned_paths: Sequence[str]
    models_file: Optional[str]
    n_ctx: int
    n_gpu_layers: int
    threads: Optional[int]
    seed: Optional[int]
    verbose: bool
    draft_path: Optional[str] = None  # --draft, where the command has it
    no_draft: bool = False  # --no-draft: not the pair's drafter

    @property
    def pair_name(self) -> Optional[str]:
        return self.pairs[0] if self.pairs else None

    @property
    def given_files(self) -> bool:
        return bool(self.ref_path or self.aligned_paths)

    def choose(self, pair_name: Optional[str] = None) -> Chosen:
        """The models: --ref/--aligned, else the pair named (``pair_name``, else --pair), else the default.

        For the default pair, a note (say it on stderr) tells when its files are missing,
        how to get them, and which fallback pair is used instead.
        """
        pair_name = pair_name or self.pair_name
        if self.given_files:
            if pair_name:
                raise DeRaError("give either --pair or --ref/--aligned, not both")
            if not (self.ref_path and self.aligned_paths):
                raise DeRaError("--ref and --aligned go together: give the reference and at least one aligned model")
            return Chosen(find_in_home(self.ref_path), [find_in_home(p) for p in self.aligned_paths], None)
        pair, note = load_registry(self.models_file).pick(pair_name or None)
        return Chosen(*pair.resolve(), pair, note)

    def engine(self, chosen: Chosen, lam, **llama_kwargs):
        """A DeRaLlama on the chosen models (lam: a float, or one value per aligned model), with the
        pair's chat template and drafter (:meth:`Pair.engine_args`); what its check noticed is said on stderr."""
        from ..llama import DeRaLlama

        kwargs = dict(n_ctx=self.n_ctx, n_gpu_layers=self.n_gpu_layers, n_threads=self.threads, verbose=self.verbose)
        if self.seed is not None:
            kwargs["seed"] = self.seed
        draft = self._draft_file(llama_kwargs.get("speculative"))
        if draft is not None:
            kwargs["draft_model_path"] = draft
        if chosen.pair is None:
            llm = DeRaLlama(chosen.reference, list(chosen.aligned), lam=lam, **kwargs, **llama_kwargs)
        else:
            args = chosen.pair.engine_args(lam, False if self.no_draft else None, **kwargs, **llama_kwargs)
            if args.drafter is not None:
                drafter = chosen.pair.draft.describe()
                click.echo(f"drafting with the pair's drafter {drafter} (--no-draft: not)", err=True)
            llm = DeRaLlama(args.reference, args.aligned, lam=args.lam, **args.llama_kwargs)
        for note in llm.pair_files.notes:
            click.echo(note, err=True)
        return llm

    def _draft_file(self, speculative) -> Optional[str]:
        """--draft's file, checked against --no-draft and --speculative (None without --draft)."""
        if self.draft_path is None:
            return None
        if self.no_draft:
            raise DeRaError("give --draft FILE or --no-draft, not both")
        if speculative not in (None, "model"):
            raise DeRaError(
                f"--draft drafts from {self.draft_path} and --speculative {speculative} names "
                "another source of drafts: give one of them (--speculative model, or off, goes with --draft)"
            )
        return find_in_home(self.draft_path)


def initial_lam(lams: Optional[List[float]], pair: Optional[Pair], n_aligned: int):
    """--lam, else the pair's own lam (:meth:`Pair.default_lam`); one value per aligned model."""
    if lams is None:
        lams = pair.default_lam() if pair else [1.0] * n_aligned
    if len(lams) != n_aligned:
        raise DeRaError(
            f"{n_aligned} aligned model(s) need {n_aligned} comma-separated --lam value(s), got {len(lams)}"
        )
    return normalize_lam(lams, n_aligned)


def mode_option(note: str = "") -> Callable:
    """``--mode blend|weights``, the same in every command (``note``: what it means there)."""
    return click.option(
        "--mode",
        type=click.Choice(MODES),
        default="blend",
        show_default=True,
        help="blend: DeRa, the models' logits blended. weights: LoRA-aligned pairs only, the adapter applied on "
        "the reference at scale lam, one forward pass (an approximation of DeRa: the paper's weight-space "
        "alternative). " + note,
    )


_DRAFTS = {
    "lookup": "lookup: copy from the prompt and answer so far (pays on edits, quotes, code)",
    "model": "model: greedy drafts from the pair's model with the largest weight, or from --draft's model "
    "(pays on GPUs)",
}


SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty")


def sampling_options(note: str = "", *, sweep: bool = False) -> Callable:
    """--temperature, --top-k, --top-p, --min-p and --repeat-penalty, the paper's settings by default
    (:class:`~dera_gguf.sampling.settings.Sampling`); ``note`` says what they set.

    ``sweep`` (dera-eval generate): the settings a sweep's chains take (temperature >= 0, top-p in
    (0, 1], refused at the flag) and no --repeat-penalty, since a sweep samples without one.
    """
    paper = Sampling()
    tail = f" {note}" if note else ""
    temperature_type = click.FloatRange(min=0) if sweep else float
    top_p_type = click.FloatRange(0, 1, min_open=True) if sweep else click.FloatRange(0.0, 1.0)
    options = [
        click.option(
            "--temperature",
            type=temperature_type,
            default=paper.temperature,
            show_default=True,
            help=f"0: greedy.{tail}",
        ),
        click.option(
            "--top-k", type=click.IntRange(min=0), default=paper.top_k, show_default=True, help="0 turns top-k off."
        ),
        click.option("--top-p", type=top_p_type, default=paper.top_p, show_default=True),
        click.option(
            "--min-p",
            type=click.FloatRange(0.0, 1.0),
            default=paper.min_p,
            show_default=True,
            help="0 (off) as in the paper; llama-cpp-python's own default is 0.05.",
        ),
    ]
    if not sweep:
        options.append(
            click.option(
                "--repeat-penalty",
                type=click.FloatRange(min=0.0, min_open=True),
                default=paper.repeat_penalty,
                show_default=True,
                help="1.0 turns it off, as in the paper; llama-cpp-python's server's default is 1.1.",
            )
        )

    def decorate(fn: Callable) -> Callable:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def max_tokens_option(help: str) -> Callable:
    """``--max-tokens``, the paper's 256 by default; ``help`` says what it caps in the command."""
    return click.option(
        "--max-tokens", type=click.IntRange(min=1), default=Sampling().max_tokens, show_default=True, help=help
    )


def lam_option(help: str) -> Callable:
    """``--lam`` as text (a comma list for several aligned models, parsed by the command before
    anything loads); ``help`` says what it sets in the command and its default."""
    return click.option("--lam", "lam_text", default=None, help=help)


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


def sweep_spec(models: ModelFlags):
    """The pair to sweep, checked once: loaded by this process, or by each Ray worker with --ray."""
    from ..eval.models import PairSpec

    chosen = models.choose()
    template = chosen.pair.chat_template if chosen.pair else None
    if chosen.pair is not None and chosen.pair.chat_format and not template:
        raise DeRaError(
            f"pair {chosen.pair.name!r} names a chat_format ({chosen.pair.chat_format}); dera-eval renders chats "
            "with Jinja templates: give the pair a chat_template in models.toml, or use prompt rows"
        )
    return PairSpec.check(
        chosen.reference,
        chosen.aligned,
        models.n_ctx,
        models.n_gpu_layers,
        models.threads,
        verbose=models.verbose,
        chat_template=template,
    )
