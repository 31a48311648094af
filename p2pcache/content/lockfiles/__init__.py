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

from ...errors import InvalidInput
from .hashes import DepHash, UnknownHash
from .model import Dependency, LockFile, LockParseError, Registries, Skipped

__all__ = ["DepHash", "Dependency", "LockFile", "LockParseError", "Registries", "Skipped", "UnknownHash",
           "detect_format", "parse_lockfile", "FORMATS"]


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
