"""The daemon's file socket, `REPO/files.sock`: a local saver hands the daemon its build files as open
file descriptors (SCM_RIGHTS) instead of streaming their bytes over the HTTP API.

Why: a save through the HTTP API reads every file in the CLI, sends it over loopback TCP and receives it
in the daemon (h11, hypercorn, trio: a kernel copy and two user copies on each side) before the daemon's
ingest hashes it. With a descriptor the daemon reads the file itself, once, with pread, on the ingest's
worker thread (`buildtree.fd_pieces` into `buildcache.ingest_files`).

Trust: the daemon reads only descriptors the caller opened, with the caller's own permissions, and never
opens a path a caller names (a path travels only for error lines). So a caller gets nothing its own
permissions would not give it: a file it may not read it cannot open, and so cannot pass. Who may use the
socket at all is who may use the HTTP API: every request carries the API token (`REPO/api.token`), checked
in constant time; the socket file itself is 0600, like the token. A descriptor must be a regular file of
the size the request states, read to the end (a file that changed while it was read fails the upload, as
over HTTP); a descriptor opened for writing only fails with the read's own error line.

Wire format: a request is a 4-byte big-endian length and a dag-cbor map {"token", "lease" (or null), "sizes":
[...], "names": [...], "hold" (optional)}, sent in one `sendmsg` with one descriptor per size (at most
`MAX_FDS`); the answer is a 4-byte length and a dag-cbor map, either the HTTP route's answer ({"bodies",
"new_blocks", "new_bytes"}, and "held": true for a request that asked to hold) or {"error": one line,
"status": 400|401|500}. A saver may send its next requests before the answers come (up to
`cacheupload.SOCKET_AHEAD`); they are read while the one before is ingested and answered in order. With
"hold", the blocks go into the connection's one ingest (`buildcache.FileUploadSession`) and are recorded
when the saver sends {"token", "lease", "commit": true} (no descriptors; answered {"committed": true})
before it claims its root; a connection that ends first has its held blocks taken back. A held request
that fails ends the connection after its error answer.

Must not: open a path, keep a descriptor past its request, or answer before the token is checked.
"""

from __future__ import annotations

import array
import hmac
import logging
import os
import socket
from pathlib import Path
from typing import Any, Callable, Protocol

import trio

from .cacheupload import SOCKET_AHEAD as AHEAD  # requests read (descriptors held) while one is ingested
from .cacheupload import SOCKET_LENGTH as LENGTH
from .cacheupload import allow_open_files
from .cacheupload import SOCKET_MAX_FDS as MAX_FDS
from .content import dagcbor
from .errors import InvalidInput, MalformedBlock, P2PCacheError

__all__ = ["FILE_SOCKET", "MAX_FDS", "MAX_REQUEST", "serve_file_socket"]

log = logging.getLogger(__name__)

FILE_SOCKET = "files.sock"
MAX_REQUEST = 1 << 20  # bytes of one request's map (names are at most a few hundred bytes each)

class Session(Protocol):
    """A connection's uploads (`buildcache.FileUploadSession`)."""
    async def add(self, files: list[tuple[int, int, bytes]], lease: str | None, hold: bool) -> dict: ...
    async def commit(self, lease: str | None) -> dict: ...
    async def close(self) -> None: ...


