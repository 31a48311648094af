"""What every lock-file parser builds: `LockFile` of `Dependency` and `Skipped`, `Registries` for lock files
without full URLs, `LockParseError`, and the helpers the per-format modules share (`hashed`, `url_basename`).
Pure. The package `__init__` re-exports the public names; the per-format modules import them from here, so
no module imports the package it is part of (no import cycle through `__init__`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...errors import InvalidInput
from .hashes import DepHash, UnknownHash

__all__ = ["Dependency", "LockFile", "LockParseError", "Registries", "Skipped", "hashed", "url_basename"]


class LockParseError(InvalidInput):
    """A lock file that does not parse: one line naming the file and, when known, line and column."""

    def __init__(self, path: str, why: str, line: int | None = None, column: int | None = None):
        where = path + (f":{line}" if line else "") + (f":{column}" if line and column else "")
        super().__init__(f"{where}: cannot parse lock file: {why}")
        self.path, self.line, self.column = path, line, column


@dataclass(frozen=True, slots=True)
class Dependency:
    """One file a lock file pins. `hash` is what the file must hash to (go.sum's `h1` is over the
    files inside a module zip); `url` is None when the lock file has none and no registry was given;
    `filename` is the name offline layouts give it; `error` is set when the hash cannot be used."""

    name: str
    version: str
    url: str | None
    hash: DepHash | None
    kind: str
    filename: str | None = None
    error: str | None = None
    index_url: str | None = None  # a PEP 503/691 simple index to find `filename` in when `url` is None

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}" if self.version else self.name


@dataclass(frozen=True, slots=True)
class Skipped:
    name: str
    reason: str


@dataclass(slots=True)
class Registries:
    """Base URLs of registries, for lock files that do not carry full URLs. None: not configured."""

    npm: str | None = None        # npm-compatible registry: `<npm>/<name>/-/<base>-<version>.tgz`
    cargo: str | None = None      # a `dl` template (`{crate}` `{version}` `{prefix}` `{lowerprefix}`
                                  # `{sha256-checksum}`), or a base URL (`/{crate}/{version}/download` appended)
    pypi: str | None = None       # a PEP 503/691 simple index (poetry.lock has file names only)
    go: str | None = None         # a GOPROXY base URL
    gem: str | None = None        # used when a Gemfile.lock's GEM section names no remote

    def set(self, spec: str) -> None:
        """`KIND=URL` from `--registry`."""
        kind, sep, url = spec.partition("=")
        if not sep or kind not in self.__slots__ or not url:
            raise InvalidInput(f"--registry {spec!r}: write KIND=URL with KIND one of npm, cargo, pypi, go, gem")
        setattr(self, kind, url)


@dataclass(slots=True)
class LockFile:
    path: str
    format: str
    dependencies: list[Dependency] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def hashed(lock: LockFile, name: str, version: str, url: str | None, kind: str,
           parse_hash: Callable[[Any], DepHash], text: Any,
           filename: str | None = None, index_url: str | None = None) -> None:
    """Append a Dependency whose hash is `parse_hash(text)`; an unusable hash becomes its `error`."""
    try:
        h = parse_hash(text)
        err = None
    except UnknownHash as e:
        h, err = None, str(e)
    lock.dependencies.append(Dependency(name, version, url, h, kind, filename, err, index_url))


def url_basename(url: str) -> str:
    return url.split("#", 1)[0].split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
