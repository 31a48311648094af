"""pylock.toml (PEP 751), read with tomllib and validated with `packaging.pylock`.

Every wheel, sdist and archive with a URL and a hash is a dependency (the strongest hash given);
`vcs` and `directory` packages are skipped."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from packaging.pylock import (
    Pylock,
    PylockUnsupportedVersionError,
    PylockValidationError,
    PackageArchive,
    PackageSdist,
    PackageWheel,
)

from ._toml import load
from .hashes import DepHash, UnknownHash, from_hex
from .model import LockFile, LockParseError, Registries, Skipped, hashed, url_basename

_ORDER = ("sha512", "sha384", "sha256", "sha1")


def _best(hashes: dict[str, Any]) -> Callable[[object], DepHash]:
    def pick(_: object) -> DepHash:
        for algo in _ORDER:
            if algo in hashes:
                return from_hex(algo, hashes[algo])
        raise UnknownHash(f"hashes {sorted(hashes)}: no algorithm this node can verify (sha256, sha384, sha512, sha1)")
    return pick


def parse(path: str, text: str, registries: Registries, lock: LockFile) -> None:
    doc = load(path, text)
    try:
        pylock = Pylock.from_dict(doc)
    except (PylockValidationError, PylockUnsupportedVersionError) as e:
        raise LockParseError(path, str(e)) from None
    for pkg in pylock.packages:
        name, version = str(pkg.name), str(pkg.version or "")
        if pkg.vcs is not None:
            lock.skipped.append(Skipped(f"{name}@{version}", f"git/vcs dependency {pkg.vcs.url or pkg.vcs.path}"))
            continue
        if pkg.directory is not None:
            lock.skipped.append(Skipped(f"{name}@{version}", f"local path {pkg.directory.path}"))
            continue
        files: list[PackageWheel | PackageSdist | PackageArchive]
        files = [*(pkg.wheels or ()), *([pkg.sdist] if pkg.sdist else []), *([pkg.archive] if pkg.archive else [])]
        for f in files:
            url = f.url
            if not url:
                lock.skipped.append(Skipped(f"{name}@{version}", f"local path {f.path}"))
                continue
            filename = getattr(f, "name", None) or url_basename(url)
            hashed(lock, name, version, url, "pypi", _best(dict(f.hashes)), None, filename)
