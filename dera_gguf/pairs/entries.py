"""Write one ``[pairs.NAME]`` entry into a models.toml, keeping everything else byte for byte.

Used by ``dera-convert --pair`` to register the pair it made in ``$DERA_HOME/models.toml``.
Only the entry's own keys are rewritten (comments, other tables and keys stay), the result
is parsed back before it is written, and it is written atomically: a models.toml is never
left half-written or broken.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Dict, List

from ..errors import DeRaError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def toml_value(value) -> str:
    """A Python str / float / int as a TOML value (JSON's string escapes are TOML's)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def path_source(path: Path, toml_path: Path) -> str:
    """``{ path = "..." }`` relative to the models.toml's folder when the file lies inside it."""
    path, base = Path(path).resolve(), toml_path.resolve().parent
    try:
        text = path.relative_to(base).as_posix()
    except ValueError:
        text = path.as_posix()
    return "{ path = " + json.dumps(text) + " }"


def write_pair_entry(toml_path: Path, name: str, values: Dict[str, str]) -> None:
    """Set ``[pairs.NAME]``'s keys to ``values`` (TOML value texts), creating the entry or the file."""
    text = toml_path.read_text(encoding="utf-8") if toml_path.exists() else ""
    values = dict(values)
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    header = re.compile(rf'^\s*\[\s*pairs\s*\.\s*("{re.escape(name)}"|{re.escape(name)})\s*\]\s*(#.*)?$')
    start = next((i for i, line in enumerate(lines) if header.match(line)), None)
    if start is None:
        lines += (["\n"] if lines else []) + [f'[pairs."{name}"]\n'] + _assignments(values)
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].lstrip().startswith("[")), len(lines))
        for j in range(start + 1, end):
            key = re.match(r"^\s*([A-Za-z0-9_-]+)\s*=", lines[j])
            if key and key.group(1) in values:
                lines[j] = f"{key.group(1)} = {values.pop(key.group(1))}\n"
        last = max([j for j in range(start, end) if lines[j].strip()], default=start)
        lines[last + 1 : last + 1] = _assignments(values)
    new_text = "".join(lines)
    _check(new_text, toml_path, name)
    _write_atomically(toml_path, new_text)


def _assignments(values: Dict[str, str]) -> List[str]:
    return [f"{key} = {value}\n" for key, value in values.items()]


def _check(text: str, toml_path: Path, name: str) -> None:
    """Parse the edited text back; refuse to write a models.toml we broke."""
    try:
        tomllib.loads(text)["pairs"][name]["reference"]
    except (tomllib.TOMLDecodeError, KeyError, TypeError) as e:
        raise DeRaError(
            f"{toml_path}: could not update the [pairs.{name}] entry automatically ({e}); edit it by hand"
        ) from None


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
