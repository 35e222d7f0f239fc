"""Prompt rows from a dataset on the Hugging Face hub: ``hf:DATASET[:SPLIT]`` or ``hf:DATASET:FILE``.

``hf:HuggingFaceH4/mt_bench_prompts`` reads the dataset's ``train`` split (its
``data/train-*.parquet``); ``hf:HuggingFaceH4/mt_bench_prompts:raw/question.jsonl`` one file of it.
The files go through huggingface_hub into its cache, so a second run reads them from there, and
with ``HF_HUB_OFFLINE=1`` only the cache is used (as dera-pull does). A split is the data files
whose name starts with it (``train.jsonl``, ``train-00000-of-00002.parquet``) or that lie in a
folder named after it; JSONL files are preferred to parquet ones (which need pyarrow).
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath
from typing import List, Tuple

from ..errors import DeRaError

DATA_SUFFIXES = (".jsonl", ".parquet")


def parse_spec(spec: str) -> Tuple[str, str, bool]:
    """``hf:DATASET[:PART]`` as ``(dataset, part, part is a file)``; the part defaults to the ``train`` split."""
    body = spec[len("hf:") :]
    repo, _, part = body.partition(":")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise DeRaError(
            f"{spec}: give a hub dataset as hf:OWNER/NAME[:SPLIT] or hf:OWNER/NAME:PATH.jsonl "
            "(e.g. hf:HuggingFaceH4/mt_bench_prompts)"
        )
    part = part or "train"
    return repo, part, part.endswith(DATA_SUFFIXES)


def split_files(files: List[str], split: str) -> List[str]:
    """The data files of ``split`` among a snapshot's ``files`` (paths in the repository), JSONL first."""

    def of_split(path: str) -> bool:
        p = PurePosixPath(path)
        name = p.name
        return split in p.parts[:-1] or any(name.startswith(split + sep) for sep in (".", "-", "_"))

    for suffix in DATA_SUFFIXES:
        found = sorted(f for f in files if f.endswith(suffix) and of_split(f))
        if found:
            return found
    return []


def hub_rows_files(spec: str) -> List[str]:
    """Local paths of the rows ``spec`` names, fetched into the Hugging Face cache if they are not there."""
    repo, part, is_file = parse_spec(spec)
    patterns = [part] if is_file else [f"*{part}*{suffix}" for suffix in DATA_SUFFIXES]
    folder = snapshot(repo, patterns, spec)
    files = [
        os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
        for root, _, names in os.walk(folder)
        for name in names
    ]
    if is_file:
        found = [part] if part in files else []
    else:
        found = split_files(files, part)
    if not found:
        what = f"no file {part}" if is_file else f"no JSONL or parquet files of the split {part!r}"
        listing = ", ".join(sorted(files)[:10]) or "nothing"
        raise DeRaError(
            f"{spec}: the dataset {repo} has {what} (fetched: {listing}); name the split "
            "(hf:OWNER/NAME:SPLIT) or a file (hf:OWNER/NAME:PATH.jsonl)"
        )
    return [os.path.join(folder, f) for f in found]


def snapshot(repo: str, patterns: List[str], spec: str) -> str:
    """The cached snapshot folder of the dataset's files matching ``patterns`` (downloaded if need be)."""
    from huggingface_hub import constants, errors, snapshot_download

    try:
        return snapshot_download(repo, repo_type="dataset", allow_patterns=patterns)
    except errors.GatedRepoError:
        raise DeRaError(
            f"{spec}: the dataset {repo} is gated: accept its terms on the hub and log in "
            "(hf auth login, or set HF_TOKEN)"
        ) from None
    except errors.RepositoryNotFoundError:
        raise DeRaError(
            f"{spec}: no dataset {repo} on {constants.ENDPOINT}, or it is private: check the name, or log in"
        ) from None
    except errors.LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            raise DeRaError(
                f"{spec}: the dataset {repo} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                "HF_HUB_OFFLINE is set: unset it on a machine with network access to fetch it once"
            ) from None
        raise DeRaError(
            f"{spec}: cannot reach the Hugging Face hub at {constants.ENDPOINT} for {repo} and it is not "
            f"cached ({str(e).splitlines()[0][:200]}): check the network, or HF_ENDPOINT for a mirror"
        ) from None
    except errors.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", "?")
        raise DeRaError(f"{spec}: the hub ({constants.ENDPOINT}) refused {repo} (HTTP {status}): try again") from None
