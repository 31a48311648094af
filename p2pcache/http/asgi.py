"""Small ASGI helpers: JSON and NDJSON responses, request bodies with a size cap, a path router.

No HTTP parsing lives here — hypercorn parses HTTP; these helpers only speak ASGI.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Awaitable, Callable

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


async def read_body(receive: Receive, limit: int = 1 << 20) -> bytes:
    body = bytearray()
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            raise HTTPError(400, "client went away")
        body += event.get("body", b"")
        if len(body) > limit:
            raise HTTPError(413, f"request body over {limit} bytes")
        if not event.get("more_body"):
            return bytes(body)


async def read_json(receive: Receive, limit: int = 1 << 20) -> dict:
    raw = await read_body(receive, limit)
    try:
        value = json.loads(raw or b"{}")
    except ValueError:
        raise HTTPError(400, "request body is not JSON") from None
    if not isinstance(value, dict):
        raise HTTPError(400, "request body must be a JSON object")
    return value


async def send_bytes(send: Send, status: int, body: bytes, content_type: str,
                     headers: list[tuple[bytes, bytes]] | None = None, head: bool = False) -> None:
    hdrs = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": hdrs + (headers or [])})
    await send({"type": "http.response.body", "body": b"" if head else body})


async def send_json(send: Send, value: Any, status: int = 200) -> None:
    await send_bytes(send, status, json.dumps(value, sort_keys=True).encode() + b"\n", "application/json")


async def send_error(send: Send, status: int, message: str) -> None:
    await send_json(send, {"error": message}, status)


async def send_ndjson(send: Send, events: AsyncIterator[dict]) -> None:
    """Stream one JSON object per line; the last line says how it ended."""
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/x-ndjson")]})
    async for event in events:
        await send({"type": "http.response.body", "body": json.dumps(event, sort_keys=True).encode() + b"\n",
                    "more_body": True})
    await send({"type": "http.response.body", "body": b""})


BODY_GRACE = 20.0  # seconds every request body gets before the rate rule below starts to bite
BODY_MIN_RATE = 500  # bytes per second a body must keep up on average after that grace


def bounded_bodies(app: Callable[[Scope, Receive, Send], Awaitable[None]], grace: float = BODY_GRACE,
                   min_rate: float = BODY_MIN_RATE) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """Request bodies that trickle are cut off (Apache's mod_reqtimeout rule `body=20,MinRate=500`): a
    body must arrive by `grace` seconds after the request plus one second per `min_rate` bytes received.
    A body past its deadline gets a 408 (if no response started yet) and the handler sees the client
    disconnect, so what it holds for that request (a worker thread, a slot) is freed."""
    import trio

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await app(scope, receive, send)
            return
        start = trio.current_time()
        received = 0
        body_done = False
        cut_off = False
        response_started = False

        async def timed_receive() -> dict:
            nonlocal received, body_done, cut_off
            if cut_off:
                return {"type": "http.disconnect"}
            if body_done:  # only the disconnect is left to wait for: no deadline on that
                return await receive()
            with trio.move_on_at(start + grace + received / min_rate):
                event = await receive()
                if event["type"] == "http.request":
                    received += len(event.get("body", b""))
                    body_done = not event.get("more_body", False)
                return event
            cut_off = True
            if not response_started:
                await send_error(send, 408, f"{scope.get('method')} {scope.get('path')}: the request body "
                                            f"arrived too slowly ({received} bytes in "
                                            f"{trio.current_time() - start:.0f} s); send it faster")
            return {"type": "http.disconnect"}

        async def guarded_send(message: dict) -> None:
            nonlocal response_started
            if cut_off:
                return  # answered 408 already; whatever the handler still says is dropped
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        await app(scope, timed_receive, guarded_send)

    return guarded
