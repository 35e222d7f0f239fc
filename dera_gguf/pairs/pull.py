"""``pull(pair)``: get a pair's hub files into the Hugging Face cache, then check the pair.

What will be fetched and how big is said before anything starts; free disk is checked
first; an interrupted download continues where it stopped on the next pull
(:mod:`dera_gguf.pairs.downloads`); the pair is ready only once both files' headers have been opened
and their vocabularies compared token by token. A pair's drafter (models.toml's ``draft``)
is fetched when asked for, and checked whenever it is there: its vocabulary against the
pair's by llama.cpp's rule for drafters (:mod:`dera_gguf.speculation.vocab`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional

from ..errors import DeRaError
from . import downloads as hub
from .registry import Pair, Source, load_registry

Say = Callable[[str], None]
_MARGIN = 64 * 2**20  # leave this much free beside the files


@dataclass
class Planned:
    """One file of a pull: on disk already, or to download from the hub."""

    source: Source
    path: Optional[str]  # set when it is on disk
    remote: Optional[hub.Remote] = None  # set when it is to be downloaded
    have: int = 0  # bytes of it a former, interrupted pull left

    @property
    def to_fetch(self) -> int:
        return self.remote.size - self.have if self.remote else 0


def plan(pair: Pair, draft: bool = False) -> List[Planned]:
    """Every file of the pair, and its drafter with ``draft``: where it is, or what the hub says of it
    (one HEAD request a file)."""
    planned = []
    for source in pair.sources() + ([pair.draft] if draft and pair.draft is not None else []):
        path = source.cached_path()
        if path is not None or source.kind != "repo":
            planned.append(Planned(source, path))
            continue
        file = source.hub_file()
        remote = file.remote()
        planned.append(Planned(source, None, remote, file.partial_bytes(remote)))
    return planned


def describe_plan(pair: Pair, planned: List[Planned]) -> List[str]:
    """Lines saying what a pull of ``pair`` will do."""
    lines = []
    for p in planned:
        what = ("drafter " if p.source is pair.draft else "") + p.source.describe()
        if p.path:
            lines.append(f"  {what}: present ({p.path})")
        elif p.remote:
            resumed = f", {hub.format_size(p.have)} of it downloaded before" if p.have else ""
            lines.append(f"  {what}: {hub.format_size(p.remote.size)} to download{resumed}")
        else:
            lines.append(f"  {what}: missing (run: {p.source.hint(pair)})")
    total = sum(p.to_fetch for p in planned)
    head = f"{pair.name}: " + (
        f"{hub.format_size(total)} to download into {hub.cache_dir()}" if total else "nothing to download"
    )
    return [head, *lines]


def check_room(planned: List[Planned]) -> None:
    """Refuse before the first byte when the cache's disk cannot take what is to be downloaded."""
    need = sum(p.to_fetch for p in planned)
    if not need:
        return
    free = hub.free_bytes(hub.cache_dir())
    if need + _MARGIN > free:
        raise DeRaError(
            f"not enough free disk for the download: {hub.format_size(need)} needed in {hub.cache_dir()}, "
            f"{hub.format_size(free)} free; free some space, or point HF_HOME (or HF_HUB_CACHE) at a larger disk"
        )


def pull(name: str, models: Optional[os.PathLike] = None, say: Say = print, draft: Optional[bool] = None):
    """Download what the pair ``name`` lacks, check the pair, and return its files.

    ``draft``: True also downloads the pair's drafter, False leaves it alone, None checks it
    when it is there (and says how to get it when it is not). Returns the checked
    :class:`~dera_gguf.runtime.weights.PairFiles`. A DeRaError says what is wrong (unknown pair, no
    network, not enough disk, files that do not form a pair, a drafter that cannot draft for
    it); a KeyboardInterrupt leaves the downloaded part for the next pull to continue.
    """
    pair = load_registry(models).get(name)
    if draft and pair.draft is None:
        raise DeRaError(f"pair {name!r} names no drafter (a draft entry in models.toml): pull it without --with-draft")
    planned = plan(pair, bool(draft))
    for line in describe_plan(pair, planned):
        say(line)
    unfetchable = [p for p in planned if p.path is None and p.remote is None]
    if unfetchable:
        raise DeRaError(pair.missing_message() if pair.missing() else f"pair {name!r}: {pair.draft_hint()}")
    check_room(planned)
    for p in planned:
        if p.remote is not None:
            say(f"downloading {p.source.describe()}")
            p.path = p.source.hub_file().download(p.remote)
    files = check_pair(pair, say)
    if draft is not False and pair.draft is not None:
        check_drafter(pair, files.reference, say)
    return files


def check_pair(pair: Pair, say: Say = print):
    """Open both files' headers and compare them (vocabulary token by token, adapters, templates)."""
    from ..runtime.weights import PairFiles

    reference, aligned = pair.resolve()
    say(f"checking {pair.name}: vocabularies, adapters, chat templates")
    files = PairFiles.check(reference, aligned)
    for note in files.notes:
        say(note)
    return files


def check_drafter(pair: Pair, reference: str, say: Say = print) -> Optional[str]:
    """Check the pair's drafter when it is on disk (its vocabulary by llama.cpp's rule for drafters);
    say how to get it when it is not. Returns its path, or None."""
    from ..speculation.small_model import check_draft_model

    path = pair.draft.cached_path()
    if path is None:
        say(f"drafter not fetched: {pair.draft.describe()}; {pair.draft_hint()}")
        return None
    try:
        check_draft_model(path, reference, verbose=False)
    except DeRaError as e:
        raise DeRaError(
            f"{e}. Pair {pair.name!r} itself is ready: run it without the drafter (--no-draft), or fix the draft "
            f"entry of [pairs.{pair.name}] in {pair.origin}"
        ) from None
    say(f"drafter {pair.draft.describe()} can draft for the pair; dera-chat and dera-serve use it (--no-draft: not)")
    return path
