"""Fetch only the files a conversion needs from the Hugging Face Hub.

``snapshot_download`` with ``allow_patterns`` does the work: it uses and fills
the HF cache (so a second run downloads nothing), resumes interrupted
downloads, shows progress bars and honours ``HF_HUB_OFFLINE`` / ``HF_HOME`` /
``HF_HUB_CACHE``. PyTorch ``.bin`` weights are never fetched.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import DeRaError

# Everything the converter reads; weights as safetensors only.
NEEDED_PATTERNS = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class PlannedFile:
    """One file a download would need, and whether the cache already has it."""

    filename: str
    size: int
    cached: bool


def looks_like_repo_id(src: str) -> bool:
    """``org/name`` that is not an existing local path."""
    return bool(_REPO_ID.match(src)) and not Path(src).exists()


def _hub_error(repo_id: str, error: Exception) -> DeRaError:
    """Translate huggingface_hub failures into one actionable message."""
    from huggingface_hub import constants, errors

    if isinstance(error, errors.LocalEntryNotFoundError) or constants.HF_HUB_OFFLINE:
        return DeRaError(
            f"{repo_id} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub cannot be "
            "reached (HF_HUB_OFFLINE is set or there is no network); download it once while online"
        )
    if isinstance(error, (errors.RepositoryNotFoundError, errors.GatedRepoError)):
        return DeRaError(
            f"{repo_id}: no such local folder, and no such repository (or access denied) on the "
            "Hugging Face Hub; check the path or repo id and your token"
        )
    return DeRaError(f"downloading {repo_id} failed: {error}")


def download_checkpoint(repo_id: str, revision: str | None = None) -> Path:
    """Download (or find in the cache) the needed files of a hub repo; return the snapshot folder."""
    from huggingface_hub import errors, snapshot_download

    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=NEEDED_PATTERNS)
    except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, errors.HFValidationError, OSError) as e:
        raise _hub_error(repo_id, e) from e
    folder = Path(path)
    if not any(folder.glob("*.safetensors")):
        raise DeRaError(
            f"{repo_id} has no .safetensors weights (PyTorch .bin checkpoints are not supported: they can "
            "run code when loaded); use a revision that ships safetensors"
        )
    return folder


def plan_download(repo_id: str, revision: str | None = None) -> list[PlannedFile]:
    """The files a download would fetch, with sizes; works offline from the cache."""
    from huggingface_hub import HfApi, constants, errors, snapshot_download, try_to_load_from_cache
    from huggingface_hub.utils import filter_repo_objects

    if not constants.HF_HUB_OFFLINE:
        try:
            info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
            siblings = filter_repo_objects(
                info.siblings or [], allow_patterns=NEEDED_PATTERNS, key=lambda s: s.rfilename
            )
            cached = lambda name: isinstance(try_to_load_from_cache(repo_id, name, revision=info.sha), str)  # noqa: E731
            return [PlannedFile(s.rfilename, s.size or 0, cached(s.rfilename)) for s in siblings]
        except (errors.RepositoryNotFoundError, errors.GatedRepoError, errors.HFValidationError) as e:
            raise _hub_error(repo_id, e) from e
        except Exception:  # no network (the exception type depends on the HTTP stack): use the cache
            pass
    try:
        folder = Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=NEEDED_PATTERNS, local_files_only=True)
        )
    except (errors.LocalEntryNotFoundError, OSError) as e:
        raise _hub_error(repo_id, e) from e
    names = filter_repo_objects(sorted(p.name for p in folder.iterdir() if p.is_file()), allow_patterns=NEEDED_PATTERNS)
    return [PlannedFile(name, (folder / name).stat().st_size, True) for name in names]


def resolve_source(src: str | os.PathLike[str], revision: str | None = None) -> Path:
    """A local checkpoint folder, or a hub repo id downloaded into the HF cache."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DeRaError(f"{path} is a file; SRC must be a checkpoint folder or a hub repo id like org/name")
        return path
    if looks_like_repo_id(str(src)):
        return download_checkpoint(str(src), revision)
    raise DeRaError(f"{src}: no such folder, and not a hub repo id (org/name)")
