"""Simulated libp2p hosts: `NodeHost`'s interface over simnet links, so the project's real `Node` (repo,
`BitswapExchange` driver, announcer, finder, resolve protocol) runs in virtual time without sockets.

Owns:
- `LiveSim`: the event queue for worlds where real trio tasks run beside the link callbacks. `Sim.run`
  jumps the clock itself between callbacks, which is right when callbacks are all there is; here a
  delivery wakes a trio task that must run at the delivery's instant, and a task may schedule an event
  earlier than the one the queue is waiting for. So every instant is a real trio sleep (trio's
  autojump moves the clock once every task is idle) and scheduling an earlier event wakes the queue.
- `SimSwarm` / `SimHost`: one host per node, a `simnet.links.Network` endpoint. It satisfies
  `p2pcache.net.peers.Host`, the Protocol the node's drivers are written against, as `NodeHost` does (`peer_id`, `addrs`, `add_addrs`, `new_stream`, `set_stream_handler`,
  `remove_stream_handler`, `connected_peers`, `is_connected`, `disconnect`, `subscribe`, `run`) with
  real py-libp2p `ID`s (ed25519 keys derived from the run's seed, so one seed gives the same ids).
  Peer events and the bootstrap redial loop are production's own (`PeerEvents`, `keep_connected`).
- `SimStream`: `read` / `write` / `close` / `close_write` / `reset` / `get_protocol` / `muxed_conn.peer_id`.
  A write is cut into frames of `FRAME` bytes; each frame crosses the link as a `Network.send` of its
  bytes (plus the Yamux header and Noise tag it would carry), so it costs uplink queueing, latency and
  downlink drain, in order per connection; `write` returns when the sender's uplink has sent the last
  frame (the TCP send buffer, roughly). Opening a stream costs one round trip (multistream-select's
  propose/echo); a dial costs `Network.handshake_rtts` round trips (TCP + Noise + Yamux, charged, not
  run). EOF, reset and a cut connection behave as on py-libp2p streams (`StreamEOF`, `StreamReset`).
- `repo_work_inline()`: runs `trio.to_thread.run_sync` work on the trio thread for the duration of a
  simulation (see its docstring for why).

Determinism: the queue and the links are deterministic for a seed, but the real trio tasks beside them
are not quite: trio orders tasks that wake at one instant by things a seed does not fix (a random
reversal of each scheduling batch, `id()` tie-breaks between equal deadlines, sets of tasks), so runs
of one seed can differ in the order of same-instant events and hence a little in timing.

It must not know any protocol above libp2p's: the node's drivers register their handlers here, exactly as
on a `NodeHost`. Not modelled: Yamux flow-control windows (a receiver buffers whatever arrives),
connection limits, identify, the allowlist and private-network key (every host may talk to every host).
"""

from __future__ import annotations

import heapq
import logging
import math
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import multiaddr
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.network.stream.exceptions import StreamClosed, StreamEOF, StreamReset
from libp2p.peer.id import ID

from p2pcache.errors import P2PCacheError
from p2pcache.net.peers import PeerEvent, PeerEvents, StreamHandler, keep_connected

from .core import Sim, Timer
from .links import LinkProfile, Network, profile

if TYPE_CHECKING:
    # `trio.TaskStatus` at run time; libp2p pulls in trio-typing, whose stubs shadow trio's for mypy.
    from trio_typing import TaskStatus

__all__ = ["FRAME", "LiveSim", "SimHost", "SimHostError", "SimStream", "SimSwarm", "repo_work_inline"]

log = logging.getLogger(__name__)

FRAME = 64 * 1024  # bytes of one data frame on the link
FRAME_OVERHEAD = 12 + 2 + 16  # Yamux header + Noise length prefix + Noise AEAD tag, per frame
CONTROL_SIZE = 12 + 2 + 16  # a frame with no payload (window update, FIN, RST)

class SimHostError(P2PCacheError):
    """A simulated dial or stream open failed (unreachable peer, no such protocol, connection cut)."""


# -- the event queue ------------------------------------------------------------------------------


