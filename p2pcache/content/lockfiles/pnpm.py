"""pnpm-lock.yaml, lockfileVersion 9, with PyYAML's safe loader.

`packages["name@version"].resolution` is `{integrity}` for a registry package (the tarball URL is derived
from the configured npm registry), `{integrity, tarball}` for a tarball URL, or `{type: git|directory}`
(skipped). pnpm ≥ 11 may write two YAML documents into the file (the first for pnpm's own
`packageManagerDependencies`); the packages of every document are read.
"""

from __future__ import annotations

import yaml

from .hashes import parse_sri
from .model import LockFile, LockParseError, Registries, Skipped, hashed, url_basename
from .npm import registry_tarball
from .yarn import yaml_parse_error


def _split_key(key: str) -> tuple[str, str]:
    key = key.lstrip("/")
    # peer-dependency suffixes: `name@1.0.0(react@18.0.0)`
    base = key.split("(", 1)[0]
    at = base.rfind("@")
    if at <= 0:
        return base, ""
    return base[:at], base[at + 1:]


def parse(path: str, text: str, registries: Registries, lock: LockFile) -> None:
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise yaml_parse_error(path, e) from None
    if not docs or not all(isinstance(d, dict) for d in docs):
        raise LockParseError(path, "not a YAML mapping")
    versions = {str(d.get("lockfileVersion")) for d in docs if "lockfileVersion" in d}
    if not versions or not all(v.split(".")[0] == "9" for v in versions):
        raise LockParseError(path, f"lockfileVersion {', '.join(sorted(versions)) or 'missing'}; only 9.x is read")
    for doc in docs:
        for key, entry in (doc.get("packages") or {}).items():
            name, version = _split_key(str(key))
            res = (entry or {}).get("resolution") or {}
            rtype = res.get("type")
            if rtype in ("git", "directory") or "repo" in res or "directory" in res:
                what = "git dependency " + str(res.get("repo", "")) if rtype == "git" or "repo" in res else \
                       f"local path {res.get('directory')}"
                lock.skipped.append(Skipped(f"{name}@{version}", what))
                continue
            tarball = res.get("tarball")
            if isinstance(tarball, str) and tarball.startswith("file:"):
                lock.skipped.append(Skipped(f"{name}@{version}", f"local path {tarball}"))
                continue
            integrity = res.get("integrity")
            if not integrity:
                lock.skipped.append(Skipped(f"{name}@{version}", "no integrity hash in the lock file"))
                continue
            if version.startswith(("http:", "https:")):  # `name@https://…` keys
                version = str(entry.get("version", ""))
            url = tarball or (registry_tarball(registries.npm, name, version) if registries.npm else None)
            filename = url_basename(url) if url else f"{name.rsplit('/', 1)[-1]}-{version}.tgz"
            hashed(lock, name, version, url, "pnpm", parse_sri, integrity, filename)
