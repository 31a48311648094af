"""The node's local REST API, used by the CLI while a daemon owns the repo.

    GET  /api/v0/status            counts, bytes served/fetched, peer ID, addresses
    GET  /api/v0/peers             connected peers
    POST /api/v0/add?name=N  <bytes>       add the request body (application/octet-stream), then announce it
    POST /api/v0/fetch {"key"}             make KEY local: repo, else the swarm; then announce (NDJSON)
    POST /api/v0/fetch-url {"url", "hash"} the swarm if anyone has it, else the URL; verify, add, announce
    POST /api/v0/gc {"max_size"?}          gc in the daemon; evicted roots are withdrawn from the DHT
    POST /api/v0/pin, /api/v0/unpin {"key"}
    POST /api/v0/prefetch {"dependencies": [...], "jobs"}  lock-file dependencies: repo → swarm → origin,
                                   each verified; NDJSON `entry` events (batched), then `done` (summary)
    POST /api/v0/blocks/missing (binary)     which of these blocks (varint, binary CID)… the repo lacks: indices
    POST /api/v0/blocks (binary)             upload blocks (varint, CID, varint, bytes)…; each is re-hashed
    POST /api/v0/cache/lookup {"key", "restore_keys", "lookup_only", "paths_id"}   find (and fetch) a tree (NDJSON)
    POST /api/v0/cache/files  (size, bytes)…  a save's file contents: the daemon chunks and stores them (dag-cbor bodies back)
    POST /api/v0/cache/save {"key", "root", "force", "paths_id", "scan_time", "scan_digest"}  claim an uploaded tree, sign, announce
    POST /api/v0/cache/pin, /cache/unpin {"key"}; POST /api/v0/cache/keys, /cache/expire {}
    GET  /api/v0/cache/tar?key=K&restore_key=P…     a tree as a tar stream (builders with curl and tar: Nix)
    POST /api/v0/cache/tar?key=K&path=DIR…          save a tar stream's members under DIR… as K

Long operations answer NDJSON: `{"event": "progress", "bytes": n, "total": t}` lines, then one
`{"event": "done", ...}` or `{"event": "error", "message", "code"}` line. The API listens on loopback
only by default; every request passes `guard.check` first (Host, Origin, and the API token for
`/api/v0/*` and uploads). The daemon never opens a path a caller names: `add` takes the bytes in the
request body, read with the caller's own rights on the caller's side.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable, Protocol

import trio

from ..errors import InvalidInput, P2PCacheError, leaf_error
from . import guard
from .asgi import HTTPError, Receive, Scope, Send, read_body, read_json, send_bytes, send_error, send_json, send_ndjson

if TYPE_CHECKING:
    from ..buildcache import BuildCache
    from ..content.lockfiles import Dependency

ProgressFn = Callable[[int, int | None], None]
log = logging.getLogger(__name__)


class NodeAPI(Protocol):
    """What the REST API calls on the node (node.Node implements it; mypy checks that where node.py
    hands itself to `make_app`)."""

    def status(self) -> dict: ...
    def peers(self) -> list[dict]: ...
    async def add_stream(self, body: AsyncIterator[bytes], name: str | None) -> dict: ...
    async def fetch(self, key: str, progress: ProgressFn) -> dict: ...
    async def fetch_url(self, url: str, hash_text: str, progress: ProgressFn) -> dict: ...
    async def gc(self, max_size: int | None) -> dict: ...
    async def set_pinned(self, key: str, pinned: bool) -> dict: ...
    async def prefetch(self, deps: list[Dependency], jobs: int, on_event: Callable[[dict], None]) -> dict: ...
    async def http_fallback(self, scope: Scope, receive: Receive, send: Send) -> None: ...

    @property
    def buildcache(self) -> BuildCache | None: ...


def _bug_line(what: str, e: BaseException) -> str:
    """The one line a caller gets for a failure that is not one of our own errors (a bug): what failed,
    and where the traceback is."""
    return f"{what} failed with an internal error ({type(e).__name__}: {e}); the daemon's log has the traceback"


def _log_bug(what: str, e: BaseException) -> None:
    # The log formats keep one line per record: the traceback goes into the message ("|" between lines).
    log.error("%s failed with an internal error: %s", what, "".join(traceback.format_exception(e)).rstrip())


def _event_stream(run: Callable[[Callable[[dict], None]], Awaitable[dict]], batch: bool = False,
                  what: str = "the operation") -> AsyncIterator[dict]:
    """Run an operation that emits events (from trio or from a worker thread): yield them, then its
    outcome as a `done` or `error` event. With `batch`, events already waiting go out together as one
    `{"event": "batch", "events": [...]}` line (thousands of small events cost one write each otherwise)."""
    send_ch, recv_ch = trio.open_memory_channel[dict](math.inf)
    token = trio.lowlevel.current_trio_token()

    def emit(event: dict) -> None:
        try:
            trio.lowlevel.current_trio_token()
            send_ch.send_nowait(event)
        except RuntimeError:  # called from a worker thread
            token.run_sync_soon(send_ch.send_nowait, event)

    async def runner() -> None:
        async with send_ch:
            try:
                result = await run(emit)
                await send_ch.send({"event": "done", **result})
            except P2PCacheError as e:
                await send_ch.send({"event": "error", "message": str(e), "code": e.exit_code})
            except Exception as e:  # a group of our own errors, or a bug: still one clean last line
                leaf = leaf_error(e)
                if isinstance(leaf, P2PCacheError):
                    await send_ch.send({"event": "error", "message": str(leaf), "code": leaf.exit_code})
                    return
                _log_bug(what, e)
                await send_ch.send({"event": "error", "message": _bug_line(what, e), "code": 1})

    async def events() -> AsyncIterator[dict]:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner)
            async with recv_ch:
                async for event in recv_ch:
                    if not batch or event["event"] in ("done", "error"):
                        yield event
                        continue
                    group = [event]
                    while len(group) < 1000:
                        try:
                            group.append(recv_ch.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    last = group[-1] if group[-1]["event"] in ("done", "error") else None
                    if last is not None:
                        group.pop()
                    yield {"event": "batch", "events": group} if len(group) > 1 else group[0]
                    if last is not None:
                        yield last

    return events()


def _progress_stream(run: Callable[[ProgressFn], Awaitable[dict]], what: str = "the operation") -> AsyncIterator[dict]:
    """Run an operation, yielding throttled progress events and then its outcome."""
    last = [0.0]

    def with_progress(emit: Callable[[dict], None]) -> Awaitable[dict]:
        def progress(done: int, total: int | None) -> None:
            now = time.monotonic()
            if now - last[0] < 0.1 and (total is None or done < total):
                return
            last[0] = now
            emit({"event": "progress", "bytes": done, "total": total})

        return run(progress)

    return _event_stream(with_progress, what=what)


async def request_body(receive: Receive) -> AsyncIterator[bytes]:
    """The request body as it arrives (hypercorn bounds what it buffers ahead of us)."""
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            raise InvalidInput("the client went away mid-upload")
        if event.get("body"):
            yield event["body"]
        if not event.get("more_body"):
            return


def _query(scope: Scope) -> dict[str, str]:
    from urllib.parse import parse_qsl

    return dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))


def _scan_digest(value: object) -> bytes | None:
    """A `cache save`'s scan digest (64 hex digits), else None (an old client, or nothing to record)."""
    if isinstance(value, str) and len(value) == 64:
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    return None


