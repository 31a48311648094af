"""The node's local REST API, used by the CLI while a daemon owns the repo.

    GET  /api/v0/status            counts, bytes served/fetched, peer ID, addresses
    GET  /api/v0/peers             connected peers
    POST /api/v0/add   {"path", "name"?}   add a file from this machine, then announce it (NDJSON progress)
    POST /api/v0/fetch {"key"}             make KEY local: repo, else the swarm; then announce (NDJSON)
    POST /api/v0/fetch-url {"url", "hash"} the swarm if anyone has it, else the URL; verify, add, announce
    POST /api/v0/gc {"max_size"?}          gc in the daemon; evicted roots are withdrawn from the DHT
    POST /api/v0/pin, /api/v0/unpin {"key"}
    POST /api/v0/prefetch {"dependencies": [...], "jobs"}  lock-file dependencies: repo → swarm → origin,
                                   each verified; NDJSON `entry` events (batched), then `done` (summary)

Long operations answer NDJSON: `{"event": "progress", "bytes": n, "total": t}` lines, then one
`{"event": "done", ...}` or `{"event": "error", "message", "code"}` line. The API listens on loopback
only by default and trusts its callers as the user running the daemon (it reads files they name).
"""

from __future__ import annotations

import math
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

import trio

from ..errors import P2PCacheError
from .asgi import HTTPError, Receive, Scope, Send, read_json, send_error, send_json, send_ndjson

ProgressFn = Callable[[int, int | None], None]


class NodeAPI(Protocol):
    def status(self) -> dict: ...
    def peers(self) -> list[dict]: ...
    async def add_file(self, path: str, name: str | None, progress: ProgressFn) -> dict: ...
    async def fetch(self, key: str, progress: ProgressFn) -> dict: ...
    async def prefetch(self, deps: list, jobs: int, on_event: Callable[[dict], None]) -> dict: ...


def _event_stream(run: Callable[[Callable[[dict], None]], Awaitable[dict]], batch: bool = False) -> AsyncIterator[dict]:
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


def _progress_stream(run: Callable[[ProgressFn], Awaitable[dict]]) -> AsyncIterator[dict]:
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

    return _event_stream(with_progress)


def make_app(node: NodeAPI) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
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
        try:
            if path == "/api/v0/status" and method == "GET":
                await send_json(send, node.status())
            elif path == "/api/v0/peers" and method == "GET":
                await send_json(send, node.peers())
            elif path == "/api/v0/add" and method == "POST":
                body = await read_json(receive)
                if not isinstance(body.get("path"), str):
                    raise HTTPError(400, "add needs a JSON body with a 'path' string")
                await send_ndjson(send, _progress_stream(
                    lambda p: node.add_file(body["path"], body.get("name"), p)))
            elif path == "/api/v0/fetch" and method == "POST":
                body = await read_json(receive)
                if not isinstance(body.get("key"), str):
                    raise HTTPError(400, "fetch needs a JSON body with a 'key' string")
                await send_ndjson(send, _progress_stream(lambda p: node.fetch(body["key"], p)))
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
                await send_ndjson(send, _progress_stream(lambda p: node.fetch_url(body["url"], body["hash"], p)))
            elif path == "/api/v0/prefetch" and method == "POST":
                deps, jobs = _prefetch_request(await read_json(receive, limit=64 << 20))
                await send_ndjson(send, _prefetch_stream(node, deps, jobs))
            else:
                await _extra_routes(node, scope, receive, send)
        except HTTPError as e:
            await send_error(send, e.status, e.message)
        except P2PCacheError as e:
            await send_error(send, 400 if e.exit_code == 2 else 404 if e.exit_code == 3 else 500, str(e))

    return app


def _prefetch_request(body: dict) -> tuple[list, int]:
    from ..prefetch import dependency_from_json

    deps = body.get("dependencies")
    jobs = body.get("jobs", 8)
    if not isinstance(deps, list) or not isinstance(jobs, int) or not 1 <= jobs <= 256:
        raise HTTPError(400, "prefetch needs a JSON body with a 'dependencies' list and 'jobs' (1-256)")
    return [dependency_from_json(d) for d in deps], jobs


def _prefetch_stream(node: Any, parsed: list, jobs: int) -> AsyncIterator[dict]:
    """The prefetch service's events as NDJSON: an `entry` per dependency, `progress`, then `done`."""
    return _event_stream(lambda emit: node.prefetch(parsed, jobs, emit), batch=True)


async def _extra_routes(node: Any, scope: Scope, receive: Receive, send: Send) -> None:
    handler = getattr(node, "http_fallback", None)
    if handler is not None:
        await handler(scope, receive, send)
    else:
        await send_error(send, 404, f"no such endpoint: {scope['method']} {scope['path']}")
