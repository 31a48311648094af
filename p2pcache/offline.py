"""Offline layouts of prefetched dependencies, in the shapes the package managers read with no network.

Owns writing, from the repo, under one output directory:

| dir              | for                      | how the tool is pointed at it |
|------------------|--------------------------|-------------------------------|
| `npm-cache/`     | npm (package-lock.json)  | `npm ci --offline --cache DIR/npm-cache` (a cacache content store: npm finds a tarball by its `integrity`) |
| `yarn-offline-mirror/` | yarn v1            | `yarn-offline-mirror "DIR/yarn-offline-mirror"` in `.yarnrc`, then `yarn install --offline` |
| `pypi/`          | pip, uv                  | `pip install --no-index --find-links DIR/pypi`, `uv pip install --offline --find-links DIR/pypi` |
| `goproxy/`       | go (go.sum)              | `GOPROXY=file://DIR/goproxy GOFLAGS=-mod=mod go mod download` |
| `cargo-vendor/`  | cargo (Cargo.lock)       | `[source.crates-io] replace-with = "vendored-sources"`, `[source.vendored-sources] directory = "DIR/cargo-vendor"` |
| `gems/`          | Bundler                  | copy to `vendor/cache`, `bundle install --local` |

Must not: fetch anything; every file comes out of the repo through `Repo.get_to_file` (verified as it is
written). Files are written atomically, so a layout interrupted half-way holds only whole files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

from .content.cid import CID
from .content.lockfiles import Dependency
from .errors import InvalidInput
from .store.repo import Repo

__all__ = ["write_layout"]

_NPM_KINDS = ("npm", "pnpm", "yarn")


def _safe_rel(rel: str) -> str:
    parts = [p for p in rel.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise InvalidInput(f"refusing to write {rel!r} outside the output directory")
    return "/".join(parts)


def _write(repo: Repo, root: CID, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and target.stat().st_size == repo.root_info(root).size:
        return
    repo.get_to_file(root, target)


def _cacache_path(out: Path, dep: Dependency) -> Path:
    assert dep.hash is not None
    hexd = dep.hash.digest.hex()
    return out / "npm-cache" / "_cacache" / "content-v2" / dep.hash.algo / hexd[:2] / hexd[2:4] / hexd[4:]


def _yarn_mirror_name(dep: Dependency) -> str:
    # yarn v1 names offline-mirror files after the tarball's URL: `@scope-name-1.0.0.tgz` for scoped ones
    base = (dep.filename or f"{dep.name.rsplit('/', 1)[-1]}-{dep.version}.tgz")
    return f"{dep.name.split('/')[0]}-{base}" if dep.name.startswith("@") else base


def _vendor_crate(repo: Repo, root: CID, dep: Dependency, out: Path) -> None:
    """Unpack a .crate into `cargo-vendor/<name>-<version>/` with the `.cargo-checksum.json` cargo checks."""
    assert dep.hash is not None
    if "/" in dep.name or "/" in dep.version or dep.name.startswith("."):
        raise InvalidInput(f"crate {dep.label!r}: not a crate name and version; refusing to write it")
    dest = out / "cargo-vendor" / f"{dep.name}-{dep.version}"
    if (dest / ".cargo-checksum.json").exists():
        return
    data = b"".join(repo.stream(root))  # crates are small (crates.io caps them at 10 MiB)
    prefix = f"{dep.name}-{dep.version}/"
    files: dict[str, str] = {}
    tmp = dest.with_name(dest.name + ".part")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            if not member.name.startswith(prefix):
                raise InvalidInput(f"{dep.label}: .crate member {member.name!r} is outside {prefix}")
            if member.isfile():
                content = tar.extractfile(member).read()  # type: ignore[union-attr]
                files[member.name[len(prefix):]] = hashlib.sha256(content).hexdigest()
        tar.extractall(tmp, filter="data")
    (tmp / prefix / ".cargo-checksum.json").write_text(
        json.dumps({"files": files, "package": dep.hash.digest.hex()}, sort_keys=True))
    os.replace(tmp / prefix, dest)
    os.rmdir(tmp)


def write_layout(repo: Repo, items: list[tuple[Dependency, CID]], out: Path) -> dict[str, int]:
    """Write each (dependency, root) into its layout under `out`; returns files written per layout."""
    counts: dict[str, int] = {}
    versions: dict[str, set[str]] = {}

    def count(layout: str) -> None:
        counts[layout] = counts.get(layout, 0) + 1

    for dep, root in items:
        if dep.kind in _NPM_KINDS and dep.hash is not None:
            _write(repo, root, _cacache_path(out, dep))
            count("npm-cache")
            if dep.kind == "yarn":
                _write(repo, root, out / "yarn-offline-mirror" / _safe_rel(_yarn_mirror_name(dep)))
                count("yarn-offline-mirror")
        elif dep.kind == "pypi" and dep.filename:
            _write(repo, root, out / "pypi" / _safe_rel(dep.filename.rsplit("/", 1)[-1]))
            count("pypi")
        elif dep.kind in ("go-zip", "go-mod") and dep.filename:
            target = out / "goproxy" / _safe_rel(dep.filename)
            _write(repo, root, target)
            vdir = target.parent
            (vdir / f"{target.stem}.info").write_text(json.dumps({"Version": dep.version}))
            versions.setdefault(str(vdir), set()).add(dep.version)
            count("goproxy")
        elif dep.kind == "cargo":
            _vendor_crate(repo, root, dep, out)
            count("cargo-vendor")
        elif dep.kind == "gem" and dep.filename:
            _write(repo, root, out / "gems" / _safe_rel(dep.filename))
            count("gems")
    for vdir_text, vs in versions.items():
        (Path(vdir_text) / "list").write_text("".join(f"{v}\n" for v in sorted(vs)))
    return counts
