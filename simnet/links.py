"""Simulated links: named link profiles, and the network that moves messages between simulated nodes.

Owns: each node's access link (uplink and downlink queues, latency, jitter, loss), the connections
between nodes (who can talk to whom now), partitions, and per-node traffic counters. A message handed to
`Network.send` costs, in virtual time:

    queueing at the sender's uplink (FIFO behind everything it already sent)  + size / uplink
  + path latency (both ends' one-way access latency, plus uniform jitter)      + lost-segment retransmits
  + queueing at the receiver's downlink                                        (+ size / downlink)

so a busy uplink is really shared: a seed that hands 1,000 peers a block each needs 1,000 block times.
A message of at most `SPARSE` bytes (wants, presences) does not queue behind bulk data: it is charged
to the link (bulk data queued behind it waits that much longer) but leaves and drains at once, as
sparse flows do under Linux's default fq_codel/fq queueing, where a small message on one connection
interleaves with a large transfer on another instead of waiting for it. Per connection, order is
still kept, so a small message never overtakes a block sent before it to the same peer.
Connections behave like TCP streams: order is kept per (sender, receiver), loss costs a retransmit
timeout instead of losing the message, and a cut connection (unlink, partition, a node leaving) drops
everything still in flight on it and tells both ends.

It must not know any protocol: a message is a size and an opaque payload, and a node is whatever
object has `on_connected(peer)`, `on_disconnected(peer)` and `on_message(peer, payload)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Protocol

from .core import Sim

__all__ = ["LinkProfile", "Network", "PROFILES", "profile"]

NodeId = Hashable

MBIT = 1_000_000 / 8  # bytes per second in one Mbit/s
SEGMENT = 64 * 1024  # loss is drawn per segment of this size
SPARSE = 16 * 1024  # messages up to this size interleave with bulk data instead of queueing behind it


@dataclass(frozen=True)
class LinkProfile:
    """A node's access link. `latency` is one-way, from the node to the network core: a path between
    two nodes has the sum of both ends' latencies."""

    name: str
    latency: float  # seconds, one way to the core
    up: float  # bytes per second
    down: float  # bytes per second
    jitter: float = 0.0  # seconds, uniform 0..jitter added per message
    loss: float = 0.0  # probability that a 64 KiB segment is lost once and retransmitted
    rto_min: float = 0.2  # seconds: a retransmit costs max(rto_min, 2 × path RTT)


PROFILES: dict[str, LinkProfile] = {
    p.name: p
    for p in (
        LinkProfile("lan-1g", latency=0.000_1, up=1000 * MBIT, down=1000 * MBIT, jitter=0.000_05),
        LinkProfile("dc-10g", latency=0.000_05, up=10_000 * MBIT, down=10_000 * MBIT, jitter=0.000_02),
        LinkProfile("wan-100m-40ms", latency=0.010, up=100 * MBIT, down=100 * MBIT, jitter=0.002, loss=0.0005),
        LinkProfile("wan-20m-80ms", latency=0.020, up=20 * MBIT, down=100 * MBIT, jitter=0.005, loss=0.001),
        LinkProfile("lossy-lan", latency=0.000_5, up=100 * MBIT, down=100 * MBIT, jitter=0.001, loss=0.01),
    )
}
"""Named profiles. Latencies are per end, so `wan-100m-40ms` ↔ `wan-100m-40ms` is 20 ms one way, 40 ms RTT."""


def profile(name: str) -> LinkProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown link profile {name!r}; known: {', '.join(sorted(PROFILES))}") from None


class Endpoint(Protocol):
    # `peer` is always an id the network was given in `add` (each endpoint uses its own id type).
    def on_connected(self, peer: Any) -> None: ...

    def on_disconnected(self, peer: Any) -> None: ...

    def on_message(self, peer: Any, payload: Any) -> None: ...


class _Nic:
    __slots__ = ("profile", "endpoint", "up_free", "down_free", "bytes_sent", "bytes_received",
                 "messages_sent", "messages_received", "dropped")

    def __init__(self, profile: LinkProfile, endpoint: Endpoint) -> None:
        self.profile = profile
        self.endpoint = endpoint
        self.up_free = 0.0  # virtual time the uplink finishes what is queued on it
        self.down_free = 0.0
        self.bytes_sent = self.bytes_received = self.messages_sent = self.messages_received = self.dropped = 0