def make_app(node: NodeAPI, policy: guard.AccessPolicy) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        what = f"{method} {path}"
        cors = guard.cors_headers(scope, policy)
        started = False
        plain_send = send

        async def tracking(message: dict) -> None:  # the same send, with CORS, remembering a start
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if cors:  # an allowlisted origin may read the answers
                    message = {**message, "headers": [*message.get("headers", []), *cors]}
            await plain_send(message)

        send = tracking

        try:
            guard.check(scope, policy)
            if method == "OPTIONS":  # a preflight from an allowlisted origin
                await send({"type": "http.response.start", "status": 204, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
            if method == "POST" and path.startswith("/api/"):
                _check_post_type(scope)
            if path == "/api/v0/status" and method == "GET":
                await send_json(send, node.status())
            elif path == "/api/v0/peers" and method == "GET":
                await send_json(send, node.peers())
            elif path == "/api/v0/add" and method == "POST":
                name = _query(scope).get("name") or None
                await send_ndjson(send, _progress_stream(lambda p: node.add_stream(request_body(receive), name), what))
            elif path == "/api/v0/fetch" and method == "POST":
                body = await read_json(receive)
                if not isinstance(body.get("key"), str):
                    raise HTTPError(400, "fetch needs a JSON body with a 'key' string")
                await send_ndjson(send, _progress_stream(lambda p: node.fetch(body["key"], p), what))
            elif path == "/api/v0/gc" and method == "POST":
                body = await read_json(receive)
                max_size = body.get("max_size")
                if max_size is not None and (not isinstance(max_size, int) or max_size < 0):
                    raise HTTPError(400, "max_size must be a non-negative integer")
                await send_json(send, await node.gc(max_size))
            elif path in ("/api/v0/pin", "/api/v0/unpin") and method == "POST":
                body = await read_json(receive)
                if not isinstance(body.get("key"), str):
                    raise HTTPError(400, "pin/unpin need a JSON body with a 'key' string")
                await send_json(send, await node.set_pinned(body["key"], path.endswith("/pin")))
            elif path == "/api/v0/fetch-url" and method == "POST":
                body = await read_json(receive)
                if not isinstance(body.get("url"), str) or not isinstance(body.get("hash"), str):
                    raise HTTPError(400, "fetch-url needs a JSON body with 'url' and 'hash' strings")
                await send_ndjson(send, _progress_stream(lambda p: node.fetch_url(body["url"], body["hash"], p), what))
            elif path == "/api/v0/prefetch" and method == "POST":
                deps, jobs = _prefetch_request(await read_json(receive, limit=64 << 20))
                await send_ndjson(send, _prefetch_stream(node, deps, jobs))
            elif path.startswith("/api/v0/blocks") or path.startswith("/api/v0/cache/"):
                from urllib.parse import parse_qs

                await _build_cache_routes(node, scope, receive, send,
                                          parse_qs(scope.get("query_string", b"").decode("latin-1")))
            else:
                await _extra_routes(node, scope, receive, send)
        except HTTPError as e:
            await send_error(send, e.status, e.message)
        except Exception as e:  # ours (maybe in a group): its status; a bug: a traceback in the log, one line out
            leaf = leaf_error(e)
            if isinstance(leaf, P2PCacheError):
                if not started:
                    await send_error(send, _status_of(leaf), str(leaf))
                else:  # mid-body: the client sees the answer cut short
                    log.warning("%s: cut short: %s", what, leaf)
                return
            _log_bug(what, e)
            if not started:
                await send_error(send, 500, _bug_line(what, e))

    return app


def _status_of(e: P2PCacheError) -> int:
    return 400 if e.exit_code == 2 else 404 if e.exit_code == 3 else 500


def _prefetch_request(body: dict) -> tuple[list[Dependency], int]:
    from ..prefetch import dependency_from_json

    deps = body.get("dependencies")
    jobs = body.get("jobs", 8)
    if not isinstance(deps, list) or not isinstance(jobs, int) or not 1 <= jobs <= 256:
        raise HTTPError(400, "prefetch needs a JSON body with a 'dependencies' list and 'jobs' (1-256)")
    return [dependency_from_json(d) for d in deps], jobs


def _prefetch_stream(node: NodeAPI, parsed: list[Dependency], jobs: int) -> AsyncIterator[dict]:
    """The prefetch service's events as NDJSON: an `entry` per dependency, `progress`, then `done`."""
    return _event_stream(lambda emit: node.prefetch(parsed, jobs, emit), batch=True, what="POST /api/v0/prefetch")


def _check_post_type(scope: Scope) -> None:
    if scope["path"] == "/api/v0/add":
        ctype = (guard.header(scope, b"content-type") or "").split(";", 1)[0].strip().lower()
        if ctype == "application/json":
            raise HTTPError(400, "add takes the file's bytes as the request body (Content-Type: "
                                 "application/octet-stream); the daemon does not open paths for its callers")
        guard.require_content_type(scope, "application/octet-stream")
    elif scope["path"].startswith(("/api/v0/blocks", "/api/v0/cache/")):
        return  # the build cache's routes check their own types (binary blocks, tar streams, JSON)
    else:
        guard.require_content_type(scope, "application/json")


async def _extra_routes(node: NodeAPI, scope: Scope, receive: Receive, send: Send) -> None:
    await node.http_fallback(scope, receive, send)


async def _build_cache_tar(cache: BuildCache, method: str, query: dict[str, list[str]], receive: Receive,
                           send: Send) -> None:
    """GET ?key=K&restore_key=P…: the tree as a tar stream (404 on a miss; headers say which key matched).
    POST ?key=K&path=DIR…[&force=1] with a tar body: save it under K. For builders with curl and tar only."""
    from ..aio import drain_thread
    from ..buildcache import tree_as_tar
    from ..buildtree import reading_tree
    from ..content.cid import CID
    from ..content.treemanifest import TreeManifest

    key = next(iter(query.get("key") or []), None)
    if not key:
        raise HTTPError(400, "cache/tar needs ?key=…")
    if method == "POST":
        await send_json(send, await cache.save_tar(key, request_body(receive), query.get("path", []),
                                                   (query.get("force") or ["0"])[0] not in ("0", "")))
        return
    if method != "GET":
        raise HTTPError(405, "cache/tar takes GET or POST")
    found = await cache.lookup(key, query.get("restore_key", []))
    if found["match"] == "none":
        raise HTTPError(404, f"no cache entry for {key}")
    root = CID.parse(found["root"])
    with reading_tree(cache.repo, root, repr(found["key"])):  # gc keeps the tree until the tar is sent
        manifest = TreeManifest.decode(cache.repo.load_block(root))
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/x-tar"), (b"x-p2pcache-match", found["match"].encode()),
            (b"x-p2pcache-key", found["key"].encode("utf-8", "replace"))]})

        async def deliver(piece: bytes) -> None:
            await send({"type": "http.response.body", "body": piece, "more_body": True})

        await drain_thread(lambda: tree_as_tar(manifest, cache.repo.load_block), deliver)
    await send({"type": "http.response.body", "body": b""})


