"""Lock files of package managers, parsed to the pinned dependencies they name. Pure: no I/O beyond the
text handed in.

Owns: one module per format, each built on the format's own maintained parser (json, tomllib, PyYAML's
safe loader, `yarnlock`, `packaging.pylock`), and the common result — `Dependency(name, version, url,
hash, kind)` for each file to fetch, `Skipped(name, reason)` for what has no verifiable file (git
dependencies, local paths, links), never dropped silently. A hash this node cannot verify (an unknown
algorithm or encoding) does not stop the file: that dependency carries `error`, the rest go on.

Must not: fetch, touch the repo, or name a registry host. Registry base URLs are parameters
(`Registries`), given by flags or config; a lock file that names its own URLs keeps them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...errors import InvalidInput
from .hashes import DepHash, UnknownHash

__all__ = ["DepHash", "Dependency", "LockFile", "LockParseError", "Registries", "Skipped", "UnknownHash",
           "detect_format", "parse_lockfile", "FORMATS"]


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


def detect_format(path: str, text: str) -> str:
    """The format of a lock file, from its file name (and, for yarn.lock, its contents)."""
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    if name in ("package-lock.json", "npm-shrinkwrap.json") or name.endswith(".package-lock.json"):
        return "npm"
    if name == "yarn.lock":
        return "yarn-berry" if "__metadata:" in text[:4096] else "yarn"
    if name == "pnpm-lock.yaml":
        return "pnpm"
    if name == "Cargo.lock":
        return "cargo"
    if name == "uv.lock":
        return "uv"
    if name == "pylock.toml" or (name.startswith("pylock.") and name.endswith(".toml")):
        return "pylock"
    if name == "poetry.lock":
        return "poetry"
    if name in ("Gemfile.lock", "gems.locked"):
        return "gem"
    if name == "go.sum":
        return "go"
    raise InvalidInput(f"{path}: not a lock file this command knows by its name (package-lock.json, yarn.lock, "
                       "pnpm-lock.yaml, Cargo.lock, uv.lock, pylock.toml, poetry.lock, Gemfile.lock, go.sum)")


def parse_lockfile(path: str, text: str, registries: Registries | None = None, fmt: str | None = None) -> LockFile:
    """Parse `text` (the contents of `path`); raise LockParseError if it does not parse."""
    from . import cargo, gemfile, gosum, npm, pnpm, poetry, pylock, uv, yarn

    registries = registries or Registries()
    fmt = fmt or detect_format(path, text)
    parsers = {"npm": npm.parse, "yarn": yarn.parse_v1, "yarn-berry": yarn.parse_berry, "pnpm": pnpm.parse,
               "cargo": cargo.parse, "uv": uv.parse, "pylock": pylock.parse, "poetry": poetry.parse,
               "gem": gemfile.parse, "go": gosum.parse}
    lock = LockFile(path, fmt)
    parsers[fmt](path, text, registries, lock)
    return lock


FORMATS = ("npm", "yarn", "yarn-berry", "pnpm", "cargo", "uv", "pylock", "poetry", "gem", "go")


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
