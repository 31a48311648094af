"""Block files on disk, sharded like kubo's flatfs (`next-to-last/2`).

A block lives at `blocks/<shard>/<base32 CID>`, where the shard is the two characters before the last
character of the CID string. Writes go to `tmp/` and are renamed into place, so a reader never sees a
half-written block under its final name. Durability is batched: callers write many blocks, then call
`barrier()` once (syncfs on the repo's file system) before they commit anything that refers to them.
A block file is trusted only once the index has a row for it; files without one are garbage that
`verify` reports and `gc` removes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import itertools
from pathlib import Path
from typing import Iterator

from ..content.cid import CID
from ..errors import CorruptData, DiskFull, InvalidCID, NotFound, RepoError

_libc = None


def _syncfs(fd: int) -> None:
    """Flush the file system holding `fd` (Linux syncfs); fall back to a global sync elsewhere."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name, use_errno=True) if name else False
    if _libc and hasattr(_libc, "syncfs"):
        if _libc.syncfs(fd) == 0:
            return
    os.sync()


def disk_error(e: OSError, where: Path | str) -> Exception:
    """Turn an OSError from a write into the error a user should see."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"disk full while writing {where}: free space or shrink the repo with `p2pcache gc --max-size`")
    return RepoError(f"cannot write {where}: {e.strerror or e}")


class BlockFiles:
    def __init__(self, root: Path):
        self.root = root
        self.blocks = root / "blocks"
        self.tmp = root / "tmp"
        self._blocks_str = str(self.blocks)
        self._tmp_str = str(self.tmp)
        # Temp names only need to be unique among live writers: pid + object + counter.
        self._tmp_prefix = f"{os.getpid()}-{id(self):x}-"
        self._counter = itertools.count()

    def create_dirs(self) -> None:
        """Create blocks/, all 1024 shard directories, and tmp/ (so writes never pay for a mkdir)."""
        self.blocks.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        alphabet = "abcdefghijklmnopqrstuvwxyz234567"
        for a in alphabet:
            for b in alphabet:
                (self.blocks / (a + b)).mkdir(exist_ok=True)

    @staticmethod
    def shard(name: str) -> str:
        return name[-3:-1]

    def path(self, cid: CID) -> Path:
        name = str(cid)
        return self.blocks / self.shard(name) / name

    def path_str(self, cid: CID) -> str:
        name = str(cid)
        return f"{self._blocks_str}/{name[-3:-1]}/{name}"

    def write(self, cid: CID, data: bytes | memoryview) -> None:
        """Write a block atomically (temp file + rename). Durable only after `barrier()`."""
        final = self.path_str(cid)
        tmp = f"{self._tmp_str}/{self._tmp_prefix}{next(self._counter)}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
            finally:
                os.close(fd)
            try:
                os.rename(tmp, final)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(final), exist_ok=True)
                os.rename(tmp, final)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise disk_error(e, final) from None

    def read(self, cid: CID, verify: bool = True) -> bytes:
        try:
            with open(self.path_str(cid), "rb", buffering=0) as f:
                data = f.readall()
        except FileNotFoundError:
            raise NotFound(f"block {cid} is missing from the repo; run `p2pcache verify --repair`") from None
        if verify and not cid.verify(data):
            raise CorruptData(f"block {cid} is corrupt on disk; run `p2pcache verify --repair`")
        return data

    def exists(self, cid: CID) -> bool:
        return self.path(cid).exists()

    def remove(self, cid: CID) -> None:
        try:
            self.path(cid).unlink()
        except FileNotFoundError:
            pass

    def barrier(self) -> None:
        """Flush every block file written so far to disk (one syncfs of the repo's file system)."""
        try:
            fd = os.open(self.root, os.O_RDONLY)
            try:
                _syncfs(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise disk_error(e, self.root) from None

    def scan(self) -> Iterator[tuple[Path, CID | None]]:
        """Every file under blocks/, with its CID (None when the name is not a valid CID)."""
        if not self.blocks.exists():
            return
        for shard in sorted(os.scandir(self.blocks), key=lambda e: e.name):
            if not shard.is_dir():
                yield Path(shard.path), None
                continue
            for entry in sorted(os.scandir(shard.path), key=lambda e: e.name):
                try:
                    cid = CID.parse(entry.name)
                    ok = str(cid) == entry.name and self.shard(entry.name) == shard.name
                except InvalidCID:
                    ok = False
                yield Path(entry.path), (cid if ok else None)

    def temp_files(self) -> list[Path]:
        return sorted(self.tmp.iterdir()) if self.tmp.exists() else []
