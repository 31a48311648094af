"""A local saver's block uploads to the running daemon: the request bodies' framing and the upload sink.

Owns the CLI's half of `POST /api/v0/cache/files`, `/api/v0/blocks` and `/api/v0/blocks/missing` (the
daemon's half chunks and hashes the files itself, `buildcache.ingest_files`, and unframes the block bodies
and re-hashes every block, `buildcache.BuildCache.accept_blocks`). File contents go up raw, in one streamed
body per batch of files, each file as FILE_HEADER (its size) and then its bytes: the daemon cuts and hashes
them once, so the bytes are hashed once per save (not by the CLI for the CIDs and again by the daemon to
check them), and no block travels as a request of its own. Kept apart from the build
cache service so the `cache` commands do not load the service (p2pcache.buildcache, its trust policy and
its trio machinery) when a daemon runs: a CLI call is a new process each time, and its imports are part of
every save's and restore's time. (trio itself still comes in through httpcore, which imports it if present.)
"""

from __future__ import annotations

import os
import struct
import threading
from concurrent.futures import Future
from typing import Any, Iterable

from .content.cid import CID
from .errors import InvalidInput, RepoError

__all__ = ["FILE_HEADER", "DaemonBlockSink", "FileSocket", "allow_open_files", "frame_blocks", "frame_cids", "open_for_upload",
           "unframe_blocks", "unframe_cids"]


# -- block uploads from a local saver -----------------------------------------------------------------------

FILE_HEADER = struct.Struct(">Q")  # a file's size in a file upload, before its bytes
# the daemon's file socket (`p2pcache.filesocket`): a message's length before it; descriptors per request
SOCKET_LENGTH = struct.Struct(">I")
SOCKET_MAX_FDS = 250  # Linux takes at most 253 in one message
# Requests a saver sends over one connection before the first of them is answered: the daemon reads the next
# while it ingests one (no round trip between two requests); their descriptors are held in flight meanwhile.
SOCKET_AHEAD = 2


