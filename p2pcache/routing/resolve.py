"""The resolve protocol's trio driver: `ResolveServer` answers `/p2pcache/resolve/1.0.0` streams from a
lookup the node supplies; `resolve(host, peer, alias, timeout)` asks one peer.

Message logic (limits, validation, framing) lives in `resolve_wire` and is sans-IO; this module only
moves its bytes over libp2p streams. A peer that breaks the protocol gets its stream reset and, on the
client side, the caller gets `ResolveProtocolError`; a peer that cannot be reached or does not answer in
time gives `ResolveUnavailable`. Never trust an answer: its root CID is what the exchange verifies the
fetched blocks against, and that verification, not this protocol, is what makes the data safe.

`host` is anything with `new_stream(peer, protocols)` / `set_stream_handler(protocol, handler)`: the
node's `NodeHost` (so its allowlist applies) or a bare py-libp2p host.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from ..net.host import patient_dials
from .errors import ResolveProtocolError, ResolveUnavailable
from .resolve_wire import (
    MAX_REQUEST,
    MAX_RESPONSE,
    PROTOCOL,
    FrameReader,
    ResolveAnswer,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)

if TYPE_CHECKING:
    from ..net.peers import Host

__all__ = ["PROTOCOL", "ResolveLookup", "ResolveServer", "ResolveServerStats", "resolve"]

log = logging.getLogger(__name__)
timeline = logging.getLogger("p2pcache.timeline")  # debug lines of a cold copy's timeline (bench/nixcopy.py)

_Answer = TypeVar("_Answer")  # what ask_once's `decode` makes of the answer frame

ResolveLookup = Callable[[str], "ResolveAnswer | None | Awaitable[ResolveAnswer | None]"]
_READ_CHUNK = 64 * 1024


async def read_frame(stream: Any, reader: FrameReader) -> bytes:
    """Read one whole length-prefixed message (and nothing after it in the same read)."""
    while True:
        try:
            chunk = await stream.read(_READ_CHUNK)
        except EOFError:  # py-libp2p's StreamEOF
            chunk = b""
        if not chunk:
            reader.eof()  # raises: the stream ended before a whole message
        payload = reader.feed(chunk)
        if payload is not None:
            return payload


async def reset_stream(stream: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        try:
            await stream.reset()
        except Exception:  # already gone: nothing to reset
            pass


async def close_stream(stream: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        try:
            await stream.close()
        except Exception:
            pass


@dataclass
class ResolveServerStats:
    requests: int = 0
    found: int = 0
    not_found: int = 0
    violations: int = 0  # streams reset for a protocol violation
    timeouts: int = 0  # streams reset because the request did not arrive in time
    lookup_errors: int = 0  # our own lookup raised: the stream is reset, the error logged


class ResolveServer:
    """Answers resolve requests with `lookup(alias)`, which returns a `ResolveAnswer` or None and may be
    a plain function or a coroutine function. The node decides what it is willing to reveal there."""

    def __init__(self, lookup: ResolveLookup, request_timeout: float = 10.0):
        self.lookup = lookup
        self.request_timeout = request_timeout
        self.stats = ResolveServerStats()

    def register(self, host: Host) -> None:
        host.set_stream_handler(TProtocol(PROTOCOL), self.handle_stream)

    async def handle_stream(self, stream: Any) -> None:
        try:
            with trio.fail_after(self.request_timeout):
                alias = decode_request(await read_frame(stream, FrameReader(MAX_REQUEST, "request")))
        except ResolveProtocolError as e:
            self.stats.violations += 1
            log.info("resolve: resetting stream from %s: %s", _peer_of(stream), e)
            await reset_stream(stream)
            return
        except trio.TooSlowError:
            self.stats.timeouts += 1
            await reset_stream(stream)
            return
        except Exception as e:  # the stream broke under us
            log.debug("resolve: stream from %s failed: %s", _peer_of(stream), e)
            await reset_stream(stream)
            return
        self.stats.requests += 1
        try:
            answer = self.lookup(alias)
            if inspect.isawaitable(answer):
                answer = await answer
            data = encode_response(answer)
        except Exception:
            self.stats.lookup_errors += 1
            log.exception("resolve: lookup of %r failed", alias)
            await reset_stream(stream)
            return
        if answer is None:
            self.stats.not_found += 1
        else:
            self.stats.found += 1
        try:
            await stream.write(data)
        except Exception as e:
            log.debug("resolve: cannot answer %s: %s", _peer_of(stream), e)
            await reset_stream(stream)
            return
        await close_stream(stream)


def _peer_of(stream: Any) -> Any:
    return getattr(getattr(stream, "muxed_conn", None), "peer_id", "?")


async def resolve(host: Host, peer_id: ID, alias: str, timeout: float = 5.0) -> ResolveAnswer | None:
    """Ask `peer_id` which root it holds under `alias`: the answer, or None if it has nothing.

    Raises ResolveUnavailable (cannot connect, protocol unsupported, stream broken, no answer within
    `timeout` seconds) or ResolveProtocolError (the answer is malformed or over the limits; the stream
    is reset). The answer is unverified: fetch and verify against `answer.root` before using it."""
    request = encode_request(alias)  # RoutingUsageError for a malformed alias: our bug, not the peer's
    return await ask_once(host, peer_id, TProtocol(PROTOCOL), request, MAX_RESPONSE, "answer", decode_response,
                          timeout, f"a resolve of {alias!r}")


async def ask_once(host: Host, peer_id: ID, protocol: TProtocol, request: bytes, limit: int, what: str,
                   decode: Callable[[bytes], _Answer], timeout: float, asking: str) -> _Answer:
    """One framed request and one framed answer of at most `limit` bytes on a new stream, decoded with
    `decode` (which raises ResolveProtocolError on a bad answer). Raises ResolveUnavailable when the peer
    cannot be reached or does not answer in time; the stream is reset on any failure."""
    stream = None
    try:
        with trio.fail_after(timeout):
            with patient_dials():  # a provider in dial backoff is waited for if the backoff ends in time
                stream = await host.new_stream(peer_id, [protocol])
            timeline.debug("%s: stream to %s open", asking, peer_id)
            await stream.write(request)
            await stream.close_write()
            payload = await read_frame(stream, FrameReader(limit, what))
        answer = decode(payload)
    except ResolveProtocolError:
        if stream is not None:
            await reset_stream(stream)
        raise
    except trio.TooSlowError:
        if stream is not None:
            await reset_stream(stream)
        raise ResolveUnavailable(f"peer {peer_id} did not answer {asking} within {timeout}s") from None
    except Exception as e:
        if stream is not None:
            await reset_stream(stream)
        raise ResolveUnavailable(f"cannot get {asking} from peer {peer_id}: {type(e).__name__}: {e}") from None
    await close_stream(stream)
    return answer
