"""The machine's own Nix store as a read-only `NarReader` (store/interfaces.py): NARs serialised from the store
directory, narinfo from Nix's SQLite database. The Nix cache's lookup chain reads it as `nixcache.NixStoreSource`.

Owns reading `<state>/nix/var/nix/db/db.sqlite` (tables ValidPaths and Refs) through a read-only SQLite
connection (`mode=ro`), so a request never runs a Nix command. Without a readable database the store can still
tell which paths exist and stream their NARs, but `narinfo` returns None: a narinfo without the true references
would let Nix accept a path whose dependencies it never fetches. Every NAR served is hashed as it streams and
checked against the database's NarHash, the last piece withheld until it matched (`VerifiedStream`): a store
path modified on disk is never served whole.

It never writes to the store and builds nothing.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from typing import Iterator

from ..content.narinfo import NarInfo
from ..content.narmanifest import VerifiedStream
from ..content.nixhash import InvalidNixHash
from ..content.nixhash import parse as parse_hash
from ..content.storepath import DEFAULT_STORE_DIR, HASH_PART_LEN, InvalidStorePath, StorePath
from ..content import nixbase32
from ..errors import CorruptData, NotFound
from .nixstore import dump_path

__all__ = ["LocalNixStore"]


def _valid_hash_part(store_hash: str) -> bool:
    return len(store_hash) == HASH_PART_LEN and all(c in nixbase32.ALPHABET for c in store_hash)


class LocalNixStore:
    """`store_dir` is the logical store directory (what store paths say); `real_store_dir` where it lies on
    disk (different for a chroot store made with `--store DIR`); `db_path` Nix's database, if readable."""

    def __init__(self, store_dir: str = DEFAULT_STORE_DIR, *, real_store_dir: str | os.PathLike | None = None,
                 db_path: str | os.PathLike | None = "/nix/var/nix/db/db.sqlite"):
        self.store_dir = store_dir
        self.real_store_dir = Path(real_store_dir if real_store_dir is not None else store_dir)
        self.db_path = Path(db_path) if db_path is not None else None
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self.db_error: str | None = None
        self._open_db()

    @classmethod
    def chroot(cls, root: str | os.PathLike, store_dir: str = DEFAULT_STORE_DIR) -> "LocalNixStore":
        """The store Nix makes with `--store ROOT`: files under ROOT/nix/store, database under ROOT/nix/var."""
        root = Path(root)
        return cls(store_dir, real_store_dir=root / store_dir.lstrip("/"),
                   db_path=root / "nix" / "var" / "nix" / "db" / "db.sqlite")

    def _open_db(self) -> None:
        if self.db_path is None:
            self.db_error = "no database configured"
            return
        try:
            uri = f"{self.db_path.resolve().as_uri()}?mode=ro"
            db = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=10)
            db.execute("SELECT id, path, hash, deriver, narSize, sigs, ca FROM ValidPaths LIMIT 0")
            db.execute("SELECT referrer, reference FROM Refs LIMIT 0")
        except (sqlite3.Error, OSError) as e:
            self.db_error = f"cannot read the Nix database {self.db_path}: {e}"
            return
        self._db = db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- lookups -------------------------------------------------------------------------------------
    def _row(self, store_hash: str) -> tuple | None:
        if self._db is None or not _valid_hash_part(store_hash):
            return None
        # Store paths sort by their hash part first: a range scan on the unique path index finds it.
        prefix = f"{self.store_dir}/{store_hash}-"
        with self._lock:
            return self._db.execute(
                "SELECT id, path, hash, deriver, narSize, sigs, ca FROM ValidPaths WHERE path >= ? AND path < ? "
                "LIMIT 1", (prefix, prefix[:-1] + ".")).fetchone()

    def _path_on_disk(self, store_hash: str) -> tuple[StorePath, Path] | None:
        """Without a database: find `<hash>-*` in the store directory (one listing per call)."""
        if not _valid_hash_part(store_hash):
            return None
        try:
            with os.scandir(self.real_store_dir) as it:
                for entry in it:
                    if entry.name.startswith(store_hash + "-") and not entry.name.endswith(".lock"):
                        try:
                            return StorePath.from_base_name(entry.name, self.store_dir), Path(entry.path)
                        except InvalidStorePath:
                            continue
        except OSError:
            return None
        return None

    def _real(self, store_path: StorePath) -> Path:
        return self.real_store_dir / store_path.base_name

    def has(self, store_hash: str) -> bool:
        if self._db is not None:
            row = self._row(store_hash)
            return row is not None and os.path.lexists(self._real(StorePath.parse(row[1])))
        return self._path_on_disk(store_hash) is not None

    def narinfo(self, store_hash: str) -> NarInfo | None:
        row = self._row(store_hash)
        if row is None:
            return None
        path_id, path, hash_text, deriver, nar_size, sigs, ca = row
        store_path = StorePath.parse(path, self.store_dir)
        if not os.path.lexists(self._real(store_path)):
            return None
        try:
            nar_hash = parse_hash(hash_text)
        except InvalidNixHash as e:
            raise CorruptData(f"Nix database entry for {path} has a bad hash: {e}") from None
        with self._lock:
            assert self._db is not None  # _row just found the path in it
            refs = sorted(StorePath.parse(r, self.store_dir).base_name for (r,) in self._db.execute(
                "SELECT v.path FROM Refs r JOIN ValidPaths v ON v.id = r.reference WHERE r.referrer = ?",
                (path_id,)))
        if nar_size is None:  # very old databases; Nix fills it in on upgrade
            return None
        return NarInfo(
            store_path=store_path,
            url=f"nar/{nar_hash.nix32(prefixed=False)}.nar",
            nar_hash=nar_hash,
            nar_size=nar_size,
            compression="none",
            file_hash=nar_hash,
            file_size=nar_size,
            references=tuple(refs),
            deriver=StorePath.parse(deriver, self.store_dir).base_name if deriver else None,
            sigs=tuple(sigs.split()) if sigs else (),
            ca=ca or None,
        )

    def stream_nar(self, store_hash: str) -> Iterator[bytes]:
        """The path's NAR, dumped from disk. With the database, checked against its NarHash (last piece held)."""
        info = self.narinfo(store_hash)
        if info is not None:
            pieces = dump_path(self._real(info.store_path))
            check = VerifiedStream(info.nar_hash.algo, info.nar_hash.digest, info.nar_size,
                                   f"NAR of {info.store_path} in the local Nix store")
            return check.wrap(pieces)
        found = self._path_on_disk(store_hash) if self._db is None else None
        if found is None:
            raise NotFound(f"store path hash {store_hash} is not valid in the Nix store {self.store_dir}")
        return dump_path(found[1])
