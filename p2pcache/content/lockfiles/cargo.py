"""Cargo.lock (versions 3 and 4), with tomllib.

`checksum` is the sha256 of the `.crate` file. Its URL comes from the registry's `dl` template (the
`dl` key of the registry index's config.json), given as `--registry cargo=TEMPLATE`: `{crate}`,
`{version}`, `{prefix}`, `{lowerprefix}` and `{sha256-checksum}` are replaced; a template with none of
them gets `/{crate}/{version}/download` appended, as Cargo does. Git and path dependencies are skipped.
"""

from __future__ import annotations

from ._toml import tables
from .hashes import from_hex
from .model import LockFile, Registries, Skipped, hashed

_MARKERS = ("{crate}", "{version}", "{prefix}", "{lowerprefix}", "{sha256-checksum}")


def crate_prefix(name: str) -> str:
    """The index directory of a crate: 1, 2, 3/a, ab/cd (Cargo's `{prefix}`)."""
    if len(name) <= 2:
        return str(len(name))
    if len(name) == 3:
        return f"3/{name[0]}"
    return f"{name[:2]}/{name[2:4]}"


def dl_url(template: str, name: str, version: str, checksum: str) -> str:
    if not any(m in template for m in _MARKERS):
        template = template.rstrip("/") + "/{crate}/{version}/download"
    prefix = crate_prefix(name)
    return (template.replace("{crate}", name).replace("{version}", version).replace("{prefix}", prefix)
            .replace("{lowerprefix}", prefix.lower()).replace("{sha256-checksum}", checksum))


def parse(path: str, text: str, registries: Registries, lock: LockFile) -> None:
    for pkg in tables(path, text):
        name, version = str(pkg.get("name", "")), str(pkg.get("version", ""))
        source = pkg.get("source")
        if source is None:
            lock.skipped.append(Skipped(f"{name}@{version}", "path or workspace crate (local path)"))
            continue
        if source.startswith("git+"):
            lock.skipped.append(Skipped(f"{name}@{version}", f"git dependency {source}"))
            continue
        checksum = pkg.get("checksum")
        if not checksum:
            lock.skipped.append(Skipped(f"{name}@{version}", "no checksum in the lock file"))
            continue
        url = dl_url(registries.cargo, name, version, checksum) if registries.cargo else None
        hashed(lock, name, version, url, "cargo", lambda c: from_hex("sha256", c), checksum, f"{name}-{version}.crate")