def allow_open_files(n: int = 4096) -> None:
    """Raise this process's soft limit of open descriptors to `n` (at most the hard limit): a save's requests
    in flight hold up to `SOCKET_AHEAD` x `SOCKET_MAX_FDS` descriptors per connection, on both ends (in flight
    they count against the sender's limit), and a common soft limit is 1,024."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n if hard == resource.RLIM_INFINITY else min(n, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass  # then requests fail with the kernel's own error, as before


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


def open_for_upload(full: bytes) -> int:
    """`full` opened for reading, never through a symlink; RepoError (one line) if it cannot be."""
    try:
        return os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise RepoError(f"cannot read {os.fsdecode(full)}: {e.strerror}") from None


class DaemonBlockSink:
    """A save's blocks uploaded to the running daemon, which re-hashes each before storing it.

    The uploads run on `threads` background threads (at most `depth` batches queued): a batch of files goes
    up as one streamed body the daemon chunks and answers with the files' bodies; for a batch of blocks
    (the tree's pages) the thread asks which the daemon lacks and sends only those. The saver keeps walking
    and building the tree meanwhile. Every request names the save's upload lease (opened at the first
    request), which keeps the daemon's gc off the blocks until `cache save` claims them; `close()` waits for
    the last batch and re-raises the first error."""

    def __init__(self, client: Any, depth: int = 2, threads: int = 2):
        self.client = client
        self.depth = depth
        self.threads = threads
        self.q: Any = None
        self.workers: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.lease: str | None = None
        self.new_blocks = 0
        self.new_bytes = 0
        self._local = threading.local()
        self._sockets: list[FileSocket] = []

    def open_lease(self) -> str:
        """The save's upload lease (opened at the first call): from then on, no gc in the daemon takes a
        block that is there, until the save claims it or the lease lapses."""
        if self.lease is None:
            self.lease = self.client.cache_upload_lease()
        return self.lease


    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            blocks, pieces, fut = item
            if self.error is not None:
                if fut is not None:
                    fut.set_exception(self.error)
                continue
            try:
                if fut is not None:
                    length, body = pieces
                    sock = self._file_socket()
                    files = getattr(body, "files", None)  # a `buildtree.FilePieces`: the paths and sizes
                    if sock is not None and files is not None:
                        got = sock.upload(files, self.lease)
                    else:
                        got = self.client.cache_files(body, length, self.lease)
                    new = (got["new_blocks"], got["new_bytes"])
                    fut.set_result(got["bodies"])
                else:
                    lacking = self.client.blocks_missing(frame_cids([c for c, _ in blocks]), self.lease)
                    todo = [blocks[i] for i in lacking]
                    if todo:
                        self.client.put_blocks(frame_blocks(todo), self.lease)
                    new = (len(todo), sum(len(d) for _, d in todo))
                with self.lock:
                    self.new_blocks += new[0]
                    self.new_bytes += new[1]
            except BaseException as e:
                self.error = e
                if fut is not None:
                    fut.set_exception(e)

    def _file_socket(self) -> "FileSocket | None":
        """This upload thread's connection to the daemon's file socket (`p2pcache.filesocket`), if the
        daemon offers one and it accepts a connection; else None (the HTTP API)."""
        local = self._local
        if not hasattr(local, "sock"):
            local.sock = None
            path = self.client.info.get("files_socket")
            auth = self.client.http.headers.get("authorization", "")
            if isinstance(path, str) and auth.startswith("Bearer "):
                try:
                    local.sock = FileSocket(path, auth.removeprefix("Bearer "))
                except OSError:
                    pass  # gone, or not ours to use: the HTTP API says why if that fails too
                else:
                    with self.lock:
                        self._sockets.append(local.sock)
        return local.sock

    def missing(self, cids: list[CID]) -> set[CID]:
        if self.error is not None:
            raise self.error
        return {cids[i] for i in self.client.blocks_missing(frame_cids(cids), self.open_lease())}

    def offer(self, blocks: list[tuple[CID, bytes]]) -> None:
        self._queue((blocks, None, None))

    def files(self, length: int, pieces: Iterable[bytes]) -> "Future[list]":
        """Upload files' contents (`length` bytes in FILE_HEADER framing; `pieces` is read on an upload
        thread, so the files are read there too) for the daemon to chunk and store; the future is their
        bodies, in order."""
        fut: Future[list] = Future()
        self._queue(([], (length, pieces), fut))
        return fut

    def _queue(self, item: tuple) -> None:
        if self.error is not None:
            raise self.error
        if not self.workers:
            import queue

            self.open_lease()  # before any block goes up
            self.q = queue.Queue(maxsize=self.depth)
            # Two requests at a time (two connections): the daemon works on one body while the next streams.
            self.workers = [threading.Thread(target=self._run, daemon=True, name=f"cache-upload-{i}")
                            for i in range(self.threads)]
            for t in self.workers:
                t.start()
        self.q.put(item)

    def close(self) -> tuple[int, int]:
        """Wait for the uploads in flight (a later `offer` starts again); re-raise the first error; (new
        blocks, new bytes) since the last close. The lease stays open for the save that follows."""
        if self.workers:
            for _ in self.workers:
                self.q.put(None)
            for t in self.workers:
                t.join()
            self.workers = []
        sockets, self._sockets = self._sockets, []
        self._local = threading.local()
        try:
            if self.error is None:
                for sock in sockets:  # what the daemon holds for each connection is recorded before the save
                    sock.commit(self.lease)
        except BaseException as e:
            self.error = e
        finally:
            for sock in sockets:  # the workers' connections to the file socket went with them
                sock.close()
        if self.error is not None:
            raise self.error
        out = (self.new_blocks, self.new_bytes)
        self.new_blocks = self.new_bytes = 0
        return out


class FileSocket:
    """The saver's half of the daemon's file socket (`p2pcache.filesocket`, whose docstring has the wire
    format and why): files go to the daemon as descriptors this process opened, `MAX_FDS` to a request."""

    def __init__(self, path: str, token: str):
        import socket

        allow_open_files()
        self.token = token
        self.held = False  # the daemon holds blocks of ours that wait for `commit`
        self.broken = False  # an answer or a send failed: the connection is out of step
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise

    def upload(self, files: list[tuple[bytes, int]], lease: str | None) -> dict:
        """`DaemonClient.cache_files`' answer for `files` ((path, the size its stat said)), in requests of
        `MAX_FDS` files, up to `SOCKET_AHEAD` of them sent before the first is answered. The daemon holds
        their blocks for this connection's `commit` (a daemon that predates holding records each request
        and says nothing of it; then `commit` has nothing to do)."""
        bodies: list = []
        new_blocks = new_bytes = 0
        parts = [files[i:i + SOCKET_MAX_FDS] for i in range(0, len(files), SOCKET_MAX_FDS)]
        sent = answered = 0
        try:
            while answered < len(parts):
                while sent < len(parts) and sent - answered < SOCKET_AHEAD:
                    self._send(parts[sent], lease)
                    sent += 1
                answer = self._answer()
                answered += 1
                if "error" in answer:
                    raise (InvalidInput if answer.get("status") == 400 else RepoError)(str(answer["error"]))
                if answer.get("held") is True:
                    self.held = True
                bodies += answer["bodies"]
                new_blocks += answer["new_blocks"]
                new_bytes += answer["new_bytes"]
        except BaseException:
            self.broken = True  # answers of requests sent are still on the way (or the daemon ends the connection)
            raise
        return {"bodies": bodies, "new_blocks": new_blocks, "new_bytes": new_bytes}

    def commit(self, lease: str | None) -> None:
        """Have the daemon record the blocks this connection's uploads hold (before the save claims them)."""
        if not self.held:
            return
        self._send_message({"token": self.token, "lease": lease, "commit": True}, [])
        answer = self._answer()
        if "error" in answer:
            raise RepoError(str(answer["error"]))
        self.held = False

    def _send(self, part: list[tuple[bytes, int]], lease: str | None) -> None:
        fds: list[int] = []
        try:
            for full, _ in part:
                fds.append(open_for_upload(full))
            self._send_message({"token": self.token, "lease": lease, "hold": True, "sizes": [n for _, n in part],
                                "names": [full for full, _ in part]}, fds)
        finally:
            for fd in fds:  # in flight now: the daemon holds its own copies
                os.close(fd)

    def _send_message(self, msg_map: dict, fds: list[int]) -> None:
        import array
        import socket

        from .content import dagcbor

        if self.broken:
            raise RepoError("the daemon's file socket failed an earlier upload of this save")
        msg = dagcbor.encode(msg_map)
        data = SOCKET_LENGTH.pack(len(msg)) + msg
        try:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            sent = self.sock.sendmsg([data], ancillary)
            if sent < len(data):
                self.sock.sendall(data[sent:])
        except OSError as e:
            self.broken = True
            raise RepoError(f"the daemon's file socket did not take the upload: {e.strerror or e}") from None

    def _answer(self) -> dict:
        from .content import dagcbor

        head = self._exactly(SOCKET_LENGTH.size)
        # An answer, not a block: its canonical form names nothing, so it is not re-encoded to check it.
        got = dagcbor.decode(self._exactly(SOCKET_LENGTH.unpack(head)[0]), recheck=False)
        if not (isinstance(got, dict) and ("error" in got or isinstance(got.get("bodies"), list)
                                           or got.get("committed") is True)):
            raise RepoError("the daemon's file socket sent a malformed answer")
        return got

    def _exactly(self, n: int) -> bytes:

        buf = bytearray()
        while len(buf) < n:
            try:
                data = self.sock.recv(n - len(buf))
            except OSError as e:
                raise RepoError(f"the daemon's file socket broke off an upload: {e.strerror or e}") from None
            if not data:
                raise RepoError("the daemon closed its file socket in the middle of an upload")
            buf += data
        return bytes(buf)

    def close(self) -> None:
        self.sock.close()
