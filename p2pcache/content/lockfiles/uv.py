"""uv.lock, with tomllib: every `sdist` and `wheels[]` file of each `[[package]]` (`url`, `hash`
`sha256:<hex>`). Git, path, directory, editable and virtual sources have no archive: skipped."""

from __future__ import annotations

from ._toml import tables
from .hashes import parse_prefixed
from .model import LockFile, Registries, Skipped, hashed, url_basename

_LOCAL = ("path", "directory", "editable", "virtual")


def parse(path: str, text: str, registries: Registries, lock: LockFile) -> None:
    for pkg in tables(path, text):
        name, version = str(pkg.get("name", "")), str(pkg.get("version", ""))
        source = pkg.get("source") or {}
        if "git" in source:
            lock.skipped.append(Skipped(f"{name}@{version}", f"git dependency {source['git']}"))
            continue
        local = next((k for k in _LOCAL if k in source), None)
        if local:
            lock.skipped.append(Skipped(f"{name}@{version}", f"{local} source {source[local]} (local path)"))
            continue
        files = ([pkg["sdist"]] if "sdist" in pkg else []) + list(pkg.get("wheels", []))
        if not files:
            lock.skipped.append(Skipped(f"{name}@{version}", "no sdist or wheel in the lock file"))
        for f in files:
            url = f.get("url")
            if not url or not f.get("hash"):
                lock.skipped.append(Skipped(f"{name}@{version}", "a file without url or hash"))
                continue
            hashed(lock, name, version, url, "pypi", parse_prefixed, f["hash"], url_basename(url))
