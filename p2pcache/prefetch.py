"""Lock-file prefetch: every pinned dependency of a lock file made local — the repo, else the swarm (by
the dependency's own hash), else its origin URL — each verified against the lock file's hash before
anything is recorded, then recorded under that hash too and announced.

Owns: the per-dependency lookup chain, verification of every hash kind a lock file uses (sha1, sha256,
sha384, sha512, Go's `h1:` dirhash), bounded parallelism, de-duplication of dependencies that share a
hash, and the outcome of each (local / peer / origin / failed with a one-line reason) and their summary.

Must not: speak HTTP itself (the origin and the swarm are handed in as `Origin` and `Swarm`), import
node.py, or trust a peer: bytes that arrive from a peer are hashed here — the whole archive against the
lock file's hash and against the sha256/sha512 its manifest claims — before the root is registered.
An origin that serves wrong bytes fails that entry and records nothing, so the next run tries again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, BinaryIO, Callable, Iterator, Protocol, cast

import trio

from .content.cid import CID
from .content.gomod import gomod_hash, zip_hash
from .content.keys import HashKey
from .content.lockfiles import Dependency, DepHash
from .content.manifest import ArchiveManifest, iter_chunks
from .errors import CorruptData, InvalidInput, NotFound, OriginError, P2PCacheError
from .store.repo import Repo

__all__ = ["Origin", "Outcome", "Prefetcher", "Summary", "Swarm", "dependency_from_json", "dependency_to_json"]

log = logging.getLogger(__name__)

EventFn = Callable[[dict], None]


class Swarm(Protocol):
    async def fetch_blocks(self, alias: str, claim: Callable[[CID], Awaitable[object]]) -> CID:
        """Store the blocks of the archive a peer holds under `alias` (each verified against its CID)
        without registering its root, then `claim(root)` while no gc can take them as unclaimed (it
        checks the whole and registers the root); NotFound if no peer has it."""
        ...


class Origin(Protocol):
    def stream(self, url: str) -> AsyncIterator[bytes]: ...
    async def find_in_index(self, index_url: str, project: str, filename: str) -> str: ...


@dataclass
class Outcome:
    dependency: Dependency
    source: str | None = None  # "local", "peer", "origin"; None: failed
    root: str | None = None
    size: int = 0
    failure: str | None = None  # "hash mismatch", "origin 404", "origin error", "no URL", "unknown hash"
    message: str | None = None

    def to_json(self) -> dict:
        d = self.dependency
        return {"name": d.name, "version": d.version, "kind": d.kind, "url": d.url,
                "hash": str(d.hash) if d.hash else None, "source": self.source, "root": self.root,
                "size": self.size, "failure": self.failure, "message": self.message}


@dataclass
class Summary:
    total: int = 0
    local: int = 0
    peer: int = 0
    origin: int = 0
    failed: int = 0
    skipped: int = 0
    bytes: dict[str, int] = field(default_factory=lambda: {"local": 0, "peer": 0, "origin": 0})

    def add(self, outcome: Outcome) -> None:
        if outcome.source is None:
            self.failed += 1
        else:
            setattr(self, outcome.source, getattr(self, outcome.source) + 1)
            self.bytes[outcome.source] += outcome.size

    def to_json(self) -> dict:
        return {"total": self.total, "local": self.local, "peer": self.peer, "origin": self.origin,
                "failed": self.failed, "skipped": self.skipped, "bytes": dict(self.bytes)}


def dependency_to_json(d: Dependency) -> dict:
    return {"name": d.name, "version": d.version, "url": d.url, "kind": d.kind, "filename": d.filename,
            "error": d.error, "index_url": d.index_url,
            "hash": [d.hash.algo, d.hash.digest.hex()] if d.hash else None}


def dependency_from_json(j: Any) -> Dependency:
    """A dependency as the CLI sends it to the daemon; InvalidInput for anything malformed."""
    from .content.lockfiles.hashes import SIZES

    try:
        h = j.get("hash")
        dep_hash = None
        if h is not None:
            algo, hexdigest = h
            if algo not in SIZES or len(bytes.fromhex(hexdigest)) != SIZES[algo]:
                raise ValueError(f"bad hash {h!r}")
            dep_hash = DepHash(algo, bytes.fromhex(hexdigest))
        strs = {k: j.get(k) for k in ("url", "filename", "error", "index_url")}
        if not all(v is None or isinstance(v, str) for v in strs.values()):
            raise ValueError("url, filename, error and index_url must be strings or null")
        if not all(isinstance(j.get(k), str) for k in ("name", "version", "kind")):
            raise ValueError("name, version and kind must be strings")
        return Dependency(j["name"], j["version"], strs["url"], dep_hash, j["kind"], strs["filename"],
                          strs["error"], strs["index_url"])
    except (AttributeError, TypeError, ValueError) as e:
        raise InvalidInput(f"malformed dependency in the prefetch request: {e}") from None


# -- verification (blocking; runs in worker threads) -------------------------------------------------
class _Check:
    """Hashes a stream against a lock-file hash; `finish()` raises CorruptData on a mismatch."""

    def __init__(self, dep: Dependency, tmp_dir: str):
        assert dep.hash is not None
        self.dep, self.want = dep, dep.hash
        self.zip = None
        if dep.kind == "go-zip":  # a dirhash needs the whole zip: spool it (not recorded) first
            self.zip = tempfile.NamedTemporaryFile(dir=tmp_dir, prefix="prefetch-", suffix=".zip")
            self.h = None
        else:
            self.h = hashlib.new("sha256" if self.want.algo == "h1" else self.want.algo)

    def update(self, buf: bytes) -> None:
        if self.zip is not None:
            self.zip.write(buf)
        else:
            assert self.h is not None  # set whenever zip is not
            self.h.update(buf)

    def finish(self) -> None:
        if self.zip is not None:
            self.zip.flush()
            self.zip.seek(0)
            try:
                got = zip_hash(cast(BinaryIO, self.zip))  # a binary temporary file
            except InvalidInput as e:
                raise CorruptData(f"{self.dep.label}: {e}") from None
        elif self.want.algo == "h1":  # go.mod: a one-file dirhash; update() saw the file's bytes
            assert self.h is not None
            got = _summary_of_gomod(self.h.digest())
        else:
            assert self.h is not None
            got = self.h.digest()
        if got != self.want.digest:
            raise CorruptData(f"the bytes hash to {DepHash(self.want.algo, got)}, the lock file says {self.want}")

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


def _summary_of_gomod(file_sha256: bytes) -> bytes:
    return hashlib.sha256(f"{file_sha256.hex()}  go.mod\n".encode()).digest()


def _checked(pieces: Iterator[bytes], check: _Check) -> Iterator[bytes]:
    """Pass pieces through; after the last one, fail (before the consumer records anything) on a mismatch."""
    for piece in pieces:
        check.update(piece)
        yield piece
    check.finish()


def _native_key(h: DepHash) -> HashKey | None:
    return HashKey(h.algo, h.digest) if h.algo in ("sha256", "sha512") else None


class Prefetcher:
    """Makes dependencies local. `swarm` None: repo and origin only (the CLI without a daemon)."""

    def __init__(self, repo: Repo, origin: Origin, swarm: Swarm | None = None,
                 announce: Callable[[CID], None] | None = None):
        self.repo = repo
        self.origin = origin
        self.swarm = swarm
        self.announce = announce or (lambda root: None)
        # spooled module zips: beside the repo (same file system), never recorded; made on first use
        self.tmp_dir = str(repo.path / "tmp")
        os.makedirs(self.tmp_dir, exist_ok=True)

    async def run(self, deps: list[Dependency], jobs: int = 8, on_event: EventFn | None = None,
                  skipped: int = 0) -> tuple[list[Outcome], Summary]:
        """Fetch every dependency, at most `jobs` at once; `on_event` gets one `entry` event per
        dependency as it finishes, with the progress so far (`done` of `of`, bytes `fetched`).
        Outcomes are in the order of `deps`."""
        emit = on_event or (lambda e: None)
        summary = Summary(total=len(deps), skipped=skipped)
        outcomes: list[Outcome | None] = [None] * len(deps)
        limiter = trio.CapacityLimiter(max(1, jobs))
        shared: dict[str, tuple[trio.Event, list[Outcome]]] = {}
        done = [0, 0]

        async def one(i: int, dep: Dependency) -> None:
            alias = dep.hash.alias if dep.hash and not dep.error else None
            if alias is not None and alias in shared:  # another entry of the same file: fetched once
                event, box = shared[alias]
                await event.wait()
                first = box[0]
                outcome = Outcome(dep, first.source and "local", first.root, first.size, first.failure, first.message)
            else:
                if alias is not None:
                    shared[alias] = (trio.Event(), [])
                async with limiter:
                    outcome = await self.fetch(dep)
                if alias is not None:
                    shared[alias][1].append(outcome)
                    shared[alias][0].set()
            outcomes[i] = outcome
            summary.add(outcome)
            done[0] += 1
            done[1] += outcome.size if outcome.source in ("peer", "origin") else 0
            emit({"event": "entry", "index": i, **outcome.to_json(), "done": done[0], "of": len(deps),
                  "fetched": done[1]})

        async with trio.open_nursery() as nursery:
            for i, dep in enumerate(deps):
                nursery.start_soon(one, i, dep)
        return [o for o in outcomes if o is not None], summary

    async def fetch(self, dep: Dependency) -> Outcome:
        """One dependency: repo → swarm → origin. Never raises for the dependency's own failures."""
        if dep.error or dep.hash is None:
            return Outcome(dep, failure="unknown hash", message=dep.error or "no hash")
        alias = dep.hash.alias
        try:
            root = self.repo.index.resolve_alias(alias)
            if root is not None and self.repo.root_info(root).complete:
                return Outcome(dep, "local", str(root), self.repo.root_info(root).size)
            if self.swarm is not None:
                got = await self._from_swarm(dep)
                if got is not None:
                    return got
            return await self._from_origin(dep)
        except CorruptData as e:
            return Outcome(dep, failure="hash mismatch", message=str(e))
        except OriginError as e:
            return Outcome(dep, failure=f"origin {e.status}" if e.status else "origin error", message=str(e))
        except P2PCacheError as e:  # the repo's own trouble (disk full, …): this entry fails, the rest go on
            return Outcome(dep, failure="error", message=str(e))
        except OSError as e:  # e.g. the spool file for a module zip
            return Outcome(dep, failure="error", message=f"{type(e).__name__}: {e.strerror or e}")

    # -- the swarm ---------------------------------------------------------------------------------
    async def _from_swarm(self, dep: Dependency) -> Outcome | None:
        assert self.swarm is not None and dep.hash is not None
        sizes: list[int] = []

        async def claim(root: CID) -> None:  # inside the fetch's quota guard: no gc between the last block and this
            sizes.append(await trio.to_thread.run_sync(self._verify_fetched, dep, root))

        try:
            root = await self.swarm.fetch_blocks(dep.hash.alias, claim)
        except NotFound:
            return None
        except CorruptData as e:
            log.warning("a peer's copy of %s failed verification (%s); trying the origin", dep.label, e)
            return None
        except P2PCacheError as e:  # a peer failed us: the origin may still have it
            log.info("prefetch %s from the swarm failed: %s; trying the origin", dep.label, e)
            return None
        self.announce(root)
        return Outcome(dep, "peer", str(root), sizes[0])

    def _verify_fetched(self, dep: Dependency, root: CID) -> int:
        """Hash the bytes of an unregistered archive (its blocks are in the repo) against the lock
        file's hash and its manifest's own claims; register the root and its aliases only if all hold."""
        assert dep.hash is not None
        try:
            manifest = ArchiveManifest.decode(self.repo.load_block(root))
        except (P2PCacheError, OSError) as e:
            raise CorruptData(f"{root} is not a readable archive manifest: {e}") from None
        s256, s512 = hashlib.sha256(), hashlib.sha512()
        native = _native_key(dep.hash)
        check = None if native else _Check(dep, self.tmp_dir)
        try:
            size = 0
            for cid, _ in iter_chunks(manifest, self.repo.load_block):
                data = self.repo.load_block(cid)
                size += len(data)
                s256.update(data)
                s512.update(data)
                if check:
                    check.update(data)
            got = {"sha256": s256.digest(), "sha512": s512.digest()}
            claims = manifest.hashes  # sha256 always; sha512 only in some manifests
            if size != manifest.size or any(got[a] != d for a, d in claims.items() if a in got) \
                    or "sha256" not in claims:
                raise CorruptData(f"{root}: the bytes do not have the size and hashes its manifest claims")
            if native and got[native.algo] != native.digest:
                raise CorruptData(f"hash mismatch: a peer's {root} for {dep.label} is not {dep.hash}")
            if check:
                check.finish()
        finally:
            if check:
                check.close()
        self.repo.register_root(root)
        if not native or dep.hash.algo not in manifest.hashes:  # verified here, so recorded too
            self.repo.add_aliases(root, [dep.hash.alias])
        return size

    # -- the origin --------------------------------------------------------------------------------
    async def _from_origin(self, dep: Dependency) -> Outcome:
        assert dep.hash is not None
        url = dep.url
        if url is None and dep.index_url and dep.filename:
            url = await self.origin.find_in_index(dep.index_url, dep.name, dep.filename)
        if url is None:
            why = ("no peer has it and berry's checksum cannot verify a registry tarball"
                   if dep.kind == "yarn-berry" else "no peer has it and the lock file gives no URL; "
                   "configure the registry (--registry KIND=URL / --index-url)")
            return Outcome(dep, failure="no URL", message=why)
        from .aio import feed_thread

        name = dep.filename.rsplit("/", 1)[-1] if dep.filename else url.rstrip("/").rsplit("/", 1)[-1]
        native = _native_key(dep.hash)
        if native:
            result = await feed_thread(self.origin.stream(url),
                                       lambda it: self.repo.add_stream(it, name=name, expect=native))
        else:
            result = await feed_thread(self.origin.stream(url), lambda it: self._add_checked(it, dep, name))
        self.announce(result.root)
        return Outcome(dep, "origin", str(result.root), result.size)

    def _add_checked(self, pieces: Iterator[bytes], dep: Dependency, name: str) -> Any:
        assert dep.hash is not None
        check = _Check(dep, self.tmp_dir)
        try:
            if check.zip is not None:  # spool, verify, then add: nothing is recorded before the check
                for piece in _checked(pieces, check):
                    pass
                result = self.repo.add_file(check.zip.name, name=name)
            else:
                result = self.repo.add_stream(_checked(pieces, check), name=name)
        finally:
            check.close()
        self.repo.add_aliases(result.root, [dep.hash.alias])
        return result
