"""Single GGUF files on the Hugging Face hub: cached or not, how big, a download that resumes.

Everything goes through huggingface_hub, so its cache (``HF_HOME`` / ``HF_HUB_CACHE``),
``HF_TOKEN``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, proxies and progress bars behave as in
every other hub tool. One thing is ours: huggingface_hub (since 1.0) deletes a partial
download when it is interrupted, and a model file is gigabytes. So the bytes are fetched
with its ``http_get`` into ``blobs/<etag>.incomplete`` (the name its own earlier versions
resumed from), which an interruption leaves in place and the next run continues with an
HTTP range request; the finished file is checked against the hub's sha256 and moved to
``blobs/<etag>``, and ``hf_hub_download`` then links it into the snapshot as it links any
blob it already holds. A file is used only through that snapshot link, so a partial
download is never read as a model.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import DeRaError

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def format_size(n_bytes: float) -> str:
    """Human-readable size in decimal units, as the hub shows them: ``4.37 GB``, ``812.3 MB``."""
    if n_bytes >= 1e9:
        return f"{n_bytes / 1e9:.2f} GB"
    if n_bytes >= 1e5:
        return f"{n_bytes / 1e6:.1f} MB"
    return f"{n_bytes / 1e3:.1f} kB"


def offline() -> bool:
    """huggingface_hub's own view of ``HF_HUB_OFFLINE``."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def free_bytes(path: Path) -> int:
    """Free space on the disk that ``path`` (or its nearest existing parent) lies on."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


@dataclass(frozen=True)
class Remote:
    """What the hub says of a file: its size, content hash (etag), commit and download address."""

    size: int
    etag: str
    commit: str
    url: str


@dataclass(frozen=True)
class HubFile:
    """One file of a hub repository, at a revision (None: the default branch)."""

    repo: str
    file: str
    revision: Optional[str] = None

    def describe(self) -> str:
        return f"{self.repo}/{self.file}"

    def cached_path(self) -> Optional[str]:
        """The complete file in the cache, or None (a partial download is never returned)."""
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(self.repo, self.file, revision=self.revision)
        return found if isinstance(found, str) and os.path.isfile(found) else None

    def remote(self) -> Remote:
        """Ask the hub (one HEAD request); a DeRaError says what went wrong and what to do."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        if offline():
            raise DeRaError(
                f"{self.describe()} is not in the Hugging Face cache ({cache_dir()}) and HF_HUB_OFFLINE is set: "
                "unset it on a machine with network access to download it"
            )
        try:
            meta = get_hf_file_metadata(hf_hub_url(self.repo, self.file, revision=self.revision))
        except Exception as e:  # huggingface_hub's and the HTTP stack's errors: translated below
            raise hub_error(self.repo, self.file, e) from None
        if meta.size is None or not meta.etag or not meta.commit_hash:
            raise DeRaError(f"the hub answered for {self.describe()} without its size or hash: try again later")
        return Remote(meta.size, meta.etag, meta.commit_hash, meta.location)

    def partial(self, remote: Remote) -> Path:
        """Where the bytes of an unfinished download of this file are kept."""
        return self._blob(remote).with_name(remote.etag + ".incomplete")

    def partial_bytes(self, remote: Remote) -> int:
        path = self.partial(remote)
        return path.stat().st_size if path.is_file() else 0

    def download(self, remote: Remote) -> str:
        """Fetch the file (continuing a partial download), check it, and link it into the cache."""
        from huggingface_hub import hf_hub_download

        blob = self._blob(remote)
        if not blob.is_file():
            self._fetch(remote)
        try:  # the blob is there: this links it into the snapshot and writes the ref, downloading nothing
            return hf_hub_download(self.repo, self.file, revision=self.revision)
        except Exception as e:
            raise hub_error(self.repo, self.file, e) from None

    def _blob(self, remote: Remote) -> Path:
        return cache_dir() / ("models--" + self.repo.replace("/", "--")) / "blobs" / remote.etag

    def _fetch(self, remote: Remote) -> None:
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        partial = self.partial(remote)
        partial.parent.mkdir(parents=True, exist_ok=True)
        have = self.partial_bytes(remote)
        if have > remote.size:  # not this file's bytes: start again
            partial.unlink()
            have = 0
        try:
            with open(partial, "ab") as f:
                http_get(
                    remote.url,
                    f,
                    resume_size=have,
                    headers=build_hf_headers(),
                    expected_size=remote.size,
                    displayed_filename=self.file,
                )
        except KeyboardInterrupt:
            raise
        except Exception as e:
            raise hub_error(self.repo, self.file, e) from None
        self._check(partial, remote)
        os.replace(partial, self._blob(remote))

    def _check(self, path: Path, remote: Remote) -> None:
        """The downloaded bytes are the hub's: size, and sha256 where the etag is one (LFS and Xet files)."""
        size = path.stat().st_size
        problem = f"{size} bytes instead of {remote.size}" if size != remote.size else None
        if problem is None and _SHA256.match(remote.etag) and _sha256(path) != remote.etag:
            problem = "its sha256 differs from the hub's"
        if problem:
            path.unlink()
            raise DeRaError(f"the download of {self.describe()} is damaged ({problem}); it was removed: run again")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def hub_error(repo: str, file: Optional[str], error: BaseException) -> DeRaError:
    """One clear line for huggingface_hub's and the network's failures: what, and what to do."""
    from huggingface_hub import constants, errors

    what = f"{repo}/{file}" if file else repo
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, errors.GatedRepoError):
        return DeRaError(
            f"{repo} is gated: accept its terms at {constants.ENDPOINT}/{repo} and log in "
            "(hf auth login, or set HF_TOKEN)"
        )
    if isinstance(error, errors.RepositoryNotFoundError) or status == 401:
        return DeRaError(
            f"no repository {repo} on {constants.ENDPOINT}, or it is private: check the name, "
            "or log in (hf auth login, or set HF_TOKEN)"
        )
    if isinstance(error, (errors.EntryNotFoundError, errors.RevisionNotFoundError)) or status == 404:
        return DeRaError(
            f"{repo} has no file {file} on {constants.ENDPOINT}: the pair's entry names a file or revision "
            "that is not there (any more); fix it in your models.toml"
        )
    if isinstance(error, errors.OfflineModeIsEnabled) or (
        isinstance(error, errors.LocalEntryNotFoundError) and constants.HF_HUB_OFFLINE
    ):
        return DeRaError(
            f"{what} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set: "
            "unset it on a machine with network access to download it"
        )
    if status is not None:
        return DeRaError(f"the hub ({constants.ENDPOINT}) refused {what} (HTTP {status}): try again later")
    return DeRaError(
        f"cannot reach the Hugging Face hub at {constants.ENDPOINT} for {what} ({type(error).__name__}: "
        f"{str(error)[:200]}): check the network or proxy (HTTPS_PROXY), or HF_ENDPOINT for a mirror; "
        "with HF_HUB_OFFLINE=1 only files already in the cache are used"
    )
