"""Simulated Kademlia for provider lookups: the program behind `dht-lookup`.

What runs: the lookups are driven by the project's real `p2pcache.routing.query.ProviderQuery` (candidate
order by XOR distance, alpha in flight, hop counting, stopping rule) and keys come from the real
`p2pcache.routing.keys.dht_key`. The DHT *server side* is simulated here instead of py-libp2p's `KadDHT`:
per-node k-buckets (k per bucket, XOR distance over sha256 of the peer id, the metric `ProviderQuery`
uses), a provider store per node, and three request kinds (find-node, get-providers, add-provider) as
request/response messages over simnet links (a dial costs the handshake, an RPC one RTT plus size /
bandwidth, a dead or cut-off peer costs `rpc_timeout`). A node learns a peer when it hears from it and
forgets it when an RPC to it fails.

Churn: nodes leave (their provider store, connections and routing entry go with them; records naming
them on other nodes stay until they expire, as on a real DHT) and fresh nodes join by a bootstrap
peer and a self-lookup, at a uniform rate during the lookup phase.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Hashable
from functools import partial
from typing import Any, Callable, Generic, TypeVar

from p2pcache.routing.keys import dht_key
from p2pcache.routing.query import ProviderQuery

from .core import Sim
from .links import Network, profile
from .metrics import Results, percentile

log = logging.getLogger(__name__)

__all__ = ["KadNode", "run_dht_lookup"]

_PEER_WIRE = 40 + 12  # a peer entry in an answer: peer id + one address
_REQUEST = 64


def _pos(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest(), "big")


P = TypeVar("P", bound=Hashable)


def _distance(entry: tuple[int, Any]) -> int:
    return entry[0]


class RoutingTable(Generic[P]):
    """k-buckets of peers (names here, py-libp2p `ID`s in `routingsim`) by XOR distance of their positions."""

    def __init__(self, self_pos: int, k: int) -> None:
        self.self_pos, self.k = self_pos, k
        self.buckets: dict[int, dict[P, int]] = {}  # bucket -> {peer: pos}, insertion order = age
        self.where: dict[P, int] = {}

    def add(self, peer: P, pos: int) -> None:
        if peer in self.where:
            return
        b = (pos ^ self.self_pos).bit_length()
        bucket = self.buckets.setdefault(b, {})
        if len(bucket) >= self.k:
            return  # Kademlia keeps its old, proven entries
        bucket[peer] = pos
        self.where[peer] = b

    def remove(self, peer: P) -> None:
        b = self.where.pop(peer, None)
        if b is not None:
            del self.buckets[b][peer]

    def closest(self, target: int, n: int) -> list[P]:
        entries = [(pos ^ target, peer) for bucket in self.buckets.values() for peer, pos in bucket.items()]
        entries.sort(key=_distance)  # positions are sha256 of distinct ids: no two distances tie
        return [peer for _, peer in entries[:n]]

    def __len__(self) -> int:
        return len(self.where)


class KadNode:
    """One DHT server: routing table, provider store, RPCs over the simulated network."""

    def __init__(self, world: "DhtWorld", name: str, peer_bytes: bytes) -> None:
        self.world, self.name, self.peer_bytes = world, name, peer_bytes
        self.pos = _pos(peer_bytes)
        self.table: RoutingTable[str] = RoutingTable(self.pos, world.k)
        self.providers: dict[bytes, dict[str, float]] = {}
        self.alive = True
        self._pending: dict[int, tuple[Callable, Callable, Any]] = {}
        self._next = 0

    # -- network endpoint ---------------------------------------------------------------------------
    def on_connected(self, peer: str) -> None:
        pass

    def on_disconnected(self, peer: str) -> None:
        pass

    def on_message(self, peer: str, payload: tuple) -> None:
        if not self.alive:
            return
        kind, rid, body = payload
        if kind == "rep":
            entry = self._pending.pop(rid, None)
            if entry is not None:
                entry[2].cancel()
                self.table.add(peer, self.world.pos[peer])
                entry[0](body)
            return
        self.table.add(peer, self.world.pos[peer])  # learn who talks to us
        op, key = body[0], body[1]
        target = _pos(key)
        closer = [p for p in self.table.closest(target, self.world.k) if p != peer]
        if op == "add_provider":
            self.providers.setdefault(key, {})[body[2]] = self.world.sim.now() + self.world.record_ttl
            reply, size = None, 16
        elif op == "get_providers":
            now = self.world.sim.now()
            provs = [p for p, exp in self.providers.get(key, {}).items() if exp > now]
            reply, size = (provs, closer), 16 + _PEER_WIRE * (len(provs) + len(closer))
        else:
            reply, size = ([], closer), 16 + _PEER_WIRE * len(closer)
        self.world.net.send(self.name, peer, size, ("rep", rid, reply))

    # -- asking -------------------------------------------------------------------------------------
    def rpc(self, peer: str, body: tuple, on_reply: Callable[[Any], None], on_fail: Callable[[], None]) -> None:
        self._next += 1
        rid = self._next
        timer = self.world.sim.after(self.world.rpc_timeout, self._timeout, rid, cancellable=True)
        self._pending[rid] = (on_reply, on_fail, timer)
        net = self.world.net

        def go(ok: bool) -> None:
            if rid not in self._pending:
                return
            if not ok or not net.send(self.name, peer, _REQUEST + len(body[1]), ("req", rid, body)):
                self._fail(rid, peer)
        if net.connected(self.name, peer):
            go(True)
        else:
            net.connect(self.name, peer, go)

    def _timeout(self, rid: int) -> None:
        self._fail(rid, None)

    def _fail(self, rid: int, peer: str | None) -> None:
        entry = self._pending.pop(rid, None)
        if entry is not None:
            entry[2].cancel()
            entry[1]()

    def walk(self, key: bytes, want: int, on_done: Callable[[ProviderQuery, list[str]], None]) -> ProviderQuery:
        """One iterative GET_PROVIDERS lookup driven by the real ProviderQuery. `on_done(query, answered)`."""
        w = self.world
        q: ProviderQuery = ProviderQuery(key=key, peer_bytes=w.peer_bytes.__getitem__, self_peer=self.name,
                                         alpha=w.alpha, k=w.k, want=want, max_asks=w.max_asks)
        q.add_seeds(self.table.closest(_pos(key), w.k))
        answered: list[str] = []
        finished = [False]

        def pump() -> None:
            if finished[0] or not self.alive:
                return
            while (peer := q.next_peer()) is not None:
                self.rpc(peer, ("get_providers", key), partial(reply, peer), partial(fail, peer))
            if q.done and not finished[0]:
                finished[0] = True
                on_done(q, answered)

        def reply(peer: str, body: tuple) -> None:
            if finished[0]:
                return
            provs, closer = body
            answered.append(peer)
            q.on_answer(peer, [(p, p) for p in provs], closer)
            pump()

        def fail(peer: str) -> None:
            self.table.remove(peer)
            if finished[0]:
                return
            q.on_failure(peer)
            pump()

        pump()
        return q

    def provide(self, key: bytes, on_done: Callable[[], None] | None = None) -> None:
        """Store a provider record at the k closest peers a lookup reaches."""
        def placed(q: ProviderQuery, answered: list[str]) -> None:
            target = _pos(key)
            closest = sorted(set(answered), key=lambda p: self.world.pos[p] ^ target)[: self.world.k]
            self.providers.setdefault(key, {})[self.name] = self.world.sim.now() + self.world.record_ttl
            for p in closest:
                self.rpc(p, ("add_provider", key, self.name), lambda _b: None, lambda: None)
            if on_done:
                on_done()
        self.walk(key, want=10**9, on_done=placed)

    def join(self, bootstrap: list[str]) -> None:
        for b in bootstrap:
            self.table.add(b, self.world.pos[b])
        self.walk(self.peer_bytes, want=10**9, on_done=lambda q, a: None)


class DhtWorld:
    def __init__(self, sim: Sim, net: Network, params: dict) -> None:
        self.sim, self.net = sim, net
        self.k = int(params["k"])
        self.alpha = int(params["alpha"])
        self.rpc_timeout = float(params["rpc_timeout"])
        self.record_ttl = float(params["record_ttl"])
        self.max_asks = int(params.get("max_asks", 200))
        self.nodes: dict[str, KadNode] = {}
        self.peer_bytes: dict[str, bytes] = {}  # every peer id ever seen; ids outlive their nodes
        self.pos: dict[str, int] = {}
        self.rng = sim.rng_for("dht")
        self._count = 0

    def spawn(self, link: str) -> KadNode:
        name = f"node-{self._count}"
        self._count += 1
        pb = b"\x00\x24\x08\x01\x12\x20" + self.rng.randbytes(32)  # shaped like an ed25519 peer id
        self.peer_bytes[name] = pb
        self.pos[name] = _pos(pb)
        node = KadNode(self, name, pb)
        self.nodes[name] = node
        self.net.add(name, profile(link), node)
        return node

    def alive(self) -> list[str]:
        return [n for n, node in self.nodes.items() if node.alive]

    def leave(self, name: str) -> None:
        node = self.nodes[name]
        node.alive = False
        node.providers.clear()
        node._pending.clear()
        self.net.remove(name)


def _republish(world: DhtWorld, key: bytes, provider: str) -> None:
    if world.nodes[provider].alive:
        world.nodes[provider].provide(key)


async def run_dht_lookup(sim: Sim, sc: Any, results: Results) -> dict:
    p = sc.params
    net = Network(sim)
    world = DhtWorld(sim, net, p)
    rng = sim.rng_for("dht-scenario")
    role = sc.role("node")
    n = role.count
    # Bootstrap: nodes join one after another, each through a few peers already in.
    join_every = float(p["join_interval"])
    for i in range(n):
        def join(i=i) -> None:
            node = world.spawn(role.link)
            others = [x for x in world.alive() if x != node.name]
            node.join(rng.sample(others, min(3, len(others))))
        sim.at(i * join_every, join)
    await sim.run(until=n * join_every + 30.0)
    for name in world.alive():  # one refresh round, as a bootstrapped node does
        world.nodes[name].walk(world.peer_bytes[name], want=10**9, on_done=lambda q, a: None)
    await sim.run(until=sim.now() + 60.0)
    tables = [len(world.nodes[x].table) for x in world.alive()]
    log.info("t=%.1f: %d nodes joined, routing table median %d", sim.now(), n, percentile(tables, 50))

    # Providers: each key is provided by a random node.
    keys: list[tuple[bytes, str]] = []
    for i in range(int(p["keys"])):
        key = dht_key("sha256:" + hashlib.sha256(f"simnet-key/{sim.seed}/{i}".encode()).hexdigest())
        provider = rng.choice(world.alive())
        keys.append((key, provider))
        world.nodes[provider].provide(key)
    await sim.run(until=sim.now() + 60.0)
    start = sim.now()
    phase = float(p["lookup_phase"])

    # Churn: `churn` × n nodes leave during the phase, each replaced by a fresh node.
    leaves = int(round(float(p["churn"]) * n))
    churned: list[str] = []
    for _ in range(leaves):
        def churn() -> None:
            alive = world.alive()
            victim = rng.choice(alive)
            world.leave(victim)
            churned.append(victim)
            fresh = world.spawn(role.link)
            fresh.join(rng.sample([x for x in alive if x != victim], 3))
        sim.at(start + rng.random() * phase, churn)
    # Republish: providers re-announce their keys every `republish` seconds.
    republish = float(p["republish"])
    if republish > 0:
        t = start + republish
        while t < start + phase:
            for key, provider in keys:
                sim.at(t, _republish, world, key, provider)
            t += republish

    lookups: list[dict] = []

    def lookup() -> None:
        live_keys = [(k, pr) for k, pr in keys if world.nodes[pr].alive]
        key, provider = rng.choice(live_keys)
        origin = rng.choice([x for x in world.alive() if x != provider])
        t0 = sim.now()
        rec: dict[str, Any] = {"at": t0}

        def done(q: ProviderQuery, answered: list[str]) -> None:
            rec.update(found=q.found, rounds=q.stats.found_at_hop, max_hop=q.stats.max_hop, asked=q.stats.asked,
                       failed=q.stats.failed, time=sim.now() - t0,
                       live=any(world.nodes[x].alive for x in q.providers), right=provider in q.providers)
        world.nodes[origin].walk(key, want=int(p["want"]), on_done=done)
        lookups.append(rec)
    count = int(p["lookups"])
    for i in range(count):
        sim.at(start + (i + 0.5) * phase / count, lookup)
    await sim.run(until=start + phase + 4 * world.rpc_timeout)

    finished = [r for r in lookups if "found" in r]
    found = [r for r in finished if r["found"]]
    results.add("nodes", n, "nodes", "none")
    results.add("churn_leaves", len(churned), "nodes", "none", churn=p["churn"], phase_s=phase)
    results.add("lookups", len(lookups), "lookups", "none")
    results.add("lookup_success", len(found) / max(1, len(lookups)), "fraction", "higher")
    results.add("lookup_live_provider", sum(1 for r in found if r["live"]) / max(1, len(lookups)), "fraction", "higher")
    results.add("rounds_median", percentile([r["rounds"] for r in found], 50), "hops", "lower",
                note="hop of the peer whose answer named the first provider (seeds are hop 1)")
    results.add("rounds_p90", percentile([r["rounds"] for r in found], 90), "hops", "lower")
    results.add("rpcs_per_lookup_median", percentile([r["asked"] for r in finished], 50), "rpcs", "lower")
    results.add("rpc_failures_per_lookup_mean",
                sum(r["failed"] for r in finished) / max(1, len(finished)), "rpcs", "lower")
    results.add("lookup_time_p50", percentile([r["time"] for r in found], 50), "s", "lower")
    results.add("lookup_time_p99", percentile([r["time"] for r in found], 99), "s", "lower")
    results.add("routing_table_median", percentile(tables, 50), "peers", "none")
    alive = net.nodes()
    results.add("messages", sum(net.counters(x)["messages_sent"] for x in alive), "messages", "lower")
    results.add("bytes_sent", sum(net.counters(x)["bytes_sent"] for x in alive), "bytes", "lower")
    results.series.update(lookups=lookups, churned=churned, start=start)
    return results.series
