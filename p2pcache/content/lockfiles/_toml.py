"""tomllib with a LockParseError carrying the line and column tomllib reports."""

from __future__ import annotations

import re
import tomllib
from typing import Any

from .model import LockParseError

_AT = re.compile(r"^(.*) \(at line (\d+), column (\d+)\)$")


def load(path: str, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = _AT.match(str(e))
        if m:
            raise LockParseError(path, m.group(1), int(m.group(2)), int(m.group(3))) from None
        raise LockParseError(path, str(e)) from None


def tables(path: str, text: str, key: str = "package") -> list[dict[str, Any]]:
    """The `[[key]]` tables of a TOML lock file (Cargo.lock, uv.lock, poetry.lock)."""
    doc = load(path, text)
    found = doc.get(key)
    if not isinstance(found, list) or not all(isinstance(t, dict) for t in found):
        raise LockParseError(path, f"no [[{key}]] tables")
    return found
