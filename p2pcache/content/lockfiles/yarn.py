"""yarn.lock: v1 (Yarn classic) with the `yarnlock` parser, and berry (Yarn 2+) with PyYAML.

v1 is not YAML; `yarnlock` (0BSD, a maintained Rust parser) reads it. Its result also carries, for
convenience, one entry per bare package name (a duplicate of that name's last block): only entries
keyed by their original `name@range` specs are used. A tarball's hash is `integrity` (SRI) or, in
older locks, the sha1 after `#` in `resolved`.

Berry's `checksum` (`<cacheKey>/<sha512 hex>`, e.g. `10c0/…`) is the sha512 of Yarn's own cache zip,
which Yarn builds from the registry tarball and which changes with `compressionLevel` and the cache key
version: it cannot verify the registry tarball. What it can verify is that zip itself, so berry entries
are fetched by that sha512 from the swarm (runners share `.yarn/cache` zips with `p2pcache add`) and
have no origin URL; non-npm protocols (`workspace:`, `link:`, `portal:`, `file:`, `patch:`, git) are skipped.
"""

from __future__ import annotations

from typing import Any

import yaml

from .hashes import DepHash, UnknownHash, from_hex, parse_sri
from .model import LockFile, LockParseError, Registries, Skipped, hashed, url_basename

_GIT = ("git+", "git:", "github:", "gitlab:", "bitbucket:", "https://codeload.")


def _v1_hash(resolved: str, integrity: str | None) -> DepHash:
    if integrity:
        return parse_sri(integrity)
    _, sep, frag = resolved.partition("#")
    if sep and len(frag) == 40:
        return from_hex("sha1", frag)
    raise UnknownHash(f"{resolved[:100]!r}: no integrity and no #sha1 in the resolved URL")


def parse_v1(path: str, text: str, registries: Registries, lock: LockFile) -> None:
    from yarnlock import yarnlock_parse

    try:
        doc = yarnlock_parse(text)
    except ValueError as e:
        raise LockParseError(path, str(e)) from None
    seen: set[tuple[Any, ...]] = set()
    for key, entry in doc.items():
        first = key.split(",", 1)[0].strip().strip('"')
        matches = entry.get("matches") or []
        if not matches or not first.endswith("@" + matches[0]):
            continue  # the parser's convenience copy under the bare name
        name = first[: -len(matches[0]) - 1]
        version = str(entry.get("version", ""))
        resolved = entry.get("resolved")
        spec = matches[0]
        if spec.startswith(("file:", "link:", "portal:")) or spec.startswith(("./", "../", "/")):
            lock.skipped.append(Skipped(f"{name}@{version}", f"local path {spec}"))
            continue
        if (resolved or "").startswith(_GIT) or spec.startswith(_GIT):
            lock.skipped.append(Skipped(f"{name}@{version}", f"git dependency {resolved or spec}"))
            continue
        if not resolved:
            lock.skipped.append(Skipped(f"{name}@{version}", "no resolved URL in the lock file"))
            continue
        ident = (name, version, resolved)
        if ident in seen:
            continue
        seen.add(ident)
        url = resolved.split("#", 1)[0]
        hashed(lock, name, version, url, "yarn", lambda _: _v1_hash(resolved, entry.get("integrity")), None,
               url_basename(url))


def yaml_parse_error(path: str, e: yaml.YAMLError) -> LockParseError:
    mark = getattr(e, "problem_mark", None)
    why = getattr(e, "problem", None) or str(e).splitlines()[0]
    return LockParseError(path, why, mark.line + 1 if mark else None, mark.column + 1 if mark else None)


def parse_berry(path: str, text: str, registries: Registries, lock: LockFile) -> None:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise yaml_parse_error(path, e) from None
    if not isinstance(doc, dict):
        raise LockParseError(path, "not a YAML mapping")
    for key, entry in doc.items():
        if key == "__metadata" or not isinstance(entry, dict):
            continue
        resolution = str(entry.get("resolution", ""))
        at = resolution.find("@", 1)
        name, proto = resolution[:at], resolution[at + 1:]
        version = str(entry.get("version", ""))
        if not proto.startswith("npm:"):
            kind = proto.split(":", 1)[0] or "unknown"
            lock.skipped.append(Skipped(resolution or str(key), f"{kind}: dependency (not a registry package)"))
            continue
        checksum = entry.get("checksum")
        if not checksum:
            lock.skipped.append(Skipped(resolution, "no checksum in the lock file"))
            continue
        digest = str(checksum).rsplit("/", 1)[-1]
        hashed(lock, name, version, None, "yarn-berry", lambda d: from_hex("sha512", d), digest)
