"""The Nix-facing binary cache a node serves on its HTTP port: routes, request parsing and status codes
over the service in `p2pcache.nixcache` (which holds the lookup chain, uploads and NAR delivery).

    GET  /nix-cache-info                      StoreDir, WantMassQuery, Priority
    GET  /<hash>.narinfo  (and HEAD)          the lookup chain (`nix.lookup_order`: repo → local Nix store →
                                              swarm → upstream caches) → 404
    GET  /nar/<hash>-<narhash>.nar  (HEAD)    the NAR, reassembled from chunks, NarHash-checked
    PUT  /nar/<file>.nar[.xz|.zst|.bz2]       what `nix copy --to http://…` uploads first
    PUT  /<hash>.narinfo                      … and then: ties the upload to its store path, announces it
    GET  /sha256/<hash>, /sha512/<hash>       hashed mirror for fixed-output fetches (hex, nix-base32, SRI)
    GET  /metrics                             Prometheus

PUTs reach this module only with the API token (http/guard.py). Status codes: the service's refusals
(`nixcache.errors`) map one to one (Missing 404, Rejected 400, Conflict 409, TooLarge 413, NoRoom 507,
SourceFailed 502, Busy 503, StillLooking 503: Nix retries a 5xx and caches nothing, where it would
remember a 404 for an hour); any other error before the response started goes to the REST API's handler
(by exit code); after it started, the response is cut short so Nix sees a truncated transfer.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from typing import AsyncIterator

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..content import nixbase32
from ..content.keys import HashKey, parse_key
from ..errors import InvalidInput, P2PCacheError
from ..nixcache import (GATEWAY_MARKER, MAX_UPLOADS, Busy, Conflict, Missing, NixBinaryCache, NoRoom, Refusal,
                        Rejected, SourceFailed, StillLooking, TooLarge)
from .asgi import HTTPError, Receive, Scope, Send, read_body, send_bytes, send_error

__all__ = ["GATEWAY_MARKER", "MAX_UPLOADS", "NixRoutes"]  # the two constants for callers that knew them here

log = logging.getLogger(__name__)

_NARINFO_PATH = re.compile(r"^/([0-9a-df-np-sv-z]{32})\.narinfo$")
_OUR_NAR = re.compile(r"^/nar/([0-9a-df-np-sv-z]{32})-([0-9a-df-np-sv-z]{52})\.nar$")
_BARE_NAR = re.compile(r"^/nar/([0-9a-df-np-sv-z]{52})\.nar$")
_UPLOAD_NAR = re.compile(r"^/nar/([A-Za-z0-9._+-]{1,200})$")
_HASHED = re.compile(r"^/(sha1|sha256|sha512)/([A-Za-z0-9+/=_-]{20,200})$")
PUT_LIMIT_NARINFO = 1 << 20
_STATUS: dict[type[Refusal], int] = {Missing: 404, Rejected: 400, Conflict: 409, TooLarge: 413, NoRoom: 507,
                                     SourceFailed: 502, Busy: 503, StillLooking: 503}
_CONTENT_TYPES = {"nar": b"application/x-nix-nar", "archive": b"application/octet-stream"}


def status_of(refusal: Refusal) -> int:
    return next(code for kind, code in _STATUS.items() if isinstance(refusal, kind))


class ResponseSink:
    """A `nixcache.NarSink` over one ASGI response: the service calls `start` once the first byte is sure."""

    def __init__(self, send: Send) -> None:
        self._send = send

    async def start(self, size: int | None, kind: str = "nar") -> None:
        headers = [(b"content-type", _CONTENT_TYPES[kind])]
        if size is not None:
            headers.append((b"content-length", str(size).encode()))
        await self._send({"type": "http.response.start", "status": 200, "headers": headers})

    async def write(self, piece: bytes) -> None:
        await self._send({"type": "http.response.body", "body": piece, "more_body": True})

    async def end(self) -> None:
        await self._send({"type": "http.response.body", "body": b""})


class NixRoutes:
    """The routes of the Nix binary cache, over the service node.py built."""

    def __init__(self, cache: NixBinaryCache) -> None:
        self.cache = cache

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        head = method == "HEAD"
        started = False
        plain_send = send

        async def tracking(message: dict) -> None:  # the same send, remembering a started response
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await plain_send(message)

        send = tracking

        try:
            await self._route(method, path, scope, receive, send, head)
        except HTTPError as e:
            await send_error(send, e.status, e.message)
        except Refusal as e:
            if not started:
                await send_error(send, status_of(e), str(e))
            else:
                log.warning("%s %s: cut short: %s", method, path, e)
        except P2PCacheError as e:
            if not started:
                raise  # the API maps it to a status code
            # Mid-body: returning without the rest makes the server close the connection, so the client
            # sees a transfer cut short (never a complete wrong one); one line in the log, no traceback.
            log.warning("%s %s: cut short: %s", method, path, e)

    async def _route(self, method: str, path: str, scope: Scope, receive: Receive, send: Send, head: bool) -> None:
        cache = self.cache
        sink = ResponseSink(send)
        if path == "/nix-cache-info" and method in ("GET", "HEAD"):
            await send_bytes(send, 200, cache.cache_info().encode(), "text/x-nix-cache-info", head=head)
        elif (m := _NARINFO_PATH.match(path)) and method in ("GET", "HEAD"):
            text = await cache.narinfo_text(m.group(1))
            if text is None:
                await send_error(send, 404, f"{m.group(1)}.narinfo: nobody has this store path")
            else:
                await send_bytes(send, 200, text.encode(), "text/x-nix-narinfo", head=head)
        elif (m := _NARINFO_PATH.match(path)) and method == "PUT":
            await cache.put_narinfo(m.group(1), await read_body(receive, PUT_LIMIT_NARINFO))
            await send_bytes(send, 200, b"", "text/plain")
        elif path.startswith("/nar/") and method in ("GET", "HEAD"):
            await self._get_nar(path, sink, head)
        elif (m := _UPLOAD_NAR.match(path)) and method == "PUT":
            await cache.put_nar(path[1:], m.group(1), _upload_body(receive, path[1:]), _content_length(scope))
            await send_bytes(send, 200, b"", "text/plain")
        elif (m := _HASHED.match(path)) and method in ("GET", "HEAD"):
            algo, text = m.group(1), m.group(2)
            if algo == "sha1":
                await cache.serve_sha1(_sha1_digest(text), text, sink, head)
            else:
                await cache.serve_hashed(_hashed_key(algo, text), sink, head)
        elif path == "/metrics" and method == "GET":
            await send_bytes(send, 200, cache.metrics.render(), CONTENT_TYPE_LATEST)
        else:
            await send_error(send, 404, f"no such endpoint: {method} {path}")

    async def _get_nar(self, path: str, sink: ResponseSink, head: bool) -> None:
        if m := _OUR_NAR.match(path):
            store_hash, nar_digest = m.group(1), nixbase32.decode(m.group(2), 32)
        elif m := _BARE_NAR.match(path):
            store_hash, nar_digest = None, nixbase32.decode(m.group(1), 32)
        else:
            raise HTTPError(404, f"{path}: not a NAR this node serves")
        if store_hash is None:
            if not await self.cache.serve_held_nar(None, nar_digest, sink, head):
                raise HTTPError(404, f"{path}: no NAR with that hash here")
            return
        await self.cache.serve_nar(store_hash, nar_digest, sink, head)


async def _upload_body(receive: Receive, url: str) -> AsyncIterator[bytes]:
    """An upload's body as it arrives; the client going away is the upload's failure."""
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            raise InvalidInput(f"{url}: the client went away mid-upload")
        body = event.get("body", b"")
        if body:
            yield body
        if not event.get("more_body"):
            return


def _content_length(scope: Scope) -> int | None:
    for k, v in scope.get("headers", ()):
        if k == b"content-length":
            try:
                return int(v)
            except ValueError:
                raise HTTPError(400, "Content-Length is not a number") from None
    return None


def _hashed_key(algo: str, text: str) -> HashKey:
    """`/<algo>/<text>`: a hash in hex, nix-base32 or SRI/base64."""
    try:
        key = parse_key(f"{algo}:{text}") if not text.startswith(algo + "-") else parse_key(text)
    except P2PCacheError:
        try:
            key = parse_key(f"{algo}-{text}")
        except P2PCacheError:
            raise HTTPError(400, f"/{algo}/{text}: not a {algo} hash in hex, nix-base32 or base64") from None
    if not isinstance(key, HashKey) or key.algo != algo:
        raise HTTPError(400, f"/{algo}/{text}: not a {algo} hash")
    return key


def _sha1_digest(text: str) -> bytes:
    """`/sha1/<text>`, as Nix asks a hashed mirror for `sha1 =` fetches: hex, nix-base32 or base64."""
    digest = None
    if len(text) == 40:
        try:
            digest = bytes.fromhex(text)
        except ValueError:
            pass
    elif len(text) == nixbase32.encoded_length(20):
        try:
            digest = nixbase32.decode(text, 20)
        except nixbase32.InvalidNixBase32:
            pass
    elif len(text) == 28:
        try:
            digest = base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
        except (binascii.Error, ValueError):
            pass
    if digest is None or len(digest) != 20:
        raise HTTPError(400, f"/sha1/{text}: not a sha1 hash in hex, nix-base32 or base64")
    return digest
