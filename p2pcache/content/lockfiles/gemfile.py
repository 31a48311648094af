"""Gemfile.lock `CHECKSUMS` (Bundler ≥ 2.5): `name (version[-platform]) sha256=<hex>` per gem.

No maintained Python parser of Gemfile.lock exists (Bundler's own `LockfileParser` is Ruby), and the
format is line-oriented with fixed indentation (sections at column 0, `remote:` and `specs:` at 2 spaces,
specs at 4, their dependencies at 6), so this reads it line by line the way Bundler does, reporting the
line of anything it cannot read. A gem's URL is `<remote>/gems/<name>-<version>[-<platform>].gem`, the
remote being its GEM section's. Gems of GIT and PATH sections, and gems listed without a checksum, are
skipped.
"""

from __future__ import annotations

import re

from .hashes import DepHash, UnknownHash, parse_prefixed
from .model import LockFile, LockParseError, Registries, Skipped, hashed

_SPEC = re.compile(r"^ {4}(\S+) \(([^)\s]+)\)$")
_CHECKSUM = re.compile(r"^ {2}(\S+) \(([^)\s]+)\)(?: (\S+))?$")


def parse(path: str, text: str, registries: Registries, lock: LockFile) -> None:
    section = None
    remote: str | None = None
    origin: dict[tuple[str, str], str | None] = {}  # (name, version) -> GEM remote, or None for GIT/PATH
    checksums = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        if not line.startswith(" "):
            section = line.strip()
            remote = None
            continue
        if section in ("GEM", "GIT", "PATH", "PLUGIN SOURCE"):
            if line.startswith("  remote: "):
                remote = line[len("  remote: "):].strip()
            elif m := _SPEC.match(line):
                origin[(m.group(1), m.group(2))] = remote if section == "GEM" else None
                if section != "GEM":
                    origin[(m.group(1), m.group(2), "why")] = f"{section.lower()} source {remote}"  # type: ignore[index]
        elif section == "CHECKSUMS":
            m = _CHECKSUM.match(line)
            if not m:
                raise LockParseError(path, f"not a CHECKSUMS entry: {line.strip()[:80]!r}", lineno, 1)
            checksums.append((m.group(1), m.group(2), m.group(3), lineno))
    if not checksums:
        raise LockParseError(path, "no CHECKSUMS section (Bundler 2.5+ writes it: `bundle lock --add-checksums`)")
    for name, version, sums, _ in checksums:
        key = (name, version)
        if key in origin and origin[key] is None:
            lock.skipped.append(Skipped(f"{name}@{version}", origin.get((name, version, "why"), "git/path gem")))  # type: ignore[arg-type]
            continue
        if not sums:
            lock.skipped.append(Skipped(f"{name}@{version}", "no checksum in the lock file"))
            continue
        base = origin.get(key) or registries.gem
        url = f"{base.rstrip('/')}/gems/{name}-{version}.gem" if base else None

        def pick(s: str) -> DepHash:
            found = [h for h in s.split(",") if h.startswith("sha256=")]
            if not found:
                raise UnknownHash(f"checksum {s[:60]!r}: no sha256= (the only algorithm Bundler writes)")
            return parse_prefixed(found[0], "=")
        hashed(lock, name, version, url, "gem", pick, sums, f"{name}-{version}.gem")
