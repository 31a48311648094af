"""poetry.lock, with tomllib: `[[package]]` with `files = [{file, hash}]`. The lock file names files
but no URLs: each is looked up by name in a PEP 503/691 simple index (`--index-url`, or
`--registry pypi=URL`), or the `source.url` of a package from an explicit legacy source. Git, directory,
file and url sources are skipped (no index file to verify against)."""

from __future__ import annotations

from ._toml import tables
from .hashes import parse_prefixed
from .model import LockFile, Registries, Skipped, hashed


def parse(path: str, text: str, registries: Registries, lock: LockFile) -> None:
    for pkg in tables(path, text):
        name, version = str(pkg.get("name", "")), str(pkg.get("version", ""))
        source = pkg.get("source") or {}
        stype = source.get("type")
        if stype == "git":
            lock.skipped.append(Skipped(f"{name}@{version}", f"git dependency {source.get('url')}"))
            continue
        if stype in ("directory", "file", "url"):
            lock.skipped.append(Skipped(f"{name}@{version}", f"{stype} source {source.get('url')}"))
            continue
        index = source.get("url") if stype == "legacy" else registries.pypi
        files = pkg.get("files") or []
        if not files:
            lock.skipped.append(Skipped(f"{name}@{version}", "no files in the lock file"))
        for f in files:
            fname, h = f.get("file"), f.get("hash")
            if not fname or not h:
                continue
            hashed(lock, name, version, None, "pypi", parse_prefixed, h, fname, index_url=index)