class LiveSim(Sim):
    """A `Sim` whose `run` shares the trio loop with real tasks: see the module docstring.

    Callbacks due at one instant still run in the order they were scheduled; `rng_for`, `now`, `at`,
    `after` are `Sim`'s. Start it with `await nursery.start(sim.run)`; it runs until cancelled."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed, clock=None)
        self._heap: list[tuple[float, int, Timer | None, Callable[..., Any], tuple]] = []
        self._seq = 0
        self._waiting_until = math.inf
        self._wake = trio.Event()

    def at(self, when: float, fn: Callable[..., Any], *args: Any, cancellable: bool = False) -> Timer | None:
        timer = Timer() if cancellable else None
        self._seq += 1
        when = max(when, trio.current_time())
        heapq.heappush(self._heap, (when, self._seq, timer, fn, args))
        if when < self._waiting_until:
            self._wake.set()
        return timer

    def post(self, when: float, fn: Callable[..., Any], *args: Any) -> None:
        self.at(when, fn, *args)  # this queue, not `Sim`'s

    @property
    def pending(self) -> int:
        return len(self._heap)

    async def run(self, until: float | None = None, *,
                  task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        q = self._heap
        task_status.started()
        while not self._stop:
            now = trio.current_time()
            if q and q[0][0] <= now:
                _, _, timer, fn, args = heapq.heappop(q)
                if timer is not None and timer.cancelled:
                    continue
                self.events_run += 1
                fn(*args)
                continue
            deadline = q[0][0] if q else math.inf
            if until is not None:
                if now >= until:
                    break
                deadline = min(deadline, until)
            self._wake = trio.Event()
            self._waiting_until = deadline
            try:
                with trio.move_on_at(deadline):
                    await self._wake.wait()
            finally:
                self._waiting_until = math.inf


@contextmanager
def repo_work_inline() -> Iterator[None]:
    """Run `trio.to_thread.run_sync(fn, *args)` as `fn(*args)` on the trio thread while the block runs.

    Why: `Node`, `Repo` and `BitswapExchange` hash and write in worker threads. Under a `MockClock` with
    `autojump_threshold=0`, a task waiting for a thread counts as idle, so trio would jump virtual time
    to the next deadline while the disk work is still running, firing want and lookup timeouts that no
    real node would see. Running that work inline makes disk work take zero virtual time (the
    simulation does not model disk speed) and keeps the clock still while it runs; it also removes the
    thread scheduling that would make a seed's history vary. Calls resolve `trio.to_thread.run_sync`
    at call time, so patching the module attribute reaches every caller; the original is restored on
    exit. Not thread-safe across concurrent `trio.run`s in one process (simnet runs one at a time).
    It removes threads as a source of nondeterminism, not trio's own (see the module docstring)."""
    import trio.to_thread as to_thread

    original = to_thread.run_sync

    async def inline(sync_fn: Callable[..., Any], *args: Any, thread_name: str | None = None,
                     abandon_on_cancel: bool | None = None, cancellable: bool | None = None,
                     limiter: Any = None) -> Any:
        await trio.lowlevel.checkpoint()
        return sync_fn(*args)

    to_thread.run_sync = inline
    try:
        yield
    finally:
        to_thread.run_sync = original


# -- streams --------------------------------------------------------------------------------------


class _Conn:
    """What callers read off `stream.muxed_conn`."""

    __slots__ = ("peer_id",)

    def __init__(self, peer_id: ID) -> None:
        self.peer_id = peer_id


