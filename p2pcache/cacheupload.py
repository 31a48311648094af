"""A local saver's block uploads to the running daemon: the request bodies' framing and the upload sink.

Owns the CLI's half of `POST /api/v0/blocks` and `/api/v0/blocks/missing` (the daemon's half unframes the
same bodies and re-hashes every block: `buildcache.BuildCache.accept_blocks`). Kept apart from the build
cache service so the `cache` commands do not load the service (p2pcache.buildcache, its trust policy and
its trio machinery) when a daemon runs: a CLI call is a new process each time, and its imports are part of
every save's and restore's time. (trio itself still comes in through httpcore, which imports it if present.)
"""

from __future__ import annotations

import threading
from typing import Any

from .content.cid import CID
from .errors import InvalidInput

__all__ = ["DaemonBlockSink", "frame_blocks", "frame_cids", "unframe_blocks", "unframe_cids"]


# -- block uploads from a local saver -----------------------------------------------------------------------


def frame_blocks(blocks: list[tuple[CID, bytes]]) -> bytes:
    """The body of a block upload: (varint, binary CID, varint, bytes) per block."""
    from .content import varint

    parts = []
    for cid, data in blocks:
        raw = cid.buffer
        parts += [varint.encode(len(raw)), raw, varint.encode(len(data)), data]
    return b"".join(parts)


def unframe_blocks(body: bytes) -> list[tuple[CID, bytes]]:
    """Blocks from an upload body; InvalidInput on anything malformed (each block is re-hashed later)."""
    from .content import varint

    out = []
    pos = 0
    view = memoryview(body)
    try:
        while pos < len(body):
            n, pos = varint.decode(view, pos)
            cid = CID.decode(bytes(view[pos:pos + n]))
            pos += n
            n, pos = varint.decode(view, pos)
            if pos + n > len(body):
                raise InvalidInput("block upload: truncated block")
            out.append((cid, bytes(view[pos:pos + n])))
            pos += n
    except (ValueError, IndexError) as e:
        raise InvalidInput(f"block upload: malformed body ({e})") from None
    return out


def frame_cids(cids: list[CID]) -> bytes:
    from .content import varint

    return b"".join(varint.encode(len(c.buffer)) + c.buffer for c in cids)


def unframe_cids(body: bytes) -> list[CID]:
    from .content import varint

    out, pos, view = [], 0, memoryview(body)
    try:
        while pos < len(body):
            n, pos = varint.decode(view, pos)
            out.append(CID.decode(bytes(view[pos:pos + n])))
            pos += n
    except (ValueError, IndexError) as e:
        raise InvalidInput(f"block list: malformed body ({e})") from None
    return out


class DaemonBlockSink:
    """A save's blocks uploaded to the running daemon, which re-hashes each before storing it.

    The upload runs on a background thread (at most `depth` batches queued): for each batch it asks which
    blocks the daemon lacks and sends only those, so the saver keeps reading and chunking and never waits
    on a round trip. Every request names the save's upload lease (opened at the first request), which keeps
    the daemon's gc off the blocks until `cache save` claims them; `close()` waits for the last batch and
    re-raises the first error."""

    def __init__(self, client: Any, depth: int = 2):
        self.client = client
        self.depth = depth
        self.q: Any = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.lease: str | None = None
        self.new_blocks = 0
        self.new_bytes = 0

    def open_lease(self) -> str:
        """The save's upload lease (opened at the first call): from then on, no gc in the daemon takes a
        block that is there, until the save claims it or the lease lapses."""
        if self.lease is None:
            self.lease = self.client.cache_upload_lease()
        return self.lease


    def _run(self) -> None:
        while True:
            blocks = self.q.get()
            if blocks is None:
                return
            if self.error is None:
                try:
                    lacking = self.client.blocks_missing(frame_cids([c for c, _ in blocks]), self.open_lease())
                    todo = [blocks[i] for i in lacking]
                    if todo:
                        self.client.put_blocks(frame_blocks(todo), self.open_lease())
                    self.new_blocks += len(todo)
                    self.new_bytes += sum(len(d) for _, d in todo)
                except BaseException as e:
                    self.error = e

    def missing(self, cids: list[CID]) -> set[CID]:
        if self.error is not None:
            raise self.error
        return {cids[i] for i in self.client.blocks_missing(frame_cids(cids), self.open_lease())}

    def offer(self, blocks: list[tuple[CID, bytes]]) -> None:
        if self.error is not None:
            raise self.error
        if self.thread is None:
            import queue

            self.open_lease()  # before any block goes up
            self.q = queue.Queue(maxsize=self.depth)
            self.thread = threading.Thread(target=self._run, daemon=True, name="cache-upload")
            self.thread.start()
        self.q.put(blocks)

    def close(self) -> tuple[int, int]:
        """Wait for the uploads in flight (a later `offer` starts again); re-raise the first error; (new
        blocks, new bytes) since the last close. The lease stays open for the save that follows."""
        if self.thread is not None:
            self.q.put(None)
            self.thread.join()
            self.thread = None
        if self.error is not None:
            raise self.error
        out = (self.new_blocks, self.new_bytes)
        self.new_blocks = self.new_bytes = 0
        return out