async def _build_cache_files(cache: BuildCache, receive: Receive, send: Send, lease: str | None) -> None:
    """A save's file contents, streamed (`cacheupload.FILE_HEADER` framing): chunked and stored by the
    daemon, answered with each file's body as dag-cbor (the CLI builds the tree's pages from them)."""
    from ..content import dagcbor

    got = await cache.accept_files(request_body(receive), lease)
    await send_bytes(send, 200, dagcbor.encode(got), "application/cbor")


def _lease(scope: Scope) -> str | None:
    """The upload lease a block request names (`x-p2pcache-lease`), if any."""
    for name, value in scope.get("headers", []):
        if name == b"x-p2pcache-lease":
            return value.decode("ascii", "replace")
    return None


async def _build_cache_routes(node: NodeAPI, scope: Scope, receive: Receive, send: Send,
                              query: dict[str, list[str]]) -> None:
    """The build cache's routes (p2pcache.buildcache): blocks and roots in, roots out; no caller paths."""
    from ..content.cid import CID

    method, path = scope["method"], scope["path"]
    cache = node.buildcache
    if cache is not None and path == "/api/v0/cache/tar":
        if method == "POST":
            guard.require_content_type(scope, "application/x-tar")
        await _build_cache_tar(cache, method, query, receive, send)
        return
    if cache is None or method != "POST":
        raise HTTPError(404, f"no such endpoint: {method} {path}")
    guard.require_content_type(scope, "application/octet-stream"
                               if path.startswith("/api/v0/blocks") or path == "/api/v0/cache/files"
                               else "application/json")
    if path == "/api/v0/cache/files":
        await _build_cache_files(cache, receive, send, _lease(scope))
        return
    if path == "/api/v0/blocks":
        from ..buildcache import unframe_blocks

        blocks = unframe_blocks(await read_body(receive, limit=64 << 20))
        new, written = await cache.accept_blocks(blocks, _lease(scope))
        await send_json(send, {"stored": len(blocks), "new_blocks": new, "bytes_written": written})
        return
    if path == "/api/v0/blocks/missing":
        from ..buildcache import unframe_cids

        cids = unframe_cids(await read_body(receive, limit=8 << 20))
        missing = await cache.missing_for(cids, _lease(scope))
        lacking = {c.buffer for c in missing}
        await send_json(send, {"missing": [i for i, c in enumerate(cids) if c.buffer in lacking]})
        return
    body = await read_json(receive, limit=8 << 20)
    if path == "/api/v0/cache/lookup":
        keys = body.get("restore_keys", [])
        if not isinstance(body.get("key"), str) or not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise HTTPError(400, "cache/lookup needs 'key' (string) and 'restore_keys' (list of strings)")
        paths_id = body.get("paths_id") if isinstance(body.get("paths_id"), str) else None
        # A `fetching` event names the tree before its fetch starts (the CLI writes files as blocks arrive).
        await send_ndjson(send, _event_stream(lambda emit: cache.lookup(
            body["key"], keys, bool(body.get("lookup_only")), paths_id,
            on_fetch=lambda e: emit({"event": "fetching", **e}))))
    elif path == "/api/v0/cache/save":
        if not isinstance(body.get("key"), str) or not isinstance(body.get("root"), str):
            raise HTTPError(400, "cache/save needs 'key' and 'root' strings")
        scan = body.get("scan_time")
        await send_json(send, await cache.save(
            body["key"], CID.parse(body["root"]), bool(body.get("force")),
            body.get("paths_id") if isinstance(body.get("paths_id"), str) else None,
            float(scan) if isinstance(scan, (int, float)) else None,
            body.get("lease") if isinstance(body.get("lease"), str) else None,
            _scan_digest(body.get("scan_digest"))))
    elif path == "/api/v0/cache/upload":
        await send_json(send, await cache.open_upload())
    elif path in ("/api/v0/cache/pin", "/api/v0/cache/unpin"):
        if not isinstance(body.get("key"), str):
            raise HTTPError(400, "cache/pin needs a 'key' string")
        await send_json(send, cache.set_pinned(body["key"], path.endswith("/pin")))
    elif path == "/api/v0/cache/keys":
        await send_json(send, {"keys": cache.list_keys()})
    elif path == "/api/v0/cache/expire":
        await send_json(send, await cache.expire_async())
    else:
        raise HTTPError(404, f"no such endpoint: {method} {path}")