class SimStream:
    """One stream between two simulated hosts; the interface of a py-libp2p `NetStream` as used here."""

    def __init__(self, host: "SimHost", peer: ID, sid: int, protocol: str | None = None) -> None:
        self.host = host
        self.peer = peer
        self.sid = sid
        self.protocol = protocol
        self.muxed_conn = _Conn(peer)
        self._buf = bytearray()
        self._eof = False  # the peer closed its write side
        self._reset = False
        self._refused = False
        self._closed_write = False
        self._closed_read = False
        self._readable = trio.Event()
        self._negotiated = trio.Event()
        self._written: list[trio.Event] = []

    def get_protocol(self) -> str | None:
        return self.protocol

    # -- from the peer (called by the host, synchronously) ------------------------------------------
    def _feed(self, data: bytes) -> None:
        if self._reset or self._closed_read:
            return
        self._buf += data
        self._readable.set()

    def _feed_eof(self) -> None:
        self._eof = True
        self._readable.set()
        self._maybe_forget()

    def _broken(self) -> None:
        """Reset by the peer, or the connection is gone: every waiter wakes up to an error."""
        self._reset = True
        self._buf.clear()
        self._readable.set()
        self._negotiated.set()
        for ev in self._written:
            ev.set()
        self.host._streams.pop(self.sid, None)

    def _maybe_forget(self) -> None:
        if self._closed_write and (self._eof or self._closed_read):
            self.host._streams.pop(self.sid, None)

    # -- the caller's side ----------------------------------------------------------------------------
    async def read(self, n: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        while not self._buf:
            if self._reset:
                raise StreamReset(f"stream to {self.peer} was reset")
            if self._eof:
                raise StreamEOF()
            if self._closed_read:
                raise StreamClosed("stream is closed for reading")
            self._readable = trio.Event()
            await self._readable.wait()
        if self._reset:
            raise StreamReset(f"stream to {self.peer} was reset")
        take = len(self._buf) if n is None or n < 0 else min(n, len(self._buf))
        data = bytes(self._buf[:take])
        del self._buf[:take]
        return data

    async def write(self, data: bytes) -> None:
        if self._reset:
            await trio.lowlevel.checkpoint()
            raise StreamReset(f"stream to {self.peer} was reset")
        if self._closed_write:
            await trio.lowlevel.checkpoint()
            raise StreamClosed("stream is closed for writing")
        if not data:
            await trio.lowlevel.checkpoint()
            return
        view = memoryview(data)
        done = trio.Event()
        self._written.append(done)
        try:
            for off in range(0, len(view), FRAME):
                piece = bytes(view[off:off + FRAME])
                last = off + FRAME >= len(view)
                ok = self.host._send(self.peer, len(piece) + FRAME_OVERHEAD, ("data", self.sid, piece),
                                     done.set if last else None)
                if not ok:
                    self._broken()
                    break
            await done.wait()
        finally:
            self._written.remove(done)
        if self._reset:
            raise StreamReset(f"stream to {self.peer} was reset")

    async def close_write(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed_write or self._reset:
            return
        self._closed_write = True
        self.host._send(self.peer, CONTROL_SIZE, ("eof", self.sid))
        self._maybe_forget()

    async def close(self) -> None:
        """Close both ways (py-libp2p's `close`): FIN to the peer, and whatever arrives later is dropped."""
        self._closed_read = True
        self._buf.clear()
        await self.close_write()
        self._maybe_forget()

    async def reset(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._reset:
            return
        self.host._send(self.peer, CONTROL_SIZE, ("reset", self.sid))
        self._broken()


# -- hosts ----------------------------------------------------------------------------------------


class SimSwarm:
    """Every simulated host of a run, on one `Network`. Stream ids are unique across the swarm."""

    def __init__(self, sim: LiveSim, net: Network | None = None, *, dial_timeout: float = 10.0,
                 negotiate_timeout: float = 10.0) -> None:
        self.sim = sim
        self.net = net if net is not None else Network(sim)
        self.dial_timeout = dial_timeout
        self.negotiate_timeout = negotiate_timeout
        self.hosts: dict[ID, SimHost] = {}
        self._rng = sim.rng_for("hostsim/identities")
        self._next_sid = 0

    def add_host(self, link: LinkProfile | str, bootstrap: Iterable[ID] = ()) -> "SimHost":
        """A new host (not on the network until its `run` starts), its identity derived from the seed."""
        key_pair = create_new_key_pair(self._rng.randbytes(32))
        link = profile(link) if isinstance(link, str) else link
        host = SimHost(self, key_pair, link, len(self.hosts), tuple(bootstrap))
        self.hosts[host.peer_id] = host
        return host

    def next_sid(self) -> int:
        self._next_sid += 1
        return self._next_sid


class SimHost:
    """A host on the simulated network with `NodeHost`'s interface. `await nursery.start(host.run)`
    joins the network (and dials `bootstrap` peers, redialling with backoff); cancelling it leaves the
    network, which cuts its connections (peers see them go down)."""

    def __init__(self, swarm: SimSwarm, key_pair: Any, link: LinkProfile, index: int,
                 bootstrap: tuple[ID, ...] = ()) -> None:
        self.swarm = swarm
        self.key_pair = key_pair
        self.link = link
        self.peer_id: ID = ID.from_pubkey(key_pair.public_key)
        self.bootstrap = bootstrap
        self._addr = f"/ip4/10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}/tcp/4001"
        self._handlers: dict[str, StreamHandler] = {}
        self._streams: dict[int, SimStream] = {}
        # Protocols each connected peer chose for a stream of ours: the next one's open does not wait for the
        # answer, as the daemon's host proposes it in the stream's first write (net/host.py `ProposedStream`).
        self._spoken: dict[ID, set[str]] = {}
        self._connected: dict[ID, None] = {}  # insertion-ordered set
        self._dials: dict[ID, trio.Event] = {}
        self._peer_addrs: dict[ID, list] = {}
        self._events = PeerEvents()
        self._nursery: trio.Nursery | None = None
        self._running = False
        self._rng = swarm.sim.rng_for(f"hostsim/{self.peer_id.to_base58()}")
        self.streams_opened = 0
        self.accepted: dict[str, int] = {}  # inbound streams per protocol

    # -- queries ------------------------------------------------------------------------------------
    def addrs(self) -> list[multiaddr.Multiaddr]:
        return [multiaddr.Multiaddr(f"{self._addr}/p2p/{self.peer_id.to_base58()}")]

    def listen_addrs(self) -> list[multiaddr.Multiaddr]:
        return [multiaddr.Multiaddr(self._addr)]

    def connected_peers(self) -> list[ID]:
        return list(self._connected)

    def is_connected(self, peer: ID) -> bool:
        return peer in self._connected

    def allowed(self, peer: ID) -> bool:
        return True

    @property
    def running(self) -> bool:
        return self._running

    # -- NodeHost's interface -----------------------------------------------------------------------
    def add_addrs(self, peer: ID, addrs: Iterable[Any], ttl: int = 3600) -> None:
        known = self._peer_addrs.setdefault(peer, [])
        for a in addrs:
            if a not in known:
                known.append(a)

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        self._handlers[str(protocol)] = handler

    def remove_stream_handler(self, protocol: str) -> None:
        self._handlers.pop(str(protocol), None)

    def subscribe(self) -> trio.MemoryReceiveChannel[PeerEvent]:
        return self._events.subscribe(self.connected_peers())

    async def connect(self, peer: ID) -> ID:
        await self._ensure_connected(peer)
        return peer

    async def dial(self, peer: ID) -> None:
        """Connect to `peer` (a no-op if connected); SimHostError if it cannot be reached."""
        if peer == self.peer_id:
            raise SimHostError("cannot dial ourselves")
        await self._ensure_connected(peer)

    async def disconnect(self, peer: ID) -> None:
        await trio.lowlevel.checkpoint()
        self.swarm.net.disconnect(self.peer_id, peer)

    async def new_stream(self, peer: ID, protocols: Sequence[str]) -> SimStream:
        """A stream to `peer` speaking the first of `protocols` it serves, dialling it if needed."""
        if not self._running:
            raise SimHostError(f"host {self.peer_id} is not running")
        if peer == self.peer_id:
            raise SimHostError("cannot open a stream to ourselves")
        await self._ensure_connected(peer)
        stream = SimStream(self, peer, self.swarm.next_sid())
        self._streams[stream.sid] = stream
        offered = tuple(str(p) for p in protocols)
        size = CONTROL_SIZE + 20 + sum(len(p) + 2 for p in offered)  # multistream header + proposals
        if not self._send(peer, size, ("open", stream.sid, offered)):
            stream._broken()
            raise SimHostError(f"connection to {peer} is gone")
        if len(offered) == 1 and offered[0] in self._spoken.get(peer, ()):
            stream.protocol = offered[0]  # a refusal resets it (`_broken`): its reads fail
            self.streams_opened += 1
            return stream
        with trio.move_on_after(self.swarm.negotiate_timeout):
            await stream._negotiated.wait()
        if stream._refused:
            raise SimHostError(f"peer {peer} serves none of {', '.join(offered)}")
        if stream._reset or stream.protocol is None:
            await stream.reset()
            raise SimHostError(f"cannot open a stream to {peer}: connection lost or no answer")
        self._spoken.setdefault(peer, set()).add(stream.protocol)
        self.streams_opened += 1
        return stream

    # -- running ------------------------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        if self._running:
            raise SimHostError("this host is already running")
        self._running = True
        self.swarm.net.add(self.peer_id, self.link, self)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for peer in self.bootstrap:
                    nursery.start_soon(self._keep_connected, peer)
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._running = False
            self.swarm.net.remove(self.peer_id)  # peers are told their connections went down
            for peer in list(self._connected):
                self.on_disconnected(peer)
            self._events.close()

    async def _keep_connected(self, peer: ID) -> None:
        """NodeHost's loop for bootstrap peers (`keep_connected`, its default backoff), jitter from the seed."""
        await keep_connected(peer, lambda: self._ensure_connected(peer), self.is_connected, self._events,
                             initial=1.0, maximum=60.0, uniform=self._rng.uniform, failure=SimHostError)

    async def _ensure_connected(self, peer: ID) -> None:
        if peer in self._connected:
            await trio.lowlevel.checkpoint()
            return
        ev = self._dials.get(peer)
        if ev is None:
            ev = self._dials[peer] = trio.Event()
            dialled = ev
            # Network.connect calls back once (True/False) unless the other end is dialling us at the
            # same moment; then `on_connected` (or the timeout below) ends the wait.
            self.swarm.net.connect(self.peer_id, peer, lambda ok: dialled.set())
        with trio.move_on_after(self.swarm.dial_timeout):
            await ev.wait()
        if self._dials.get(peer) is ev:
            del self._dials[peer]
        if peer not in self._connected:
            raise SimHostError(f"cannot connect to {peer}: unreachable")

    # -- the wire -----------------------------------------------------------------------------------
    def _send(self, peer: ID, size: int, payload: tuple, on_written: Callable[[], None] | None = None) -> bool:
        return self.swarm.net.send(self.peer_id, peer, size, payload, on_written)

    # Network endpoint callbacks: synchronous, from the event queue.
    def on_connected(self, peer: ID) -> None:
        ev = self._dials.get(peer)
        if ev is not None:
            ev.set()
        if peer not in self._connected:
            self._connected[peer] = None
            self._events.publish(PeerEvent(peer, True))

    def on_disconnected(self, peer: ID) -> None:
        for s in [s for s in self._streams.values() if s.peer == peer]:
            s._broken()
        self._spoken.pop(peer, None)
        if peer in self._connected:
            del self._connected[peer]
            self._events.publish(PeerEvent(peer, False))

    def on_message(self, peer: ID, payload: tuple) -> None:
        kind, sid = payload[0], payload[1]
        stream = self._streams.get(sid)
        if kind == "data":
            if stream is None:
                self._send(peer, CONTROL_SIZE, ("reset", sid))  # a stream we no longer know
            else:
                stream._feed(payload[2])
        elif kind == "eof":
            if stream is not None:
                stream._feed_eof()
        elif kind == "reset":
            if stream is not None:
                stream._broken()
        elif kind == "open":
            self._accept(peer, sid, payload[2])
        elif kind == "accept":
            if stream is not None:
                stream.protocol = payload[2]
                stream._negotiated.set()
        elif kind == "refuse":
            if stream is not None:
                if stream.protocol is not None:  # a proposal in the first write, refused: negotiate next time
                    self._spoken.get(peer, set()).discard(stream.protocol)
                stream._refused = True
                stream._broken()

    def _accept(self, peer: ID, sid: int, offered: tuple[str, ...]) -> None:
        chosen = next((p for p in offered if p in self._handlers), None)
        if chosen is None or self._nursery is None:
            self._send(peer, CONTROL_SIZE + 20, ("refuse", sid))
            return
        stream = SimStream(self, peer, sid, chosen)
        self._streams[sid] = stream
        self._send(peer, CONTROL_SIZE + 20 + len(chosen), ("accept", sid, chosen))
        self.accepted[chosen] = self.accepted.get(chosen, 0) + 1
        self._nursery.start_soon(self._serve, self._handlers[chosen], stream)

    async def _serve(self, handler: StreamHandler, stream: SimStream) -> None:
        try:
            await handler(stream)
        except Exception as e:  # a handler's failure ends its stream, never the host
            log.debug("handler for %s from %s failed: %r", stream.protocol, stream.peer, e)
            await stream.reset()


if TYPE_CHECKING:
    from p2pcache.net.peers import Host

    def _sim_host_is_a_host(host: SimHost) -> Host:
        return host  # `make typecheck` proves SimHost satisfies the Protocol NodeHost does
