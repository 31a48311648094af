"""Real-world corpora for the dedup benchmark: consecutive releases from PyPI.

Files are fetched straight from the URLs listed by PyPI's JSON API
(``https://pypi.org/pypi/<name>/json``) with urllib and checked against the
sha256 digest PyPI publishes for each file.  We deliberately do not use
``pip download --no-binary :all:``: for an sdist pip installs the build
backend into an isolated environment and runs it to prepare metadata, i.e. it
executes code from the archive and needs more network than the file itself.

Downloads are cached under ``bench/.cache/corpus/`` (git-ignored).  A cached
file is re-hashed on every use, so a truncated or corrupted cache entry is
detected and fetched again.

Usage::

    .venv/bin/python bench/corpus.py [--corpus NAME] [--offline]

which prints one line per file (version, size, sha256, path).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Sequence

CACHE_DIR = Path(__file__).resolve().parent / ".cache" / "corpus"
PYPI_JSON = "https://pypi.org/pypi/{name}/json"
USER_AGENT = "p2pcache-bench/0 (dedup benchmark corpus fetcher)"


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """Ten consecutive releases of one project, one file kind per release."""

    key: str
    project: str
    versions: Sequence[str]
    packagetype: str  # "sdist" or "bdist_wheel"
    suffix: str  # filename suffix to select, e.g. ".tar.gz" or "-py3-none-any.whl"
    note: str = ""


# The versions are pinned (not "the latest ten") so that results are
# reproducible.  They are consecutive releases with nothing skipped.
CORPORA: Dict[str, CorpusSpec] = {
    spec.key: spec
    for spec in (
        # Default corpus: ~4.9 MB .tar.gz sdists built by hatchling, releases
        # spanning two years (minor and patch releases mixed).
        CorpusSpec(
            key="pygments",
            project="Pygments",
            versions=(
                "2.16.1", "2.17.0", "2.17.1", "2.17.2", "2.18.0",
                "2.19.0", "2.19.1", "2.19.2", "2.20.0", "2.21.0",
            ),
            packagetype="sdist",
            suffix=".tar.gz",
            note="hatchling-built sdists, consecutive releases 2.16.1..2.21.0",
        ),
        # A different shape: zip archives (wheels) of the same releases.  Zip
        # compresses every member on its own, so unchanged members stay
        # byte-identical between versions even in compressed form.
        CorpusSpec(
            key="pygments-wheel",
            project="Pygments",
            versions=(
                "2.16.1", "2.17.0", "2.17.1", "2.17.2", "2.18.0",
                "2.19.0", "2.19.1", "2.19.2", "2.20.0", "2.21.0",
            ),
            packagetype="bdist_wheel",
            suffix="-py3-none-any.whl",
            note="zip-shaped: wheels of the same releases",
        ),
        # Larger, patch-only series, setuptools-built sdists (~11 MB each).
        CorpusSpec(
            key="django",
            project="Django",
            versions=tuple(f"6.0.{i}" for i in range(1, 11)),
            packagetype="sdist",
            suffix=".tar.gz",
            note="setuptools-built sdists, patch releases 6.0.1..6.0.10",
        ),
    )
}

DEFAULT_CORPUS = "pygments"


@dataclasses.dataclass(frozen=True)
class CorpusFile:
    project: str
    version: str
    filename: str
    path: Path
    size: int
    sha256: str  # as published by PyPI, and verified against the local bytes


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _http_get(url: str, timeout: float = 60.0) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _select_file(doc: dict, spec: CorpusSpec, version: str) -> dict:
    files = doc.get("releases", {}).get(version)
    if not files:
        raise RuntimeError(f"{spec.project} {version}: no files on PyPI")
    cands = [
        f for f in files
        if f["packagetype"] == spec.packagetype and f["filename"].endswith(spec.suffix)
        and not f.get("yanked", False)
    ]
    if len(cands) != 1:
        names = [f["filename"] for f in files]
        raise RuntimeError(
            f"{spec.project} {version}: expected one {spec.packagetype} *{spec.suffix}, got {names}")
    return cands[0]


def fetch_corpus(key: str = DEFAULT_CORPUS, *, offline: bool = False,
                 log=None) -> List[CorpusFile]:
    """Return the corpus' local files (oldest release first), downloading if needed.

    Every file is verified against PyPI's published sha256; a mismatch raises.
    """
    spec = CORPORA[key]
    doc: Optional[dict] = None
    out: List[CorpusFile] = []
    for version in spec.versions:
        # Fast path: a cached file plus a cached index; no network.
        idx_path = CACHE_DIR / f"{spec.project.lower()}.json"
        if doc is None and idx_path.exists():
            doc = json.loads(idx_path.read_text())
        if doc is None or version not in doc.get("releases", {}):
            if offline:
                raise RuntimeError(f"offline and {spec.project} {version} not in cached index")
            data = _http_get(PYPI_JSON.format(name=spec.project))
            _atomic_write(idx_path, data)
            doc = json.loads(data)
        info = _select_file(doc, spec, version)
        want = info["digests"]["sha256"]
        path = CACHE_DIR / spec.project.lower() / info["filename"]
        if path.exists() and _sha256_file(path) == want:
            pass
        else:
            if offline:
                raise RuntimeError(f"offline and {path} missing or corrupt")
            # The JSON document may carry relative URLs (seen behind a
            # mirror); resolve them against the document's own URL.
            url = urllib.parse.urljoin(PYPI_JSON.format(name=spec.project), info["url"])
            if log:
                log(f"downloading {url}")
            data = _http_get(url)
            got = hashlib.sha256(data).hexdigest()
            if got != want:
                raise RuntimeError(
                    f"{info['filename']}: sha256 {got} does not match PyPI's {want}")
            _atomic_write(path, data)
        size = path.stat().st_size
        if size != info["size"]:
            raise RuntimeError(f"{info['filename']}: size {size} != PyPI's {info['size']}")
        out.append(CorpusFile(spec.project, version, info["filename"], path, size, want))
    return out


def corpus_paths(key: str = DEFAULT_CORPUS, *, offline: bool = False) -> List[Path]:
    """The local paths of the corpus' files, oldest release first."""
    return [f.path for f in fetch_corpus(key, offline=offline)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=DEFAULT_CORPUS, choices=sorted(CORPORA) + ["all"])
    ap.add_argument("--offline", action="store_true", help="use only the cache")
    args = ap.parse_args(argv)
    keys = sorted(CORPORA) if args.corpus == "all" else [args.corpus]
    for key in keys:
        files = fetch_corpus(key, offline=args.offline, log=lambda m: print(m, file=sys.stderr))
        total = sum(f.size for f in files)
        print(f"# {key}: {CORPORA[key].note}; {len(files)} files, {total} bytes, sha256 verified")
        for f in files:
            print(f"{f.version:10} {f.size:10d} {f.sha256} {f.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
