"""dera-serve: an OpenAI-compatible server for DeRa pairs, λ chosen per request.

    dera-serve --pair smollm2-demo                     http://127.0.0.1:8000/v1
    dera-serve --pair zephyr-7b --pair smollm2-demo    several pairs, one engine each
    dera-serve --ref sft.gguf --aligned dpo.gguf --alias my-dpo --api-key KEY

A request picks λ with a body field ``lam`` (``extra_body={"lam": 1.5}`` in the openai
client) or a model alias ``PAIR@λ``; ``/v1/models`` lists each pair and its aliases for
``--lam-presets``. The app lives in :mod:`dera_gguf.serve`; this is only its front.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional, Tuple

import click

from ..blend import format_lam, parse_lams
from ..errors import DeRaError
from ..runtime.states import SharedRAMCache
from ..sampling.settings import Sampling
from .common import (
    Chosen,
    ModelFlags,
    initial_lam,
    lam_option,
    max_tokens_option,
    mode_option,
    model_options,
    reports_errors,
    sampling_options,
    speculative_option,
)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@model_options(several_pairs=True, draft=True)
@click.option("--alias", default=None, help="Model id of the --ref/--aligned pair  [default: the aligned file's name].")
@lam_option(
    "Default lam of every served pair (a comma list for several aligned models)  "
    "[default: each pair's lam in models.toml, else 1.0]."
)
@mode_option("Every pair's default; a request's 'mode' wins.")
@speculative_option("lookup", "model")
@click.option(
    "--lam-presets",
    default="0,0.5,1,1.5,2",
    show_default=True,
    help="Lams listed as PAIR@LAM aliases in /v1/models (pairs with one aligned model); '' for none. "
    "Any PAIR@LAM works whether listed or not.",
)
@sampling_options("The default of a request that leaves it out.")
@max_tokens_option("Tokens per answer: the default, and the most a request may ask.")
@click.option(
    "--max-choices",
    type=click.IntRange(1, 256),
    default=8,
    show_default=True,
    help="The most choices one request may ask for (n, or a lam list: one choice per lam). They decode together "
    "on contexts of their own, made when a request first asks (a KV cache of n_ctx + (N-1) x --max-tokens cells "
    "per model).",
)
@click.option(
    "--parallel",
    type=click.IntRange(1, 256),
    default=4,
    show_default=True,
    help="Requests answered together per pair: each running request is a sequence in one batch per model, "
    "at its own lam and seed, joining and leaving between tokens; a slot keeps its conversation for the "
    "client's next turn. The slots share one more n_ctx of KV cache (n_ctx / N positions each). 1: one "
    "request at a time. Requests longer than a slot, or with logprobs, grammars, tools, mode weights or "
    "several choices, are answered one at a time by the pair's engine (its prompt cache and --speculative).",
)
@click.option("--logprobs", is_flag=True, help="Keep every position's logits so requests may ask for logprobs.")
@click.option(
    "--cache-size",
    "cache_size",
    default="2GB",
    show_default=True,
    callback=lambda ctx, param, value: parse_size(value, "--cache-size"),
    help="Prompt cache per pair, in RAM (e.g. 512MB, 4GB; 0: off): a conversation that comes back after other "
    "requests restores its models' state instead of recomputing its prompt. The slots (--parallel) keep a "
    "conversation there when they give its slot to another, and look prompts up there (their own states).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--api-key",
    default=None,
    envvar="DERA_API_KEY",
    help="Require 'Authorization: Bearer KEY' on every request [env: DERA_API_KEY].",
)
@reports_errors
def main(
    models,
    alias,
    lam_text,
    mode,
    speculative,
    lam_presets,
    temperature,
    top_k,
    top_p,
    min_p,
    repeat_penalty,
    max_tokens,
    max_choices,
    parallel,
    logprobs,
    cache_size,
    host,
    port,
    api_key,
):
    """Serve DeRa-realigned models over the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models).

    A request samples with the sampling flags' settings (the paper's, as in dera-chat) for whatever
    it leaves out. With --seed, requests without a seed all use it (reproducible); without, each
    draws a fresh one. SIGTERM or Ctrl-C
    stops the server: running streams end at the next token, the engines are closed.
    """
    try:
        from ..serve import Catalog, ServedPair, ServeSettings, create_app
        from ..serve.parallel import pair_slots
        from ..serve.server import run
    except ImportError as e:
        raise DeRaError(
            f"dera-serve needs the serve extra ({e}): "
            "pip install 'dera-gguf[serve]' (in a checkout: pip install '.[serve]')"
        ) from None

    lams = parse_lams(lam_text) if lam_text is not None else None  # refuse bad input before loading
    presets = parse_lams(lam_presets) if lam_presets.strip() else []
    served = []
    for model_id, chosen in _choose(models, alias):
        lam = initial_lam(lams, chosen.pair, len(chosen.aligned))
        click.echo(f"dera-serve: loading {model_id} (lam {format_lam(lam)}) ...", err=True)
        llm = models.engine(chosen, lam, logits_all=logprobs, mode=mode, speculative=speculative)
        if cache_size:
            llm.set_cache(SharedRAMCache(capacity_bytes=cache_size))
        served.append(ServedPair(model_id, llm, lam, len(chosen.aligned)))
        if parallel > 1:
            served[-1].slots = pair_slots(llm, parallel)
    catalog = Catalog(served, presets)
    settings = ServeSettings(
        Sampling(temperature, top_k, top_p, min_p, repeat_penalty, max_tokens, models.seed),
        api_key=api_key,
        logits_all=logprobs,
        mode=mode,
        max_choices=max_choices,
    )
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(
            f"dera-serve: warning: listening on {host} with no --api-key: anyone who can reach it may use it", err=True
        )
    click.echo(f"dera-serve: http://{host}:{port}/v1 serves {', '.join(catalog.ids())}", err=True)
    run(create_app(catalog, settings), settings, host, port)
    click.echo("dera-serve: stopped", err=True)


def _choose(models: ModelFlags, alias: Optional[str]) -> List[Tuple[str, Chosen]]:
    """``(model id, chosen models)`` of each pair to serve."""
    if models.given_files:
        chosen = models.choose()
        return [(_model_id(alias or Path(chosen.aligned[0]).stem), chosen)]
    if alias:
        raise DeRaError("--alias names the --ref/--aligned models; a --pair is served under its own name")
    names = list(models.pairs)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DeRaError(f"--pair {repeated[0]} is given twice: each pair is served once, at any lam")
    served = []
    for name in names or [None]:
        chosen = models.choose(name)
        if chosen.note:
            click.echo(chosen.note, err=True)
        served.append((_model_id(chosen.pair.name), chosen))
    return served


def parse_size(text: str, flag: str) -> int:
    """``2GB``, ``512MB``, ``1.5G``, ``0`` -> bytes (decimal units, as disks and the hub count)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)[bB]?\s*", str(text))
    if match is None:
        raise click.BadParameter(f"{text!r} is not a size: give e.g. 512MB, 2GB or 0", param_hint=flag)
    unit = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[match.group(2).lower()]
    return int(float(match.group(1)) * unit)


def _model_id(name: str) -> str:
    if not name or "@" in name:
        raise DeRaError(f"model id {name!r} cannot be served: it must be non-empty and without '@' (PAIR@LAM)")
    return name


if __name__ == "__main__":
    main()