def _path(s: _Nic, d: _Nic) -> tuple:
    """What `Network.send` reads of a connection's two ends on every message, from sender `s` to receiver
    `d`, computed once per connection: the nics, path latency and jitter, loss, `rto_min`, rates."""
    sp, dp = s.profile, d.profile
    return (s, d, sp.latency + dp.latency, sp.jitter + dp.jitter, 1 - (1 - sp.loss) * (1 - dp.loss), sp.rto_min,
            sp.up, dp.down, [0.0])  # the last: [time the last message sent this way is delivered]


def _pair(a: NodeId, b: NodeId) -> tuple:
    return (a, b) if repr(a) <= repr(b) else (b, a)


class Network:
    def __init__(self, sim: Sim, handshake_rtts: float = 2.0) -> None:
        self.sim = sim
        self.rng = sim.rng_for("links")
        self.handshake_rtts = handshake_rtts  # TCP + Noise + muxer negotiation, in RTTs
        self._nics: dict[NodeId, _Nic] = {}
        self._conns: dict[tuple, int] = {}  # live connection -> epoch
        # The same, by (sender, receiver) in both directions -> (connection, epoch): what `send` and
        # `connected` look up on every message, without building the ordered pair (two reprs) each time.
        # Each direction's entry ends with its last delivery time (streams keep order), new with each connection.
        self._ends: dict[tuple, tuple] = {}  # (connection, epoch) + `_path` of that direction
        self._dialling: dict[tuple, int] = {}
        self._wanted: set[tuple] = set()  # connections to re-establish after a heal
        self._blocked: set[tuple] = set()  # unlinked pairs
        self._groups: dict[NodeId, int] | None = None  # partition: node -> group
        self._epoch = 0
        self.neighbours: dict[NodeId, set[NodeId]] = {}

    # -- nodes ------------------------------------------------------------------------------------
    def add(self, node: NodeId, link: LinkProfile, endpoint: Endpoint) -> None:
        self._nics[node] = _Nic(link, endpoint)
        self.neighbours[node] = set()

    def remove(self, node: NodeId) -> None:
        """The node leaves: its connections are cut (peers are told) and nothing more reaches it."""
        for peer in sorted(self.neighbours.get(node, ()), key=repr):  # sorted: the same order whatever the hash seed
            self._cut(node, peer, tell=(peer,))
        self._wanted = {p for p in self._wanted if node not in p}
        self._nics.pop(node, None)
        self.neighbours.pop(node, None)

    def alive(self, node: NodeId) -> bool:
        return node in self._nics

    def nodes(self) -> list[NodeId]:
        return list(self._nics)

    def link_of(self, node: NodeId) -> LinkProfile:
        return self._nics[node].profile

    def counters(self, node: NodeId) -> dict[str, int]:
        n = self._nics[node]
        return {"bytes_sent": n.bytes_sent, "bytes_received": n.bytes_received,
                "messages_sent": n.messages_sent, "messages_received": n.messages_received}

    # -- reachability -----------------------------------------------------------------------------
    def reachable(self, a: NodeId, b: NodeId) -> bool:
        if a not in self._nics or b not in self._nics or a == b:
            return False
        if _pair(a, b) in self._blocked:
            return False
        g = self._groups
        return g is None or g.get(a, -1) == g.get(b, -1)

    def rtt(self, a: NodeId, b: NodeId) -> float:
        return 2 * (self._nics[a].profile.latency + self._nics[b].profile.latency)

    def connected(self, a: NodeId, b: NodeId) -> bool:
        return (a, b) in self._ends

    def connect(self, a: NodeId, b: NodeId, on_done: Callable[[bool], None] | None = None) -> None:
        """Dial: after the handshake both ends get `on_connected`. Kept as wanted: a partition that
        cuts it redials it when healed."""
        pair = _pair(a, b)
        self._wanted.add(pair)
        if pair in self._conns:
            if on_done:
                on_done(True)
            return
        if not self.reachable(a, b):
            if on_done:
                # An unreachable dial fails after a timeout, not at once.
                self.sim.after(5.0, on_done, False)
            return
        if pair in self._dialling:
            return
        self._epoch += 1
        self._dialling[pair] = self._epoch
        self.sim.after(self.handshake_rtts * self.rtt(a, b), self._established, pair, self._epoch, on_done)

    def _established(self, pair: tuple, epoch: int, on_done: Callable[[bool], None] | None) -> None:
        if self._dialling.get(pair) != epoch:
            return
        del self._dialling[pair]
        a, b = pair
        if not self.reachable(a, b):
            if on_done:
                on_done(False)
            return
        self._conns[pair] = epoch
        na, nb = self._nics[a], self._nics[b]
        self._ends[(a, b)] = (pair, epoch) + _path(na, nb)
        self._ends[(b, a)] = (pair, epoch) + _path(nb, na)
        self.neighbours[a].add(b)
        self.neighbours[b].add(a)
        self._nics[a].endpoint.on_connected(b)
        self._nics[b].endpoint.on_connected(a)
        if on_done:
            on_done(True)

    def disconnect(self, a: NodeId, b: NodeId) -> None:
        """One end closes the connection on purpose (a ban): not redialled by heals."""
        pair = _pair(a, b)
        self._wanted.discard(pair)
        self._cut(a, b, tell=(a, b))

    def _cut(self, a: NodeId, b: NodeId, tell: tuple) -> None:
        pair = _pair(a, b)
        self._dialling.pop(pair, None)
        if self._conns.pop(pair, None) is None:
            return
        self._ends.pop((a, b), None)
        self._ends.pop((b, a), None)
        self.neighbours.get(a, set()).discard(b)
        self.neighbours.get(b, set()).discard(a)
        for x, y in ((a, b), (b, a)):
            if x in tell and x in self._nics:
                self._nics[x].endpoint.on_disconnected(y)

    def unlink(self, a: NodeId, b: NodeId) -> None:
        self._blocked.add(_pair(a, b))
        self._cut(a, b, tell=(a, b))

    def relink(self, a: NodeId, b: NodeId) -> None:
        self._blocked.discard(_pair(a, b))
        if _pair(a, b) in self._wanted:
            self.connect(a, b)

    def partition(self, groups: list[set]) -> None:
        """Split the network: nodes in different groups (or in none) cannot reach each other."""
        self._groups = {n: i for i, g in enumerate(groups) for n in g}
        for pair in list(self._conns):
            a, b = pair
            if not self.reachable(a, b):
                self._cut(a, b, tell=pair)

    def heal(self) -> None:
        self._groups = None
        for pair in sorted(self._wanted, key=repr):
            if pair not in self._conns and self.reachable(*pair):
                self.connect(*pair)

    # -- messages ---------------------------------------------------------------------------------
    def send(self, src: NodeId, dst: NodeId, size: int, payload: Any,
             on_written: Callable[[], None] | None = None) -> bool:
        """Queue `payload` of `size` bytes from src to dst on their connection. False (and nothing sent)
        when they are not connected. `on_written` runs when the sender's uplink has sent the last byte
        (a driver's `write` returning), even if the connection is cut later."""
        live = self._ends.get((src, dst))
        if live is None:
            return False
        pair, epoch, s, d, latency, jitter, loss, rto_min, up, down, last = live
        sim = self.sim
        now = sim.now()
        sparse = size <= SPARSE
        up_free = s.up_free
        start = up_free if up_free > now else now
        s.up_free = up_free = start + size / up
        written = now + size / up if sparse else up_free
        s.bytes_sent += size
        s.messages_sent += 1
        if jitter:
            latency += self.rng.random() * jitter
        if loss:
            rto = max(rto_min, 4 * latency)
            for _ in range(max(1, math.ceil(size / SEGMENT))):
                if self.rng.random() < loss:
                    latency += rto
        arrive = written + latency
        # The receiver's downlink drains at its own rate: a receiver fed by many senders queues them.
        drain = size / down
        # (conditionals for `max`: the same values, without a builtin call per message)
        down_free = d.down_free
        if sparse:
            done = arrive + drain
            d.down_free = (down_free if down_free >= arrive else arrive) + drain
        else:
            done = down_free + drain
            if arrive >= done:
                done = arrive
            d.down_free = done
        if done < last[0]:
            done = last[0]
        last[0] = done
        if on_written is not None:
            sim.post(written, on_written)
        sim.post(done, self._deliver, src, d, pair, epoch, size, payload)
        return True

    def _deliver(self, src: NodeId, d: _Nic, pair: tuple, epoch: int, size: int, payload: Any) -> None:
        # `d` is the receiver's nic: a live connection's ends are live nodes (a node that leaves has
        # its connections cut first, so the epoch test below fails for what was in flight to it).
        if self._conns.get(pair) != epoch:
            nic = self._nics.get(src)
            if nic is not None:
                nic.dropped += 1
            return
        d.bytes_received += size
        d.messages_received += 1
        d.endpoint.on_message(src, payload)
