"""package-lock.json / npm-shrinkwrap.json, lockfileVersion 2 and 3 (the `packages` map), with json.

Each `packages["node_modules/…/name"]` entry with a tarball `resolved` URL and an SRI `integrity`
(sha512, or sha1 in old locks) is one dependency. `link: true` (workspaces, `file:` directories) and
`inBundle: true` (shipped inside the parent's tarball) have no tarball of their own; git and `file:`
specs are not registry tarballs: all are listed as skipped with the reason.
"""

from __future__ import annotations

import json
from typing import Any

from .hashes import parse_sri
from .model import LockFile, LockParseError, Registries, Skipped, hashed, url_basename

_GIT = ("git+", "git:", "github:", "gitlab:", "bitbucket:")


def registry_tarball(registry: str, name: str, version: str) -> str:
    """The npm registry's tarball URL: `<registry>/<name>/-/<unscoped name>-<version>.tgz`."""
    return f"{registry.rstrip('/')}/{name}/-/{name.rsplit('/', 1)[-1]}-{version}.tgz"


def parse(path: str, text: str, registries: Registries, lock: LockFile) -> None:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise LockParseError(path, e.msg, e.lineno, e.colno) from None
    if not isinstance(doc, dict):
        raise LockParseError(path, "not a JSON object")
    version = doc.get("lockfileVersion")
    packages = doc.get("packages")
    if version not in (2, 3) or not isinstance(packages, dict):
        raise LockParseError(path, f"lockfileVersion {version!r} without a `packages` map; only versions 2 and 3 "
                                   "are read (regenerate it with npm 7 or later)")
    seen: set[tuple[Any, ...]] = set()
    for key, entry in packages.items():
        if key == "" or not isinstance(entry, dict):
            continue
        name = entry.get("name") or key.rsplit("node_modules/", 1)[-1]
        ver = str(entry.get("version", ""))
        resolved = entry.get("resolved")
        if "node_modules/" not in key and not key.startswith("node_modules"):
            lock.skipped.append(Skipped(name, f"workspace package at {key} (local path)"))
            continue
        if entry.get("link"):
            lock.skipped.append(Skipped(name, f"link to {resolved or 'a local directory'}"))
            continue
        if entry.get("inBundle"):
            lock.skipped.append(Skipped(f"{name}@{ver}", "bundled inside its parent's tarball"))
            continue
        if isinstance(resolved, str) and resolved.startswith(_GIT):
            lock.skipped.append(Skipped(f"{name}@{ver}", f"git dependency {resolved}"))
            continue
        if isinstance(resolved, str) and resolved.startswith("file:"):
            lock.skipped.append(Skipped(f"{name}@{ver}", f"local path {resolved}"))
            continue
        if not resolved and registries.npm and ver:
            resolved = registry_tarball(registries.npm, name, ver)
        integrity = entry.get("integrity")
        if not integrity:
            lock.skipped.append(Skipped(f"{name}@{ver}", "no integrity hash in the lock file"))
            continue
        ident = (name, ver, resolved, integrity)
        if ident in seen:
            continue
        seen.add(ident)
        filename = url_basename(resolved) if resolved else f"{name.rsplit('/', 1)[-1]}-{ver}.tgz"
        hashed(lock, name, ver, resolved or None, "npm", parse_sri, integrity, filename)