async def serve_file_socket(repo_path: Path, token: str, open_session: Callable[[], Session], *,
                            task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on `REPO/files.sock` until cancelled; each connection's requests go to a session of its own
    (`open_session()`: `add(files, lease, hold)` ingests a request's files ((fd, size, name) each)). Started with None when the socket cannot be made (a path too long for a
    Unix socket, say): savers then use the HTTP API."""
    path = repo_path / FILE_SOCKET
    allow_open_files()  # each connection's requests read ahead hold their descriptors
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            path.unlink()  # a stale socket of a daemon that did not stop cleanly (the repo lock says we own it)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            await listener.bind(str(path))
        finally:
            os.umask(old)
        listener.listen(16)
    except OSError as e:
        listener.close()
        log.warning("build cache: no file socket at %s (%s); saves go through the HTTP API", path, e)
        task_status.started(None)
        return
    try:
        task_status.started(path)
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(_serve, conn, token, open_session)
    finally:
        listener.close()
        try:
            path.unlink()
        except OSError:
            pass


async def _serve(conn: Any, token: str, open_session: Callable[[], Session]) -> None:
    session = open_session()
    ahead, requests = trio.open_memory_channel[tuple[bytes, list[int]]](AHEAD - 1)
    try:
        with conn:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_read_requests, conn, ahead)
                async with requests:
                    async for payload, fds in requests:
                        try:
                            answer, go_on = await _answer(payload, fds, token, session)
                        finally:
                            _close(fds)
                        data = dagcbor.encode_built(answer)  # ours: ingest_files' bodies, counts, an error line
                        try:
                            await _send_all(conn, LENGTH.pack(len(data)) + data)
                        except OSError as e:  # the saver went away
                            log.debug("file socket: connection ended: %s", e)
                            go_on = False
                        if not go_on:
                            nursery.cancel_scope.cancel()
                            break
                    for _, fds in _drain(requests):  # read ahead, never answered
                        _close(fds)
    finally:
        await session.close()


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    fds.clear()


def _drain(channel: Any) -> list[tuple[bytes, list[int]]]:
    out = []
    while True:
        try:
            out.append(channel.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return out


async def _read_requests(conn: Any, ahead: Any) -> None:
    """Read requests (and their descriptors) into `ahead` until the saver ends the connection."""
    async with ahead:
        while True:
            fds: list[int] = []
            try:
                payload = await _read_request(conn, fds)
                if payload is None:
                    return
                await ahead.send((payload, fds))
                fds = []  # the channel's now
            except OSError as e:  # the saver went away, or broke the format
                log.debug("file socket: connection ended: %s", e)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            finally:
                _close(fds)


async def _answer(payload: bytes, fds: list[int], token: str, session: Session) -> tuple[dict, bool]:
    try:
        req = dagcbor.decode(payload)
    except MalformedBlock as e:
        return {"error": f"file socket: malformed request ({e})", "status": 400}, False
    if not (isinstance(req, dict) and isinstance(req.get("token"), str)
            and hmac.compare_digest(req["token"].encode(), token.encode())):
        return {"error": "file socket: wrong or missing API token", "status": 401}, False
    sizes, names, lease, hold = req.get("sizes"), req.get("names"), req.get("lease"), req.get("hold") is True
    if req.get("commit") is True and not fds and (lease is None or isinstance(lease, str)):
        try:
            return await session.commit(lease), True
        except P2PCacheError as e:
            return {"error": str(e), "status": 500}, False
    if not (isinstance(sizes, list) and isinstance(names, list) and len(sizes) == len(names) == len(fds)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes)
            and all(isinstance(n, bytes) for n in names) and (lease is None or isinstance(lease, str))):
        return {"error": f"file socket: a request needs one size and name per descriptor ({len(fds)} came)",
                "status": 400}, False
    try:
        return await session.add(list(zip(fds, sizes, names)), lease, hold), True
    except InvalidInput as e:  # after a held request's error the session holds nothing: the saver starts again
        return {"error": str(e), "status": 400}, not hold
    except P2PCacheError as e:
        return {"error": str(e), "status": 500}, not hold


async def _read_request(conn: Any, fds: list[int]) -> bytes | None:
    """One request's map (None at a clean end); its descriptors are appended to `fds`."""
    buf = bytearray()
    need = LENGTH.size
    while len(buf) < need:
        # exactly what this request still owes: the next request's descriptors come with its first byte
        data, ancdata, flags, _ = await conn.recvmsg(need - len(buf),
                                                     socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize))
        for level, kind, raw in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(raw[: len(raw) - len(raw) % got.itemsize])
                fds.extend(got)
        if flags & socket.MSG_CTRUNC:
            raise OSError("file socket: more descriptors than a request may carry")
        if not data:
            if buf:
                raise OSError("file socket: the request was cut off")
            return None
        buf += data
        if need == LENGTH.size and len(buf) >= LENGTH.size:
            (n,) = LENGTH.unpack_from(buf)
            if n > MAX_REQUEST:
                raise OSError(f"file socket: a {n}-byte request is over the {MAX_REQUEST}-byte limit")
            need = LENGTH.size + n
    if len(fds) > MAX_FDS:
        raise OSError("file socket: more descriptors than a request may carry")
    return bytes(buf[LENGTH.size:need])


async def _send_all(conn: Any, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await conn.send(view):]
