"""`p2pcache migrate`: convert a format-1 repo (one file per block under blocks/XY/<cid>) to format 2 (pack
files) in place, crash-safely and resumably.

Owns the one-way conversion; must not be needed by anything else (Repo.open refuses format 1 with one line
naming this command). The order, per batch of up to 32 MiB of blocks:

1. read the block files and re-hash each against its CID (a corrupt or missing one is dropped and its roots
   become incomplete, as `verify --repair` would);
2. append the good ones to a pack and flush it;
3. one index transaction points their rows (pack NULL until now) at the records;
4. only then unlink the files.

`version` says "2-migrating" from the first step to the last, so format-1 code refuses the half-converted repo
and this code resumes it: rows still without a pack are the work left; files of rows that already have one
are leftovers of an interrupted step 4 and go at the end, with blocks/ and tmp/.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..content.cid import CID
from ..errors import RepoError
from .repo import MIGRATING_VERSION, REPO_VERSION, Repo, write_version

BATCH_BYTES = 32 << 20


@dataclass
class MigrateReport:
    from_version: str
    blocks_moved: int = 0
    blocks_dropped: int = 0  # corrupt or missing in the format-1 repo
    bytes_moved: int = 0

    def to_json(self) -> dict:
        return {"from_version": self.from_version, "blocks_moved": self.blocks_moved,
                "blocks_dropped": self.blocks_dropped, "bytes_moved": self.bytes_moved}


def _block_file(root: Path, cid: CID) -> Path:
    name = str(cid)
    return root / "blocks" / name[-3:-1] / name


def migrate(path: Path | str, progress: Callable[[int, int], None] | None = None,
            durable: bool | None = None) -> MigrateReport:
    """Convert the repo at `path` to format 2; a no-op on a format-2 repo. `progress(done, total)` per batch."""
    path = Path(path)
    try:
        found = (path / "version").read_text().strip()
    except FileNotFoundError:
        raise RepoError(f"no p2pcache repo at {path}; nothing to migrate") from None
    report = MigrateReport(found)
    if found == REPO_VERSION:
        return report
    if found not in ("1", MIGRATING_VERSION):
        raise RepoError(f"repo {path} has format version {found!r}; this p2pcache migrates format 1 only")
    repo = Repo(path, writable=True, durable=durable)  # takes the lock first: a running daemon blocks this
    try:
        if found == "1":
            write_version(path, MIGRATING_VERSION)
        index = repo.index
        total = index.count_unmigrated()
        done = 0
        while True:
            rows = index.unmigrated(4096)
            if not rows:
                break
            good: list[tuple[CID, bytes]] = []
            bad: list[CID] = []
            size = 0
            for cid, n in rows:
                if size >= BATCH_BYTES:
                    break
                try:
                    data = _block_file(path, cid).read_bytes()
                except OSError:
                    bad.append(cid)
                    continue
                if len(data) != n or not cid.verify(data):
                    bad.append(cid)
                    continue
                good.append((cid, data))
                size += n
            written = repo.packs.append(good)
            repo.flush()
            with index.transaction():
                index.set_locations(written)
                for cid in bad:
                    index.drop_block(cid)
            repo.blocks_committed(written)
            for cid in [c for c, _ in good] + bad:
                try:
                    _block_file(path, cid).unlink()
                except FileNotFoundError:
                    pass
            report.blocks_moved += len(good)
            report.blocks_dropped += len(bad)
            report.bytes_moved += size
            done += len(good) + len(bad)
            if progress:
                progress(done, total)
        for leftover in ("blocks", "tmp"):
            shutil.rmtree(path / leftover, ignore_errors=True)
        write_version(path, REPO_VERSION)
    except OSError as e:
        from .blockstore import disk_error

        raise disk_error(e, path) from None
    finally:
        repo.close()
    return report


def needs_migration(path: Path | str) -> bool:
    try:
        return (Path(path) / "version").read_text().strip() in ("1", MIGRATING_VERSION)
    except OSError:
        return False


