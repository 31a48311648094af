"""The host seam: what the protocol drivers (bitswap, DAG transfer, DHT, resolve) need of a host, and the
peer-event mechanics both hosts share.

Owns:
- `Host` and `Stream`, the `typing.Protocol`s that `net.host.NodeHost` (libp2p) and `simnet.hostsim.SimHost`
  (simulated links) both satisfy, so drivers and `Node` are written against them and a type checker proves
  either host plugs in;
- `PeerEvent` and `PeerEvents`: a host's "peer up / peer down" fan-out to subscribers, and the
  "something changed" event that waiters use;
- `keep_connected`: the redial loop with exponential backoff and jitter a host runs for each bootstrap peer.

It must not know how connections are made (libp2p swarm, simnet links): a host hands in its own `dial`,
`is_connected` and random source, so the loop and the fan-out are one implementation for both.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import trio
from libp2p.peer.id import ID

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    # `trio.TaskStatus` at run time; libp2p pulls in trio-typing, whose stubs shadow trio's for mypy.
    from trio_typing import TaskStatus

__all__ = ["Host", "PeerEvent", "PeerEvents", "Stream", "StreamHandler", "keep_connected"]


@dataclass(frozen=True, slots=True)
class PeerEvent:
    """`peer` got its first connection (`connected=True`) or lost its last one."""

    peer: ID
    connected: bool


class _MuxedConn(Protocol):
    @property
    def peer_id(self) -> ID: ...


class Stream(Protocol):
    """A bidirectional byte stream to one peer: what py-libp2p's `NetStream` and `SimStream` offer."""

    @property
    def muxed_conn(self) -> _MuxedConn: ...

    async def read(self, n: int | None = None) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def close_write(self) -> None: ...  # half-close: EOF to the peer, reading goes on

    async def close(self) -> None: ...

    async def reset(self) -> None: ...


StreamHandler = Callable[[Any], Awaitable[None]]  # called with the host's stream type (a `Stream`)


class Host(Protocol):
    """What a p2pcache node needs of its host. `await nursery.start(host.run)` joins the network and
    returns once it is listening; `subscribe()` gives `PeerEvent`s from then on."""

    @property
    def peer_id(self) -> ID: ...

    def addrs(self) -> list[Any]: ...  # multiaddrs ending in /p2p/<peer id>, to hand to other nodes

    def add_addrs(self, peer: ID, addrs: Iterable[Any], ttl: int = 3600) -> None: ...

    def connected_peers(self) -> list[ID]: ...

    def is_connected(self, peer: ID) -> bool: ...

    def allowed(self, peer: ID) -> bool: ...

    async def dial(self, peer: ID) -> None: ...  # connect at its known addresses (no-op if connected); raises if not

    async def new_stream(self, peer: ID, protocols: Sequence[str]) -> Stream: ...

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None: ...

    async def disconnect(self, peer: ID) -> None: ...

    def subscribe(self) -> trio.MemoryReceiveChannel[PeerEvent]: ...

    async def run(self, *, task_status: TaskStatus[Any] = ...) -> None: ...


class PeerEvents:
    """A host's subscribers to peer up/down events. `publish` reaches every open subscriber (a closed one
    is dropped) and then fires `changed`, which a waiter takes before it checks its condition."""

    def __init__(self) -> None:
        self._subscribers: list[trio.MemorySendChannel[PeerEvent]] = []
        self.changed = trio.Event()

    def subscribe(self, connected: Iterable[ID]) -> trio.MemoryReceiveChannel[PeerEvent]:
        """Events from now on, starting with a `connected=True` for each of `connected` (peers up now)."""
        send, recv = trio.open_memory_channel[PeerEvent](math.inf)
        for p in connected:
            send.send_nowait(PeerEvent(p, True))
        self._subscribers.append(send)
        return recv

    def publish(self, event: PeerEvent) -> None:
        for s in list(self._subscribers):
            try:
                s.send_nowait(event)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._subscribers.remove(s)
        self.changed.set()
        self.changed = trio.Event()

    def close(self) -> None:
        """End every subscriber's stream of events (the host stopped)."""
        for s in self._subscribers:
            s.close()
        self._subscribers.clear()


async def keep_connected(
    peer: ID,
    dial: Callable[[], Awaitable[object]],
    is_connected: Callable[[ID], bool],
    events: PeerEvents,
    *,
    initial: float,
    maximum: float,
    uniform: Callable[[float, float], float],
    failure: type[Exception] | tuple[type[Exception], ...],
    on_failure: Callable[[Exception, float], None] | None = None,
) -> None:
    """Dial `peer` and redial it whenever it is lost, until cancelled: after a failed dial (an exception
    of type `failure`) wait `delay` times a jitter factor `uniform(0.8, 1.2)`, doubling `delay` from
    `initial` up to `maximum`; a successful dial resets it. `on_failure(error, delay)` hears each failure
    before the wait. While connected, the loop sleeps until the host publishes a peer event."""
    delay = initial
    while True:
        if not is_connected(peer):
            try:
                await dial()
                delay = initial
            except failure as e:
                if on_failure is not None:
                    on_failure(e, delay)
                await trio.sleep(delay * uniform(0.8, 1.2))
                delay = min(maximum, delay * 2)
                continue
        changed = events.changed
        if is_connected(peer):
            await changed.wait()


async def reset_quietly(stream: Any) -> None:
    """Reset a stream we are giving up on. It failing means the stream (or its connection) is gone
    already, which is what we wanted: logged at debug, never raised."""
    try:
        await stream.reset()
    except Exception as e:
        log.debug("reset of a stream that was already gone: %s", e)


async def close_quietly(closable: Any) -> None:
    """Close a stream or connection on the way out; as `reset_quietly`, a failure means it is gone."""
    try:
        await closable.close()
    except Exception as e:
        log.debug("close of a stream or connection that was already gone: %s", e)
