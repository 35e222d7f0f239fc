"""The user model folder: where converted GGUF files and the user's own models.toml live.

``$DERA_HOME`` when set, else the platform's per-user data folder for dera-gguf
(``~/.local/share/dera-gguf`` on Linux, ``~/Library/Application Support/dera-gguf`` on
macOS, ``%LOCALAPPDATA%\\dera-gguf`` on Windows). Files downloaded from the hub are not
kept here: they stay in the Hugging Face cache, which every hub tool shares.
Nothing is ever looked up inside the installed package or the current folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_data_dir

ENV = "DERA_HOME"


def model_home() -> Path:
    """The user model folder (not created here: only a command that writes into it creates it)."""
    value = os.environ.get(ENV)
    if value:
        return Path(value).expanduser().absolute()
    return Path(user_data_dir("dera-gguf", appauthor=False))


def user_models_toml() -> Path:
    """The user's own pair list, read on top of the shipped one (``dera-convert --pair`` writes it)."""
    return model_home() / "models.toml"


def is_bare_name(path: os.PathLike | str) -> bool:
    """``x.gguf`` is a bare name; ``./x.gguf``, ``models/x.gguf`` and ``/abs/x.gguf`` are not."""
    text = os.fspath(path)
    return not any(sep in text for sep in {"/", os.sep}) and not text.startswith("~")


def output_in_home(path: os.PathLike | str) -> Path:
    """Where a file to write goes: a bare name into the user model folder, a path as given."""
    return model_home() / os.fspath(path) if is_bare_name(path) else Path(path).expanduser()


def find_in_home(path: os.PathLike | str) -> str:
    """A model file to read: as given when it exists; a bare name missing here is looked up in the
    user model folder (where dera-convert writes); otherwise as given, for the caller's error."""
    if is_bare_name(path) and not os.path.exists(path) and (model_home() / os.fspath(path)).is_file():
        return str(model_home() / os.fspath(path))
    return os.fspath(path)
