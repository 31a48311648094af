"""Dedup as a user sees it: `p2pcache add` (the real CLI, in a subprocess) of 10 consecutive sdists into
a fresh repo; stored block bytes (chunks + manifests) / logical bytes, beside `casync make --store` on
the same files. bench/dedup.py has the full parameter grid and the uncompressed-tar figures."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from corpus import corpus_paths  # noqa: E402
from dedup import parse_caibx  # noqa: E402


def casync_store_bytes(files: list[Path], work: Path) -> tuple[int, int] | None:
    """(unique uncompressed chunk bytes, on-disk store bytes) for casync's default chunker."""
    if not shutil.which("casync"):
        return None
    store = work / "castore"
    for i, f in enumerate(files):
        subprocess.run(["casync", "make", f"--store={store}", str(work / f"{i}.caibx"), str(f)],
                       check=True, capture_output=True)
    on_disk = sum(p.stat().st_size for p in store.rglob("*.cacnk"))
    sizes: dict[bytes, int] = {}
    for i in range(len(files)):
        for length, chunk_id in parse_caibx(work / f"{i}.caibx"):
            sizes[chunk_id] = length
    return sum(sizes.values()), on_disk


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="same corpus (it is small); kept for run_all")
    ap.add_argument("--corpus", default="pygments")
    args = ap.parse_args()
    files = corpus_paths(args.corpus)
    work = Path(tempfile.mkdtemp(prefix="p2pcache-dedup-"))
    try:
        env = dict(os.environ, P2PCACHE_REPO=str(work / "repo"), P2PCACHE_FSYNC="0")
        proc = subprocess.run([sys.executable, "-m", "p2pcache", "add", "--json", *map(str, files)],
                              env=env, capture_output=True, text=True, check=True)
        added = [json.loads(x) for x in proc.stdout.splitlines()]
        logical = sum(a["size"] for a in added)
        from p2pcache.store.repo import Repo

        with Repo.open(work / "repo") as repo:
            stored = repo.stored_bytes()
            blocks = repo.index.block_count()
        on_disk = sum(p.stat().st_blocks * 512 for p in (work / "repo" / "blocks").rglob("*") if p.is_file())
        print(f"{args.corpus}: {len(files)} files, {logical / 1e6:.1f} MB logical", file=sys.stderr)
        print(f"  p2pcache add: stored {stored / 1e6:.2f} MB = {stored / logical:.3f} of logical, "
              f"{blocks} blocks, {on_disk / 1e6:.2f} MB on disk", file=sys.stderr)
        out = {"bench": "dedup", "corpus": args.corpus, "files": len(files), "logical_bytes": logical}
        print(json.dumps({**out, "metric": "p2pcache_add_stored_over_logical", "value": round(stored / logical, 4),
                          "unit": "fraction", "better": "lower", "blocks": blocks}))
        cas = casync_store_bytes(files, work)
        if cas:
            uniq, disk = cas
            print(f"  casync make:  stored {uniq / 1e6:.2f} MB = {uniq / logical:.3f} of logical "
                  f"(zstd store on disk {disk / 1e6:.2f} MB)", file=sys.stderr)
            print(json.dumps({**out, "metric": "casync_stored_over_logical", "value": round(uniq / logical, 4),
                              "unit": "fraction", "better": "lower", "store_on_disk": disk}))
            print(json.dumps({**out, "metric": "p2pcache_vs_casync_stored", "value": round(stored / uniq, 4),
                              "unit": "ratio", "better": "lower"}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
