"""``pull(pair)``: get a pair's hub files into the Hugging Face cache, then check the pair.

What will be fetched and how big is said before anything starts; free disk is checked
first; an interrupted download continues where it stopped on the next pull
(:mod:`dera_gguf.hub`); the pair is ready only once both files' headers have been opened
and their vocabularies compared token by token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional

from . import hub
from .errors import DeRaError
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


def plan(pair: Pair) -> List[Planned]:
    """Every file of the pair: where it is, or what the hub says of it (one HEAD request a file)."""
    planned = []
    for source in pair.sources():
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
        if p.path:
            lines.append(f"  {p.source.describe()}: present ({p.path})")
        elif p.remote:
            resumed = f", {hub.format_size(p.have)} of it downloaded before" if p.have else ""
            lines.append(f"  {p.source.describe()}: {hub.format_size(p.remote.size)} to download{resumed}")
        else:
            lines.append(f"  {p.source.describe()}: missing (run: {p.source.hint(pair)})")
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


def pull(name: str, models: Optional[os.PathLike] = None, say: Say = print):
    """Download what the pair ``name`` lacks, check the pair, and return its files.

    Returns the checked :class:`~dera_gguf.models.PairFiles`. A DeRaError says what is
    wrong (unknown pair, no network, not enough disk, files that do not form a pair); a
    KeyboardInterrupt leaves the downloaded part for the next pull to continue.
    """
    pair = load_registry(models).get(name)
    planned = plan(pair)
    for line in describe_plan(pair, planned):
        say(line)
    unfetchable = [p for p in planned if p.path is None and p.remote is None]
    if unfetchable:
        raise DeRaError(pair.missing_message())
    check_room(planned)
    for p in planned:
        if p.remote is not None:
            say(f"downloading {p.source.describe()}")
            p.path = p.source.hub_file().download(p.remote)
    return check_pair(pair, say)


def check_pair(pair: Pair, say: Say = print):
    """Open both files' headers and compare them (vocabulary token by token, adapters, templates)."""
    from .models import PairFiles

    reference, aligned = pair.resolve()
    say(f"checking {pair.name}: vocabularies, adapters, chat templates")
    files = PairFiles.check(reference, aligned)
    for note in files.notes:
        say(note)
    return files
