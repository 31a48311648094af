"""Client and server engines in pairs and triples, with a list as the wire and a fake clock.

`Net` is a tiny discrete-event simulation: every message is really encoded and decoded (so the engines
meet exactly the bytes a libp2p stream would carry), takes `latency` plus its size over the sender's
upload `bandwidth`, and timers fire at virtual times. No sockets, no threads, no sleeping.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcache.content.cid import CID, RAW
from p2pcache.exchange.client import WantState
from p2pcache.exchange import (
    AddProviders,
    BitswapClient,
    BitswapServer,
    BlocksAdded,
    ClientConfig,
    CloseSession,
    Deliver,
    FetchFailed,
    Message,
    MessageReceived,
    MessageSent,
    PeerConnected,
    PeerDisconnected,
    PeerMisbehaved,
    PenalisePeer,
    ProtocolViolation,
    Send,
    ServerConfig,
    SetTimer,
    Tick,
    Want,
    WantEntry,
    WantType,
    decode,
    encode,
)
from p2pcache.exchange.message import Block, Presence


def make_blocks(n: int, size: int = 4096, seed: int = 0) -> dict[CID, bytes]:
    out = {}
    for i in range(n):
        data = (f"{seed}:{i}:".encode() * (size // 4 + 1))[:size]
        out[CID.for_block(RAW, data)] = data
    return out


class DictSource:
    def __init__(self, blocks: dict[CID, bytes]) -> None:
        self.blocks = dict(blocks)

    def has(self, cid: CID) -> bool:
        return cid in self.blocks

    def size(self, cid: CID) -> int | None:
        data = self.blocks.get(cid)
        return None if data is None else len(data)

    def get(self, cid: CID) -> bytes | None:
        return self.blocks.get(cid)


@dataclass
class Node:
    name: str
    client: BitswapClient | None = None
    server: BitswapServer | None = None
    latency: float = 0.005  # seconds, one way, for messages this node sends
    bandwidth: float = 100e6  # bytes per second this node can send
    link_free_at: float = 0.0
    muted: bool = False  # drops everything it receives (a peer that hangs)
    corrupt: bool = False  # flips a byte in every block it sends
    garbage: bool = False  # sends bytes that do not parse
    timer: float | None = None
    delivered: dict = field(default_factory=dict)  # (session, cid) -> data
    failed: dict = field(default_factory=dict)  # (session, cid) -> why
    penalised: list = field(default_factory=list)
    sent_blocks: list = field(default_factory=list)  # (to, cid) in send order, for servers
    received: list = field(default_factory=list)  # decoded messages, in order
    done_at: float = 0.0  # virtual time of the last Deliver or FetchFailed


class Net:
    def __init__(self) -> None:
        self.now = 0.0
        self.nodes: dict[str, Node] = {}
        self.wire: list = []  # heap of (deliver_at, seq, kind, src, dst, payload)
        self.seq = itertools.count()
        self.links: set[frozenset] = set()
        self.on_deliver = None  # callback(net, node, Deliver)
        self.checks = []  # invariants checked after every client step
        self.states_seen: set = set()  # WantStates of the clients' wants after some step
        self.log: list = []  # (time, src, dst, Message) for every Send, as the engine emitted it

    def add(self, name: str, blocks: dict | None = None, client: ClientConfig | None | bool = None,
            server: ServerConfig | None = None, **kw) -> Node:
        node = Node(name, **kw)
        if blocks is not None:
            node.server = BitswapServer(DictSource(blocks), server)
        if client is not None and client is not False:
            node.client = BitswapClient(client if isinstance(client, ClientConfig) else None)
        self.nodes[name] = node
        return node

    def connect(self, a: str, b: str) -> None:
        self.links.add(frozenset((a, b)))
        self.step(a, PeerConnected(b))
        self.step(b, PeerConnected(a))

    def disconnect(self, a: str, b: str) -> None:
        self.links.discard(frozenset((a, b)))
        self.wire = [w for w in self.wire if {w[3], w[4]} != {a, b}]
        heapq.heapify(self.wire)
        self.step(a, PeerDisconnected(b))
        self.step(b, PeerDisconnected(a))

    # -- pumping ------------------------------------------------------------------------------
    def step(self, name: str, event) -> None:
        node = self.nodes[name]
        for engine in (node.client, node.server):
            if engine is not None:
                self.apply(node, engine, engine.handle(event, self.now))
        if node.client is not None:
            node.client.check_invariants()  # WantState's invariant, after every step of every test
            self.states_seen.update(w.state for w in node.client._wants.values())
            for check in self.checks:
                check(node)

    def apply(self, node: Node, engine, actions) -> None:
        for a in actions:
            if isinstance(a, Send):
                msg = a.message
                self.log.append((self.now, node.name, a.peer, msg))
                if engine is node.server:
                    assert a.size == (len(encode(msg)) if msg.blocks else 0)
                    node.sent_blocks += [(a.peer, b.cid) for b in msg.blocks]
                    if node.corrupt:
                        msg = Message(blocks=tuple(Block(b.cid, b"\x00" + b.data[1:]) for b in msg.blocks),
                                      presences=msg.presences, pending_bytes=msg.pending_bytes)
                payload = b"\xff\xff\xff" if node.garbage else encode(msg)
                start = max(self.now, node.link_free_at)
                node.link_free_at = start + len(payload) / node.bandwidth
                at = node.link_free_at + node.latency
                heapq.heappush(self.wire, (at, next(self.seq), "msg", node.name, a.peer, (payload, a.size, engine is node.server)))
            elif isinstance(a, Deliver):
                assert (a.session, a.cid) not in node.delivered, "delivered twice"
                assert a.cid.verify(a.data)
                node.delivered[(a.session, a.cid)] = a.data
                node.done_at = self.now
                if self.on_deliver:
                    self.on_deliver(self, node, a)
            elif isinstance(a, FetchFailed):
                node.failed[(a.session, a.cid)] = a.why
                node.done_at = self.now
            elif isinstance(a, SetTimer):
                assert a.at > self.now - 1e-9
                # one timer per node for both engines (as the drivers keep it): the earliest request
                node.timer = a.at if node.timer is None else min(node.timer, a.at)
            elif isinstance(a, PenalisePeer):
                node.penalised.append((self.now, a))
            else:
                raise AssertionError(f"unexpected action {a!r}")

    def run(self, until: float = 1e9, max_steps: int = 200_000) -> None:
        for _ in range(max_steps):
            timers = [(n.timer, n.name) for n in self.nodes.values() if n.timer is not None]
            next_timer = min(timers) if timers else None
            next_msg = self.wire[0] if self.wire else None
            if next_msg is None and next_timer is None:
                return
            if next_msg is not None and (next_timer is None or next_msg[0] <= next_timer[0]):
                at, _, _, src, dst, (payload, size, from_server) = heapq.heappop(self.wire)
                if at > until:
                    heapq.heappush(self.wire, (at, 0, "msg", src, dst, (payload, size, from_server)))
                    return
                self.now = at
                if from_server:  # the driver acknowledges a written message to the server
                    self.step_engine(src, "server", MessageSent(dst, size))
                if frozenset((src, dst)) not in self.links or self.nodes[dst].muted:
                    continue
                try:
                    msg = decode(payload)
                except ProtocolViolation as e:
                    self.step(dst, PeerMisbehaved(src, str(e)))
                    continue
                self.nodes[dst].received.append((src, msg))
                self.step(dst, MessageReceived(src, msg))
            else:
                at, name = next_timer
                if at > until:
                    return
                self.now = max(self.now, at)
                self.nodes[name].timer = None
                self.step(name, Tick())
        raise AssertionError("simulation did not settle")

    def step_engine(self, name: str, which: str, event) -> None:
        node = self.nodes[name]
        engine = getattr(node, which)
        self.apply(node, engine, engine.handle(event, self.now))


def fetch_net(n_servers: int, blocks: dict, client_cfg: ClientConfig | None = None, **server_kw) -> Net:
    net = Net()
    net.add("c", client=client_cfg or ClientConfig())
    for i in range(n_servers):
        net.add(f"s{i}", blocks=blocks, **server_kw)
        net.connect("c", f"s{i}")
    return net


def served_by(net: Net, client: str = "c") -> dict[str, int]:
    return {n.name: sum(1 for to, _ in n.sent_blocks if to == client) for n in net.nodes.values() if n.server}


# -- fetching ------------------------------------------------------------------------------------


def test_fetch_many_blocks_from_one_server():
    blocks = make_blocks(300)
    net = fetch_net(1, blocks)
    net.step("c", Want("s", tuple(blocks)))
    net.run()
    c = net.nodes["c"]
    assert {cid: d for (_, cid), d in c.delivered.items()} == blocks
    assert not c.failed and not c.penalised
    stats = c.client.stats()
    assert stats.blocks_received == 300 and stats.duplicate_blocks == 0
    assert stats.want_blocks_sent == 300 and stats.timeouts == 0
    assert net.nodes["s0"].server.ledger("c").blocks_sent == 300
    assert c.client.wanted("s") == frozenset()


def test_fetch_from_several_servers_splits_work_without_duplicates():
    blocks = make_blocks(240)
    net = fetch_net(3, blocks)
    net.step("c", Want("s", tuple(blocks)))
    net.run()
    c = net.nodes["c"]
    assert len(c.delivered) == 240 and not c.failed
    counts = served_by(net)
    assert all(v > 30 for v in counts.values()), counts
    assert sum(counts.values()) == 240  # nobody sent a block twice
    assert c.client.stats().duplicate_blocks == 0


def test_faster_server_gets_more_wants():
    blocks = make_blocks(200, size=64 * 1024)
    net = Net()
    net.add("c", client=ClientConfig(have_fanout=0))
    net.add("fast", blocks=blocks, bandwidth=50e6, latency=0.002)
    net.add("slow", blocks=blocks, bandwidth=5e6, latency=0.02)
    net.connect("c", "fast")
    net.connect("c", "slow")
    net.step("c", Want("s", tuple(blocks)))
    net.run()
    counts = served_by(net)
    assert len(net.nodes["c"].delivered) == 200
    assert counts["fast"] > 3 * counts["slow"] > 0, counts
    fast, slow = net.nodes["c"].client.peer_stats("fast"), net.nodes["c"].client.peer_stats("slow")
    assert fast.service_time < slow.service_time
    assert fast.throughput > slow.throughput


def test_session_adds_cids_as_it_learns_them():
    children = make_blocks(20, seed=1)
    root_data = b"".join(cid.buffer for cid in children)  # a toy manifest: the caller decodes it
    root = CID.for_block(RAW, root_data)
    net = fetch_net(2, {root: root_data, **children})

    def learn(net, node, d):
        if d.cid == root:
            names = [CID.decode(d.data[i : i + 36]) for i in range(0, len(d.data), 36)]
            net.step(node.name, Want(d.session, tuple(names)))

    net.on_deliver = learn
    net.step("c", Want("s", (root,)))
    net.run()
    assert len(net.nodes["c"].delivered) == 21


def test_two_sessions_wanting_one_block_fetch_it_once():
    blocks = make_blocks(10)
    net = fetch_net(1, blocks)
    net.step("c", Want("a", tuple(blocks)))
    net.step("c", Want("b", tuple(blocks)[:5]))
    net.run()
    c = net.nodes["c"]
    assert len(c.delivered) == 15
    assert net.nodes["s0"].server.ledger("c").blocks_sent == 10


def test_window_bounds_are_respected():
    blocks = make_blocks(200)
    cfg = ClientConfig(peer_window=4, session_window=6, peer_have_window=3)
    net = fetch_net(3, blocks, cfg)
    seen = {"peer": 0, "session": 0, "have": 0}

    def check(node):
        cl = node.client
        per_peer = [len(cl.outstanding(p)) for p in ("s0", "s1", "s2")]
        haves = [cl.peer_stats(p).want_haves_outstanding for p in ("s0", "s1", "s2") if cl.peer_stats(p)]
        assert max(per_peer) <= 4 and sum(per_peer) <= 6 and max(haves, default=0) <= 3
        seen["peer"] = max(seen["peer"], max(per_peer))
        seen["session"] = max(seen["session"], sum(per_peer))
        seen["have"] = max(seen["have"], max(haves, default=0))

    net.checks.append(check)
    net.step("c", Want("s", tuple(blocks)))
    net.run()
    assert len(net.nodes["c"].delivered) == 200
    assert seen == {"peer": 4, "session": 6, "have": 3}  # the windows were reached, and held
    # and the wire agrees with the engine's own view
    for name in ("s0", "s1", "s2"):
        assert net.nodes[name].server.ledger("c").blocks_sent <= 200


# -- re-asking -----------------------------------------------------------------------------------


def test_dont_have_re_asks_another_peer():
    blocks = make_blocks(40)
    half = dict(list(blocks.items())[:20])
    net = Net()
    net.add("c", client=ClientConfig(have_fanout=0))  # no want-haves: the re-ask must come from DONT_HAVE
    net.add("partial", blocks=half)
    net.add("full", blocks=blocks)
    net.connect("c", "partial")
    net.connect("c", "full")
    net.step("c", Want("s", tuple(blocks)))
    net.run()
    c = net.nodes["c"]
    assert len(c.delivered) == 40 and not c.failed
    assert net.nodes["partial"].server.ledger("c").dont_haves_sent > 0
    assert c.client.stats().timeouts == 0
    assert net.nodes["c"].done_at < 1.0  # re-asked at once, not after a timeout
    assert c.client.stats().duplicate_blocks == 0


def test_everyone_says_dont_have_fails_fast():
    blocks = make_blocks(3)
    net = fetch_net(2, {})
    net.step("c", Want("s", tuple(blocks)))
    net.run()
    c = net.nodes["c"]
    assert set(c.failed) == {("s", cid) for cid in blocks}
    assert all("said they do not have it" in why for why in c.failed.values())
    assert net.nodes["c"].done_at < 1.0


def test_no_provider_at_all_fails_after_timeout():
    net = Net()
    net.add("c", client=ClientConfig(no_provider_timeout=7.0))
    cid = next(iter(make_blocks(1)))
    net.step("c", Want("s", (cid,)))
    assert net.nodes["c"].timer == 7.0
    net.run()
    assert net.nodes["c"].failed == {("s", cid): "no peer to ask within 7s"}
    assert net.now == 7.0


def test_stalled_wants_start_when_a_peer_connects_even_with_full_windows():
    blocks = make_blocks(12)
    net = Net()
    net.add("c", client=ClientConfig(peer_window=2, no_provider_timeout=5.0))
    net.add("s", blocks=blocks, latency=2.0)  # slow: the fetch outlives the no-provider timeout
    net.step("c", Want("x", tuple(blocks)))
    net.now = 1.0
    net.connect("c", "s")
    net.run()
    c = net.nodes["c"]
    assert len(c.delivered) == 12 and not c.failed
    assert c.done_at > 6.0


def test_provider_added_later_is_used():
    blocks = make_blocks(5)
    net = Net()
    net.add("c", client=True)
    net.add("s", blocks=blocks)
    net.step("c", Want("x", tuple(blocks)))
    net.links.add(frozenset(("c", "s")))  # the driver dials on first Send
    net.step("c", AddProviders("x", ("s",)))
    net.run()
    assert len(net.nodes["c"].delivered) == 5


def test_timeout_re_asks_another_peer():
    blocks = make_blocks(20)
    net = fetch_net(2, blocks, ClientConfig(want_timeout=2.0))
    net.nodes["s0"].muted = True
    net.step("c", Want("s", tuple(blocks)))
    net.run()
    c = net.nodes["c"]
    assert len(c.delivered) == 20 and not c.failed
    assert c.client.peer_stats("s0").timeouts > 0
    assert 2.0 <= net.nodes["c"].done_at < 3.0
    assert served_by(net)["s0"] == 0


def test_timeouts_everywhere_fail_after_max_attempts():
    blocks = make_blocks(2)
    net = fetch_net(1, blocks, ClientConfig(want_timeout=1.0, max_attempts=3))
    net.nodes["s0"].muted = True
    net.step("c", Want("s", tuple(blocks)))
    net.run()
    c = net.nodes["c"]
    assert len(c.failed) == 2 and all("after 3 asks" in w for w in c.failed.values())
    assert net.nodes["c"].done_at == pytest.approx(3.0)


def test_disconnect_mid_fetch_re_asks_the_rest():
    blocks = make_blocks(100)
    net = fetch_net(2, blocks)

    def cut(net, node, d):
        if len(node.delivered) == 30:
            net.disconnect("c", "s0")

    net.on_deliver = cut
    net.step("c", Want("s", tuple(blocks)))
    net.run()
    c = net.nodes["c"]
    assert len(c.delivered) == 100 and not c.failed
    assert c.client.peer_stats("s0") is None
    assert c.client.stats().timeouts == 0
    assert net.nodes["c"].done_at < 1.0


def test_corrupt_server_is_penalised_and_fetch_completes_from_honest_one():
    blocks = make_blocks(50)
    net = fetch_net(2, blocks)
    net.nodes["s0"].corrupt = True
    net.step("c", Want("s", tuple(blocks)))
    net.run()
    c = net.nodes["c"]
    assert {cid: d for (_, cid), d in c.delivered.items()} == blocks
    assert [p.peer for _, p in c.penalised] == ["s0"]
    assert "never asked for" in c.penalised[0][1].why
    assert net.nodes["c"].done_at < 1.0  # re-asked at once, without waiting for timeouts
    penalised_at = c.penalised[0][0]
    assert not [m for t, src, dst, m in net.log if src == "c" and dst == "s0" and t >= penalised_at]
    assert c.client.stats().duplicate_blocks == 0


def test_undecodable_message_drops_the_peer():
    blocks = make_blocks(10)
    net = fetch_net(2, blocks)
    net.step("c", Want("s", tuple(blocks)))
    assert net.nodes["c"].client.outstanding("s0")
    net.step("c", PeerMisbehaved("s0", "bitswap message does not parse as protobuf"))
    net.run()
    c = net.nodes["c"]
    assert len(c.delivered) == 10 and not c.failed
    assert c.penalised == []  # the driver saw the violation itself; the engine only stops asking
    assert c.client.peer_stats("s0") is None
    assert [dst for t, src, dst, m in net.log if src == "c" and t > 0] == ["s1"] * len(
        [1 for t, src, dst, m in net.log if src == "c" and t > 0]
    )


def test_undecodable_bytes_on_the_wire_drop_the_sender():
    blocks = make_blocks(30)
    net = fetch_net(2, blocks, server=ServerConfig(max_outstanding_bytes=8192))  # two blocks a message

    def turn_bad(net, node, d):  # after the first delivery, s0's messages stop parsing
        net.nodes["s0"].garbage = True

    net.on_deliver = turn_bad
    net.step("c", Want("s", tuple(blocks)))
    net.run()
    c = net.nodes["c"]
    assert len(c.delivered) == 30 and not c.failed
    assert c.client.peer_stats("s0") is None  # PeerMisbehaved from the driver dropped it
    assert served_by(net)["s1"] >= 15


# -- cancels -------------------------------------------------------------------------------------


def test_block_arrival_cancels_want_have_at_slower_peers():
    blocks = make_blocks(4)
    net = Net()
    net.add("c", client=True, latency=0.001)
    net.add("fast", blocks=blocks, latency=0.001)
    net.add("slow", blocks=blocks, latency=0.5)
    net.connect("c", "fast")
    net.connect("c", "slow")
    cid = next(iter(blocks))
    net.step("c", Want("s", (cid,)))
    net.run()
    to_slow = [w for src, m in net.nodes["slow"].received for w in m.wants]
    assert to_slow == [WantEntry(cid, WantType.HAVE, 2**31 - 1, send_dont_have=True), WantEntry(cid, cancel=True)]
    assert net.nodes["c"].client.stats().duplicate_blocks == 0


def test_close_session_cancels_outstanding_wants():
    blocks = make_blocks(10)
    net = fetch_net(1, blocks)
    net.nodes["s0"].muted = True
    net.step("c", Want("s", tuple(blocks)))
    net.nodes["s0"].muted = False
    net.run(until=0.001)
    net.step("c", CloseSession("s"))
    net.run()
    got = [w for src, m in net.nodes["s0"].received for w in m.wants]
    assert {w.cid for w in got if w.cancel} == set(blocks)
    assert net.nodes["c"].delivered == {} and net.nodes["c"].failed == {}


def test_late_block_after_timeout_counts_as_duplicate_not_penalty():
    blocks = make_blocks(1)
    cid = next(iter(blocks))
    client = BitswapClient(ClientConfig(want_timeout=1.0, have_fanout=0))
    client.handle(PeerConnected("a"), 0)
    client.handle(PeerConnected("b"), 0)
    out = client.handle(Want("s", (cid,)), 0)
    assert out == [Send("a", Message(wants=(WantEntry(cid, WantType.BLOCK, 2**31 - 1, send_dont_have=True),))), SetTimer(1.0)]
    out = client.handle(Tick(), 1.0)
    assert Send("a", Message(wants=(WantEntry(cid, cancel=True),))) in out
    assert Send("b", Message(wants=(WantEntry(cid, WantType.BLOCK, 2**31 - 1, send_dont_have=True),))) in out
    out = client.handle(MessageReceived("b", Message(blocks=(Block(cid, blocks[cid]),))), 1.1)
    assert out == [Deliver("s", cid, blocks[cid])]
    out = client.handle(MessageReceived("a", Message(blocks=(Block(cid, blocks[cid]),))), 1.2)
    assert out == []
    assert client.stats().duplicate_blocks == 1 and client.peer_stats("a").duplicates == 1


def test_have_then_dont_have_prefers_the_peer_that_has_it():
    blocks = make_blocks(1)
    cid = next(iter(blocks))
    client = BitswapClient(ClientConfig(have_fanout=2))
    for p in ("a", "b", "c"):
        client.handle(PeerConnected(p), 0)
    out = client.handle(Want("s", (cid,)), 0)
    kinds = {a.peer: a.message.wants[0].want_type for a in out if isinstance(a, Send)}
    assert kinds == {"a": WantType.BLOCK, "b": WantType.HAVE, "c": WantType.HAVE}
    client.handle(MessageReceived("b", Message(presences=(Presence(cid, False),))), 0.1)
    client.handle(MessageReceived("c", Message(presences=(Presence(cid, True),))), 0.1)
    out = client.handle(MessageReceived("a", Message(presences=(Presence(cid, False),))), 0.2)
    assert [a for a in out if isinstance(a, Send)] == [
        Send("c", Message(wants=(WantEntry(cid, WantType.BLOCK, 2**31 - 1, send_dont_have=True),)))
    ]


# -- server --------------------------------------------------------------------------------------


def test_server_answers_have_dont_have_and_inlines_small_blocks():
    big, small = b"B" * 5000, b"s" * 10
    cb, cs = CID.for_block(RAW, big), CID.for_block(RAW, small)
    missing = CID.for_block(RAW, b"missing")
    server = BitswapServer(DictSource({cb: big, cs: small}))
    wants = (
        WantEntry(cb, WantType.HAVE, send_dont_have=True),
        WantEntry(cs, WantType.HAVE),
        WantEntry(missing, WantType.HAVE, send_dont_have=True),
    )
    out = server.handle(MessageReceived("p", Message(wants=wants)), 0)
    msg = out[0].message
    assert out == [Send("p", msg, len(encode(msg)))]
    assert msg.presences == (Presence(cb, True), Presence(missing, False))
    assert msg.blocks == (Block(cs, small),)
    out = server.handle(MessageReceived("p", Message(wants=(WantEntry(cb),))), 0)
    assert out[0].message == Message(blocks=(Block(cb, big),))


def test_server_keeps_unanswerable_wants_until_the_block_arrives():
    data = b"later"
    cid = CID.for_block(RAW, data)
    source = DictSource({})
    server = BitswapServer(source)
    assert server.handle(MessageReceived("p", Message(wants=(WantEntry(cid),))), 0) == []
    assert server.ledger("p").waiting == 1
    source.blocks[cid] = data
    out = server.handle(BlocksAdded((cid,)), 1)
    assert [a.message.blocks for a in out] == [(Block(cid, data),)]


def test_server_respects_priority_cancel_and_outstanding_limit():
    blocks = make_blocks(6, size=1000)
    cids = list(blocks)
    cfg = ServerConfig(max_outstanding_bytes=2500, quantum=10_000)
    server = BitswapServer(DictSource(blocks), cfg)
    wants = tuple(WantEntry(c, priority=p) for c, p in zip(cids, [1, 5, 3, 9, 2, 4]))
    out = server.handle(MessageReceived("p", Message(wants=wants)), 0)
    assert [b.cid for b in out[0].message.blocks] == [cids[3], cids[1]]  # 9, 5: a third would pass 2500
    assert out[0].message.pending_bytes == 4000
    out2 = server.handle(MessageReceived("p", Message(wants=(WantEntry(cids[5], cancel=True),))), 0)
    assert out2 == []  # still over the outstanding limit
    out3 = server.handle(MessageSent("p", out[0].size), 0.1)
    assert [b.cid for b in out3[0].message.blocks] == [cids[2], cids[4]]  # priority 4 was cancelled
    out4 = server.handle(MessageSent("p", out3[0].size), 0.2)
    assert [b.cid for b in out4[0].message.blocks] == [cids[0]]
    assert out4[0].message.pending_bytes == 0
    assert server.ledger("p").blocks_sent == 5


def test_server_batches_within_the_message_size_limit():
    blocks = make_blocks(5, size=1_500_000)
    server = BitswapServer(DictSource(blocks), ServerConfig(max_outstanding_bytes=100 * 2**20, quantum=2**23))
    out = server.handle(MessageReceived("p", Message(wants=tuple(WantEntry(c) for c in blocks))), 0)
    assert [len(a.message.blocks) for a in out] == [2, 2, 1]
    for a in out:
        assert len(encode(a.message)) == a.size <= 4 * 2**20


def test_server_rate_limits_new_wants():
    blocks = make_blocks(10, size=100)
    server = BitswapServer(DictSource(blocks), ServerConfig(want_rate=1.0, want_burst=4, inline_have_max=0))
    wants = tuple(WantEntry(c, WantType.HAVE, send_dont_have=True) for c in blocks)
    out = server.handle(MessageReceived("p", Message(wants=wants)), 0)
    presences = out[0].message.presences
    assert [p.have for p in presences] == [True] * 4 + [False] * 6
    assert server.ledger("p").wants_refused == 6
    out = server.handle(MessageReceived("p", Message(wants=wants[4:6])), 2.0)  # 2 s refill 2 tokens
    assert [p.have for p in out[0].message.presences] == [True, True]


def test_server_is_fair_across_two_clients():
    a_blocks, b_blocks = make_blocks(40, size=32 * 1024, seed=1), make_blocks(40, size=32 * 1024, seed=2)
    net = Net()
    net.add("srv", blocks={**a_blocks, **b_blocks}, bandwidth=2e6,
            server=ServerConfig(max_outstanding_bytes=128 * 1024, quantum=32 * 1024))
    net.add("a", client=True)
    net.add("b", client=True)
    net.connect("a", "srv")
    net.connect("b", "srv")
    net.step("a", Want("s", tuple(a_blocks)))
    net.step("b", Want("s", tuple(b_blocks)))
    net.run()
    assert len(net.nodes["a"].delivered) == len(net.nodes["b"].delivered) == 40
    order = [to for to, _ in net.nodes["srv"].sent_blocks]
    for n in range(8, len(order) + 1, 8):  # in every prefix, neither client is more than 5 blocks ahead
        assert abs(order[:n].count("a") - order[:n].count("b")) <= 5, order


def test_server_fair_by_bytes_not_blocks():
    # One client fetches 1 MiB in 128 KiB blocks, the other 1 MiB in 8 KiB blocks, at the same time.
    big, small = make_blocks(8, size=128 * 1024, seed=1), make_blocks(128, size=8 * 1024, seed=2)
    net = Net()
    net.add("srv", blocks={**big, **small}, bandwidth=4e6,
            server=ServerConfig(max_outstanding_bytes=256 * 1024, quantum=16 * 1024))
    net.add("big", client=True)
    net.add("small", client=ClientConfig(peer_window=128, session_window=128))
    net.connect("big", "srv")
    net.connect("small", "srv")
    net.step("big", Want("s", tuple(big)))
    net.step("small", Want("s", tuple(small)))
    net.run()
    assert len(net.nodes["big"].delivered) == 8 and len(net.nodes["small"].delivered) == 128
    sent = {"big": 0, "small": 0}
    for to, cid in net.nodes["srv"].sent_blocks:
        sent[to] += len((big | small)[cid])
        if sent["big"] + sent["small"] >= 1024 * 1024:  # half of everything: roughly half each
            break
    assert abs(sent["big"] - sent["small"]) <= 300 * 1024, sent
    # (round-robin by blocks instead would have sent big 16 times the bytes of small by now)


def test_server_forgets_disconnected_peers_and_full_wantlists_replace():
    blocks = make_blocks(4, size=100)
    cids = list(blocks)
    server = BitswapServer(DictSource({}), ServerConfig())
    server.handle(MessageReceived("p", Message(wants=tuple(WantEntry(c) for c in cids))), 0)
    assert server.ledger("p").waiting == 4
    server.handle(MessageReceived("p", Message(wants=(WantEntry(cids[0]),), full=True)), 0)
    assert server.ledger("p").waiting == 1
    server.handle(PeerDisconnected("p"), 1)
    assert server.ledger("p") is None


# -- properties ----------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    n_blocks=st.integers(1, 25),
    holdings=st.lists(st.sets(st.integers(0, 24)), min_size=1, max_size=3),
    seed=st.integers(0, 1000),
)
def test_every_block_someone_has_is_delivered_exactly_once(n_blocks, holdings, seed):
    blocks = make_blocks(n_blocks, size=2048, seed=seed)
    cids = list(blocks)
    net = Net()
    net.add("c", client=ClientConfig(peer_window=3, session_window=5))
    for i, held in enumerate(holdings):
        net.add(f"s{i}", blocks={cids[j]: blocks[cids[j]] for j in held if j < n_blocks}, latency=0.001 * (i + 1))
        net.connect("c", f"s{i}")
    net.step("c", Want("s", tuple(cids)))
    net.run()
    c = net.nodes["c"]
    available = {cids[j] for held in holdings for j in held if j < n_blocks}
    assert {cid for _, cid in c.delivered} == available
    assert {cid for _, cid in c.failed} == set(cids) - available
    assert sum(served_by(net).values()) == len(available)  # no block fetched twice
    assert c.client.stats().duplicate_blocks == 0


# -- watching after DONT_HAVE ----------------------------------------------------------------------


def test_dont_have_peer_that_gets_the_block_later_says_have_and_serves_it():
    blocks = make_blocks(2)
    net = Net()
    net.add("c", client=ClientConfig(dont_have_wait=10.0))
    x = net.add("x", blocks={})
    net.connect("c", "x")
    net.step("c", Want("s", tuple(blocks)))
    net.run(until=2.0)
    assert net.nodes["c"].delivered == {} and net.nodes["c"].failed == {}  # parked, not failed
    assert x.server.ledger("c").dont_haves_sent == 2 and x.server.ledger("c").waiting == 2
    asked_before = len([m for t, src, dst, m in net.log if src == "c"])
    net.now = 3.0
    x.server.source.blocks.update(blocks)
    net.step("x", BlocksAdded(tuple(blocks)))
    net.run()
    c = net.nodes["c"]
    assert {cid for _, cid in c.delivered} == set(blocks) and not c.failed
    assert served_by(net, "c") == {"x": 2}
    to_x = [m for t, src, dst, m in net.log if src == "c" and dst == "x"]
    assert asked_before == 1 and len(to_x) == 2  # one ask, silence while parked, one want-block on HAVE
    assert all(w.want_type == WantType.BLOCK and not w.cancel for w in to_x[1].wants)
    stats = c.client.stats()
    assert stats.parked == 2 and stats.haves_after_dont_have == 2 and stats.duplicate_blocks == 0
    assert x.server.ledger("c").waiting == 0


def test_parked_want_fails_after_dont_have_wait_and_cancels_the_watch():
    cid = next(iter(make_blocks(1)))
    net = Net()
    net.add("c", client=ClientConfig(dont_have_wait=4.0))
    x = net.add("x", blocks={})
    net.connect("c", "x")
    net.step("c", Want("s", (cid,)))
    net.run()
    assert net.now == pytest.approx(4.015, abs=0.001)  # 4 s after the DONT_HAVE arrived
    assert "within 4s" in net.nodes["c"].failed[("s", cid)]
    assert net.nodes["c"].client.stats().want_blocks_sent == 1  # no re-asking while it waited
    assert x.server.ledger("c").waiting == 0  # the client cancelled the want x was keeping


def test_block_from_elsewhere_cancels_the_want_a_dont_have_peer_keeps():
    blocks = make_blocks(1)
    cid = next(iter(blocks))
    net = Net()
    net.add("c", client=ClientConfig(have_fanout=0))
    x = net.add("x", blocks={}, latency=0.001)
    net.add("y", blocks=blocks, latency=0.002)
    net.connect("c", "x")
    net.connect("c", "y")
    net.step("c", Want("s", (cid,)))
    net.run()
    assert served_by(net) == {"x": 0, "y": 1}
    assert WantEntry(cid, cancel=True) in [w for _, m in x.received for w in m.wants]
    assert x.server.ledger("c").waiting == 0
    x.server.source.blocks.update(blocks)  # x gets it later: it owes c nothing, so sends nothing
    net.step("x", BlocksAdded((cid,)))
    net.run()
    assert net.nodes["c"].client.stats().duplicate_blocks == 0 and not [1 for _, m in net.nodes["c"].received[1:] if m.presences and m.presences[0].have]


def test_server_answers_kept_wants_with_have_when_the_block_arrives():
    big, small = b"B" * 5000, b"s" * 10
    cb, cs = CID.for_block(RAW, big), CID.for_block(RAW, small)
    source = DictSource({})
    server = BitswapServer(source)
    wants = (WantEntry(cb, WantType.BLOCK, send_dont_have=True), WantEntry(cs, WantType.HAVE, send_dont_have=True))
    out = server.handle(MessageReceived("p", Message(wants=wants)), 0)
    assert out[0].message.presences == (Presence(cb, False), Presence(cs, False))
    assert server.ledger("p").waiting == 2
    source.blocks.update({cb: big, cs: small})
    out = server.handle(BlocksAdded((cb, cs)), 1)
    # a want-block answered DONT_HAVE is told HAVE (the peer has likely asked elsewhere); small ones inline
    assert [(a.message.presences, a.message.blocks) for a in out] == [((Presence(cb, True),), (Block(cs, small),))]
    assert server.ledger("p").waiting == 0
    off = BitswapServer(DictSource({}), ServerConfig(keep_wants_after_dont_have=False))
    off.handle(MessageReceived("p", Message(wants=wants)), 0)
    assert off.ledger("p").waiting == 0


def test_server_sends_no_have_to_a_peer_that_showed_it_holds_the_block():
    # Two runners watching a block at each other: once one has told the other HAVE (or sent it the
    # block), the other's server owes it no HAVE back when the block arrives there too.
    a, b, c = (CID.for_block(RAW, bytes([i]) * 5000) for i in range(3))
    source = DictSource({})
    server = BitswapServer(source)
    server.handle(MessageReceived("p", Message(wants=tuple(WantEntry(x, WantType.HAVE) for x in (a, b, c)))), 0)
    assert server.ledger("p").waiting == 3
    # p says HAVE for a and sends b (as a server would): a presence- or block-only message changes no queue
    assert server.handle(MessageReceived("p", Message(presences=(Presence(a, True), Presence(c, False)))), 1) == []
    assert server.handle(MessageReceived("p", Message(blocks=(Block(b, b"\x01" * 5000),))), 1) == []
    assert server.ledger("p").waiting == 1  # a DONT_HAVE proves nothing: c stays
    source.blocks.update({a: b"\x00" * 5000, b: b"\x01" * 5000, c: b"\x02" * 5000})
    out = server.handle(BlocksAdded((a, b, c)), 2)
    assert [a_.message.presences for a_ in out] == [(Presence(c, True),)]


def test_server_kept_wants_make_room_for_new_ones():
    cids = list(make_blocks(6, size=100))
    server = BitswapServer(DictSource({}), ServerConfig(max_wants_per_peer=4))
    server.handle(MessageReceived("p", Message(wants=tuple(WantEntry(c, send_dont_have=True) for c in cids[:4]))), 0)
    assert server.ledger("p").waiting == 4
    server.handle(MessageReceived("p", Message(wants=tuple(WantEntry(c, send_dont_have=True) for c in cids[4:]))), 1)
    led = server.ledger("p")
    assert led.waiting == 4 and led.wants_refused == 0  # the two oldest kept wants made room


def test_server_total_outstanding_limit_sends_to_one_peer_after_another():
    blocks = make_blocks(4, size=100_000)
    cids = list(blocks)
    server = BitswapServer(DictSource(blocks), ServerConfig(max_total_outstanding_bytes=150_000))
    out = server.handle(MessageReceived("a", Message(wants=(WantEntry(cids[0]), WantEntry(cids[1])))), 0)
    out += server.handle(MessageReceived("b", Message(wants=(WantEntry(cids[2]), WantEntry(cids[3])))), 0)
    assert [(a.peer, len(a.message.blocks)) for a in out] == [("a", 1)]  # one block in flight at a time
    out = server.handle(MessageSent("a", out[0].size), 0.1)
    assert [(a.peer, len(a.message.blocks)) for a in out] == [("b", 1)]


# -- swarm mode: want-block only to holders and providers; lazy cancels ------------------------------


def _swarm(**kw) -> ClientConfig:
    return ClientConfig(want_block_unproven=False, dont_have_wait=10.0, **kw)


def test_swarm_mode_needs_a_dont_have_wait():
    with pytest.raises(Exception, match="dont_have_wait"):
        ClientConfig(want_block_unproven=False)


def test_swarm_mode_asks_want_have_first_and_want_block_only_after_have():
    blocks = make_blocks(12)
    half = dict(list(blocks.items())[:6])
    net = Net()
    net.add("c", client=_swarm(have_fanout=2))
    net.add("x", blocks={})
    net.add("y", blocks={})
    net.add("z", blocks=half)
    for peer in ("x", "y", "z"):
        net.connect("c", peer)
    net.step("c", Want("s", tuple(blocks)))
    net.run(until=1.0)
    c = net.nodes["c"]
    to = {peer: [w for t, src, dst, m in net.log if src == "c" and dst == peer for w in m.wants] for peer in "xyz"}
    # discovery is spread over the peers in rotation: every CID asked of exactly two of the three
    asked = {cid: sorted(p for p in "xyz" if any(w.cid == cid and w.want_type == WantType.HAVE for w in to[p]))
             for cid in blocks}
    assert all(len(v) == 2 for v in asked.values())
    assert {len([cid for cid in blocks if p in asked[cid]]) for p in "xyz"} == {8}
    # want-block went only to z, only for blocks z said HAVE for, and never before that HAVE
    blocks_asked = [(p, w.cid) for p in "xyz" for w in to[p] if w.want_type == WantType.BLOCK and not w.cancel]
    assert blocks_asked and all(p == "z" and cid in half for p, cid in blocks_asked)
    haves = {m.presences[0].cid for src, m in c.received if src == "z" for _ in [0] if m.presences}
    assert {cid for _, cid in blocks_asked} <= haves | {p.cid for src, m in c.received if src == "z" for p in m.presences}
    got = {cid for _, cid in c.delivered}
    assert got == {cid for cid in half if "z" in asked[cid]}
    assert not c.failed  # the rest are parked, watched by the peers that said DONT_HAVE
    # y receives everything later: the CIDs it watches arrive by HAVE then want-block
    y = net.nodes["y"]
    y.server.source.blocks.update(blocks)
    net.step("y", BlocksAdded(tuple(blocks)))
    net.run(until=3.0)
    got = {cid for _, cid in c.delivered}
    assert got == {cid for cid in blocks if "y" in asked[cid] or (cid in half and "z" in asked[cid])}
    assert c.client.stats().duplicate_blocks == 0 and not c.failed


def test_swarm_mode_asks_providers_for_blocks_directly():
    blocks = make_blocks(4)
    net = Net()
    net.add("c", client=_swarm(have_fanout=1))
    net.add("p", blocks=blocks)
    net.add("x", blocks={})
    net.connect("c", "p")
    net.connect("c", "x")
    net.step("c", AddProviders("s", ("p",)))
    net.step("c", Want("s", tuple(blocks)))
    first = [m for t, src, dst, m in net.log if src == "c" and dst == "p"][0]
    assert {w.cid for w in first.wants if w.want_type == WantType.BLOCK} == set(blocks)
    to_x = [w for t, src, dst, m in net.log if src == "c" and dst == "x" for w in m.wants]
    assert to_x and all(w.want_type == WantType.HAVE for w in to_x)  # discovery beside the provider
    net.run()
    assert {cid for _, cid in net.nodes["c"].delivered} == set(blocks) and served_by(net) == {"p": 4, "x": 0}


@pytest.mark.parametrize("swarm", [False, True], ids=["daemon-default", "swarm-mode"])
def test_wants_a_peer_refused_are_asked_again_when_it_reconnects(swarm):
    # The provider said DONT_HAVE (it kept the wants to answer later), then the connection went and
    # its server forgot them; it gets the blocks and comes back. The client must ask it afresh, not
    # wait on watches that are gone until dont_have_wait fails the CIDs.
    blocks = make_blocks(3)
    net = Net()
    cfg = _swarm(have_fanout=4) if swarm else ClientConfig(dont_have_wait=10.0)
    c = net.add("c", client=cfg)
    x = net.add("x", blocks={})
    net.connect("c", "x")
    net.step("c", AddProviders("s", ("x",)))
    net.step("c", Want("s", tuple(blocks)))
    net.run(until=1.0)
    assert not c.delivered and not c.failed and x.server.ledger("c").dont_haves_sent == 3  # parked
    net.disconnect("c", "x")
    assert x.server.ledger("c") is None  # the watches went with the connection
    x.server.source.blocks.update(blocks)
    net.step("x", BlocksAdded(tuple(blocks)))
    net.now = 2.0
    net.connect("c", "x")
    net.run(until=5.0)
    assert {cid for _, cid in c.delivered} == set(blocks) and not c.failed
    assert c.done_at < 2.1 and served_by(net) == {"x": 3}
    assert c.client.stats().duplicate_blocks == 0


def test_want_states_are_all_reached_and_their_invariant_holds_throughout():
    # Swarm mode: wants before any peer are QUEUED, a one-block peer window makes the provider busy
    # (BLOCKED behind it, ASKED at it), and a block nobody has PARKs after the provider's DONT_HAVE.
    # Net.step checks WantState's invariant after every step.
    blocks = make_blocks(12, size=20_000)
    *held, missing = list(blocks)
    net = Net()
    net.add("c", client=_swarm(have_fanout=1, peer_window=1, session_window=3))
    net.add("p", blocks={cid: blocks[cid] for cid in held})
    net.add("x", blocks={})
    net.step("c", Want("s", (missing, *held)))  # no peer yet: QUEUED (stalled)
    net.connect("c", "p")
    net.connect("c", "x")
    net.step("c", AddProviders("s", ("p",)))
    net.run()
    c = net.nodes["c"]
    assert len(c.delivered) == 11 and list(c.failed) == [("s", missing)]
    assert net.states_seen == set(WantState)


def test_have_batch_delay_answers_the_blocks_added_within_it_in_one_message():
    blocks = make_blocks(3, size=5000)
    cids = list(blocks)
    src = DictSource({})
    server = BitswapServer(src, ServerConfig(have_batch_delay=0.01))
    wants = Message(wants=tuple(WantEntry(c, WantType.HAVE, send_dont_have=False) for c in cids))
    assert server.handle(MessageReceived("a", wants), 0.0) == []  # nothing here yet: the wants wait
    src.blocks[cids[0]] = blocks[cids[0]]
    first = server.handle(BlocksAdded((cids[0],)), 0.001)
    assert first == [SetTimer(0.011)]  # held for the batch
    src.blocks[cids[1]] = blocks[cids[1]]
    assert server.handle(BlocksAdded((cids[1],)), 0.005) == []
    out = server.handle(Tick(), 0.011)
    sends = [a for a in out if isinstance(a, Send)]
    assert len(sends) == 1 and [p.cid for p in sends[0].message.presences] == cids[:2]
    assert all(p.have for p in sends[0].message.presences)
    # off (the default): one message per BlocksAdded, at once
    src2 = DictSource({})
    eager = BitswapServer(src2, ServerConfig())
    eager.handle(MessageReceived("a", wants), 0.0)
    src2.blocks[cids[0]] = blocks[cids[0]]
    assert [type(a) for a in eager.handle(BlocksAdded((cids[0],)), 0.001)] == [Send]


def test_lend_for_stream_shares_the_lending_table_with_bitswap_wants():
    blocks = make_blocks(2, size=50_000)
    a, b = list(blocks)
    server = BitswapServer(DictSource(blocks), ServerConfig(superseed_window=1.0))
    ok, actions = server.lend_for_stream("dag-peer", a, 50_000, 0.0)
    assert ok and actions == [SetTimer(1.0)]
    # a bitswap want for the block lent to the DAG peer is refused (DONT_HAVE) and watched ...
    out = server.handle(MessageReceived("x", Message(wants=(WantEntry(a, send_dont_have=True),))), 0.1)
    assert [(p.cid, p.have) for s in out if isinstance(s, Send) for p in s.message.presences] == [(a, False)]
    assert server.lend_for_stream("other-dag-peer", a, 50_000, 0.2)[0] is False
    assert server.lend_for_stream("dag-peer", a, 50_000, 0.2)[0] is True  # its own lending
    assert server.lend_for_stream("other-dag-peer", b, 50_000, 0.2)[0] is True
    assert server.lend_for_stream("x", a, 100, 0.3)[0] is True  # small blocks are exempt
    # ... and hears HAVE when the window ends
    out = server.handle(Tick(), 1.2)
    assert [(p.cid, p.have) for s in out if isinstance(s, Send) for p in s.message.presences] == [(a, True)]
    assert server.stats().superseed_refused == 2
    off = BitswapServer(DictSource(blocks), ServerConfig())
    assert off.lend_for_stream("p", a, 50_000, 0.0) == (True, [])


def test_a_block_fetched_from_the_swarm_is_lent_only_for_the_relay_window():
    """A seed's own block stays lent for superseed_window; one this node got from the swarm
    (BlocksAdded) only for superseed_relay_window, then the refused peer hears HAVE."""
    blocks = make_blocks(2, size=50_000)
    own, fetched = list(blocks)
    src = DictSource({own: blocks[own]})
    server = BitswapServer(src, ServerConfig(superseed_window=1.0, superseed_relay_window=0.05))
    src.blocks[fetched] = blocks[fetched]
    server.handle(BlocksAdded((fetched,)), 0.0)

    def presences(out):
        return [(p.cid, p.have) for a in out if isinstance(a, Send) for p in a.message.presences]

    want = Message(wants=(WantEntry(own, send_dont_have=True), WantEntry(fetched, send_dont_have=True)))
    out = server.handle(MessageReceived("a", want), 0.0)
    assert {b.cid for a in out if isinstance(a, Send) for b in a.message.blocks} == {own, fetched}
    server.handle(MessageSent("a", 200_000), 0.001)
    assert set(presences(server.handle(MessageReceived("b", want), 0.01))) == {(own, False), (fetched, False)}
    assert presences(server.handle(Tick(), 0.06)) == [(fetched, True)]  # the relay window is over
    assert presences(server.handle(Tick(), 0.5)) == []  # the own block is still lent
    assert presences(server.handle(Tick(), 1.01)) == [(own, True)]
    # unset: every block keeps the full window (as before)
    same = BitswapServer(DictSource(dict(blocks)), ServerConfig(superseed_window=1.0))
    same.handle(BlocksAdded((fetched,)), 0.0)
    same.handle(MessageReceived("a", Message(wants=(WantEntry(fetched),))), 0.0)
    assert presences(same.handle(MessageReceived("b", Message(wants=(WantEntry(fetched, send_dont_have=True),))), 0.01)) \
        == [(fetched, False)]
    assert presences(same.handle(Tick(), 0.06)) == []


def test_lazy_cancels_wait_for_a_message_or_their_due_time():
    blocks = make_blocks(2)
    a, b = list(blocks)
    net = Net()
    net.add("c", client=_swarm(have_fanout=2, cancel_delay=1.0))
    x = net.add("x", blocks={})
    net.add("p", blocks={a: blocks[a]})
    net.connect("c", "x")
    net.connect("c", "p")
    net.step("c", AddProviders("s", ("p",)))
    net.step("c", Want("s", (a,)))
    net.run(until=0.5)
    assert net.nodes["c"].delivered  # a came from p; x still watches it (it said DONT_HAVE)
    cancels = lambda: [(t, w.cid) for t, src, dst, m in net.log if src == "c" and dst == "x"  # noqa: E731
                       for w in m.wants if w.cancel]
    assert cancels() == [] and x.server.ledger("c").waiting == 1
    net.run(until=2.0)  # nothing else goes to x: the cancel goes when due, a second after the block
    assert [cid for _, cid in cancels()] == [a] and 1.0 < cancels()[0][0] < 1.1
    assert x.server.ledger("c").waiting == 0
    # a cancel rides along with the next message to that peer instead of waiting
    net.nodes["p"].server.source.blocks[b] = blocks[b]
    net.step("c", Want("s2", (a,)))  # a wanted again: x is asked want-have again, says DONT_HAVE...
    net.run(until=net.now + 0.5)  # ...p delivers it, and x's cancel waits again
    t_b = net.now
    net.step("c", Want("s3", (b,)))
    with_b = [m for t, src, dst, m in net.log if src == "c" and dst == "x" and t >= t_b]
    assert len(with_b) == 1 and sorted((w.cid == b, w.cancel) for w in with_b[0].wants) == [(False, True), (True, False)]
    net.run()  # b comes from p; its cancel at x goes when due: x is left watching nothing
    assert ("s3", b) in net.nodes["c"].delivered and x.server.ledger("c").waiting == 0


def test_a_have_for_a_block_already_fetched_drops_the_lazy_cancel_to_that_peer():
    blocks = make_blocks(1)
    (a,) = blocks
    net = Net()
    net.add("c", client=_swarm(have_fanout=2, cancel_delay=1.0))
    x = net.add("x", blocks={})
    net.add("p", blocks=dict(blocks))
    net.connect("c", "x")
    net.connect("c", "p")
    net.step("c", AddProviders("s", ("p",)))
    net.step("c", Want("s", (a,)))
    net.run(until=0.5)
    assert net.nodes["c"].delivered and x.server.ledger("c").waiting == 1  # c's cancel to x waits
    x.server.source.blocks[a] = blocks[a]
    net.step("x", BlocksAdded((a,)))  # x gets it too and tells its watcher c: HAVE, which answers c's want
    net.run()
    assert x.server.ledger("c").waiting == 0
    assert [w for _, src, dst, m in net.log if src == "c" and dst == "x" for w in m.wants if w.cancel] == []


def test_server_requeued_want_block_with_the_same_priority_is_served_once():
    # A want-block repeated (or raised by a want-have) before it is served replaces its queued task
    # with one of equal priority and arrival number; the block still goes out once.
    blocks = make_blocks(3, size=1000)
    cids = list(blocks)
    server = BitswapServer(DictSource(blocks), ServerConfig(max_outstanding_bytes=1500))
    out = server.handle(MessageReceived("a", Message(wants=tuple(WantEntry(c, priority=5) for c in cids))), 0)
    for _ in range(3):
        out += server.handle(MessageReceived("a", Message(wants=(WantEntry(cids[2], priority=5),
                                                                 WantEntry(cids[2], WantType.HAVE, 5)))), 0)
    while out:
        more = []
        for a in out:
            if a.size:
                more += server.handle(MessageSent("a", a.size), 1)
        sent = [b.cid for a in out for b in a.message.blocks]
        out = more
        assert len(sent) == len(set(sent))
    assert server.ledger("a").blocks_sent == 3 and server.ledger("a").queued_blocks == 0


# -- super-seeding: a block handed to one peer is refused to others for a while -----------------------


def _superseed_net(window: float, blocks: dict, runners=("a", "b"), link_runners: bool = True) -> Net:
    """A super-seeding seed and runners in swarm mode that store what they fetch and serve it on."""
    net = Net()
    net.add("seed", blocks=blocks, server=ServerConfig(superseed_window=window))
    for r in runners:
        net.add(r, blocks={}, client=_swarm(have_fanout=4))

    def store(net, node, d):
        node.server.source.blocks[d.cid] = d.data
        net.step_engine(node.name, "server", BlocksAdded((d.cid,)))
    net.on_deliver = store
    for r in runners:
        net.connect(r, "seed")
        net.step(r, AddProviders("s", ("seed",)))
    if link_runners:
        for i, r in enumerate(runners):
            for q in runners[i + 1:]:
                net.connect(r, q)
    return net


def test_superseed_hands_each_block_out_once_and_runners_serve_each_other():
    blocks = make_blocks(6, size=50_000)
    net = _superseed_net(5.0, blocks)
    net.step("a", Want("s", tuple(blocks)))
    net.now = 0.001
    net.step("b", Want("s", tuple(blocks)))
    net.run(until=4.0)  # well within the window
    seed = net.nodes["seed"]
    for r in "ab":
        assert {cid for _, cid in net.nodes[r].delivered} == set(blocks), r
    assert sorted(map(str, (cid for _, cid in seed.sent_blocks))) == sorted(map(str, blocks))  # each left the seed once
    assert [to for to, _ in seed.sent_blocks] == ["a"] * 6
    assert seed.server.stats().superseed_refused >= 6
    got_dont_have = [p for src, m in net.nodes["b"].received if src == "seed" for p in m.presences if not p.have]
    assert len(got_dont_have) == 6  # b was refused every block a had been handed ...
    assert served_by(net, "b") == {"seed": 0, "a": 6, "b": 0}  # ... and took them from a
    assert net.nodes["b"].client.stats().duplicate_blocks == 0


def test_superseed_window_end_says_have_to_a_runner_nobody_else_serves():
    blocks = make_blocks(3, size=50_000)
    net = _superseed_net(2.0, blocks, link_runners=False)  # a cannot pass anything to b
    net.step("a", Want("s", tuple(blocks)))
    net.now = 0.001
    net.step("b", Want("s", tuple(blocks)))
    net.run(until=1.9)
    assert not net.nodes["b"].delivered and not net.nodes["b"].failed  # refused, parked, waiting
    assert net.nodes["seed"].timer is not None  # the server asked for its window's end
    net.run()
    b = net.nodes["b"]
    assert {cid for _, cid in b.delivered} == set(blocks) and not b.failed
    assert 2.0 < b.done_at < 2.2  # HAVE at the window's end, then want-block, then the block
    haves = [(t, p) for t, src, dst, m in net.log if src == "seed" and dst == "b" for p in m.presences if p.have]
    assert len(haves) == 3 and all(t >= 2.0 for t, _ in haves)
    assert served_by(net, "b") == {"seed": 3, "a": 0, "b": 0}


def test_superseed_lending_ends_at_once_when_the_peer_it_went_to_leaves():
    blocks = make_blocks(2, size=50_000)
    net = _superseed_net(30.0, blocks, link_runners=False)
    net.nodes["a"].muted = True  # takes the wants, never reads a block: the lending is all it got
    net.step("a", Want("s", tuple(blocks)))
    net.now = 0.001
    net.step("b", Want("s", tuple(blocks)))
    net.run(until=1.0)
    assert not net.nodes["b"].delivered
    net.disconnect("a", "seed")
    net.run(until=2.0)
    assert {cid for _, cid in net.nodes["b"].delivered} == set(blocks)  # long before the 30 s window
    assert net.nodes["seed"].server.stats().superseed_released_early == 2


def test_superseed_lending_ends_when_the_want_is_cancelled_before_the_block_went():
    big = make_blocks(2, size=50_000)
    ca, cb = list(big)
    server = BitswapServer(DictSource(big), ServerConfig(superseed_window=10.0, max_outstanding_bytes=60_000))
    out = server.handle(MessageReceived("a", Message(wants=(WantEntry(ca), WantEntry(cb)))), 0)
    assert [b.cid for a in out if isinstance(a, Send) for b in a.message.blocks] == [ca]  # cb waits behind the outstanding limit
    assert SetTimer(10.0) in out
    out = server.handle(MessageReceived("b", Message(wants=(WantEntry(ca, send_dont_have=True),
                                                            WantEntry(cb, send_dont_have=True)))), 1)
    assert [p for a in out if isinstance(a, Send) for p in a.message.presences] == [Presence(ca, False), Presence(cb, False)]
    out = server.handle(MessageReceived("a", Message(wants=(WantEntry(cb, cancel=True),))), 2)
    # cb never went to a: b hears HAVE at once; ca is still lent (it went out at 0)
    assert [p for a in out if isinstance(a, Send) for p in a.message.presences] == [Presence(cb, True)]
    out = server.handle(Tick(), 10.0)
    assert [p for a in out if isinstance(a, Send) for p in a.message.presences] == [Presence(ca, True)]
    st = server.stats()
    assert st.superseed_refused == 2 and st.superseed_released_early == 1 and st.superseed_lent == 0
    out = server.handle(MessageReceived("b", Message(wants=(WantEntry(ca),))), 11)
    assert [b.cid for a in out if isinstance(a, Send) for b in a.message.blocks] == [ca]  # b now gets it from the seed


def test_superseed_config_rejects_a_negative_window():
    with pytest.raises(Exception, match="superseed_window"):
        ServerConfig(superseed_window=-1)


def test_superseed_window_starts_when_the_block_goes_out_not_while_it_waits_in_the_queue():
    blocks = make_blocks(2, size=50_000)
    ca, cb = list(blocks)
    server = BitswapServer(DictSource(blocks), ServerConfig(superseed_window=1.0, max_outstanding_bytes=60_000))
    out = server.handle(MessageReceived("a", Message(wants=(WantEntry(ca), WantEntry(cb)))), 0)
    first = [a for a in out if isinstance(a, Send)]
    assert [b.cid for a in first for b in a.message.blocks] == [ca]  # cb waits: a has not read ca yet
    server.handle(Tick(), 1.0)  # cb's first window would end now, but cb is still queued for a
    out = server.handle(MessageReceived("b", Message(wants=(WantEntry(cb, send_dont_have=True),))), 3.0)
    assert [p for a in out if isinstance(a, Send) for p in a.message.presences] == [Presence(cb, False)]
    out = server.handle(MessageSent("a", first[0].size), 3.5)  # a read ca: cb goes out now
    assert [b.cid for a in out if isinstance(a, Send) for b in a.message.blocks] == [cb]
    out = server.handle(Tick(), 4.0)
    assert not [a for a in out if isinstance(a, Send)]  # lent 0.5 s ago: b still waits
    out = server.handle(Tick(), 4.5)
    assert [p for a in out if isinstance(a, Send) for p in a.message.presences] == [Presence(cb, True)]
    # a want after the window with no Tick yet (a late timer) is served, and ends the lending
    out = server.handle(MessageReceived("c", Message(wants=(WantEntry(ca, send_dont_have=True),))), 9.0)
    assert [b.cid for a in out if isinstance(a, Send) for b in a.message.blocks] == [ca]


def _blocks_to(out: list, peer: str) -> list:
    return [b.cid for a in out if isinstance(a, Send) and a.peer == peer for b in a.message.blocks]


def _presences_to(out: list, peer: str) -> list:
    return [p for a in out if isinstance(a, Send) and a.peer == peer for p in a.message.presences]


def test_superseed_share_holds_a_peer_to_its_unspread_blocks_while_others_wait():
    """BitTorrent's super-seeding: a peer that holds its share of lent blocks nobody else has got gets
    no more while another peer is refused; another peer's cancel (it got the block elsewhere) makes room."""
    blocks = make_blocks(2, size=50_000)
    b1, b2 = blocks
    server = BitswapServer(DictSource(blocks), ServerConfig(superseed_window=10.0, superseed_share=1))
    assert _blocks_to(server.handle(MessageReceived("a", Message(wants=(WantEntry(b1, send_dont_have=True),))), 0),
                      "a") == [b1]
    # b is refused b1 (lent to a): now a is bound to its share of one unspread block
    assert _presences_to(server.handle(MessageReceived("b", Message(wants=(WantEntry(b1, send_dont_have=True),))), 0.1),
                         "b") == [Presence(b1, False)]
    out = server.handle(MessageReceived("a", Message(wants=(WantEntry(b2, send_dont_have=True),))), 0.2)
    assert _presences_to(out, "a") == [Presence(b2, False)] and not _blocks_to(out, "a")
    assert server.stats().superseed_share_refused == 1
    # b got b1 from a and cancels its want here: b1 has spread, a's share has room, a hears HAVE for b2
    out = server.handle(MessageReceived("b", Message(wants=(WantEntry(b1, cancel=True),))), 0.3)
    assert _presences_to(out, "a") == [Presence(b2, True)]
    assert _blocks_to(server.handle(MessageReceived("a", Message(wants=(WantEntry(b2),))), 0.4), "a") == [b2]


def test_superseed_share_does_not_bind_a_lone_fetcher():
    blocks = make_blocks(3, size=50_000)
    server = BitswapServer(DictSource(blocks), ServerConfig(superseed_window=10.0, superseed_share=1,
                                                            max_outstanding_bytes=1 << 20))
    out = server.handle(MessageReceived("a", Message(wants=tuple(WantEntry(c, send_dont_have=True) for c in blocks))), 0)
    assert _blocks_to(out, "a") == list(blocks) and not _presences_to(out, "a")


def test_superseed_share_bounds_what_a_dag_stream_is_lent():
    b1, b2 = blocks = make_blocks(2, size=50_000)
    server = BitswapServer(DictSource(blocks), ServerConfig(superseed_window=10.0, superseed_share=1))
    assert server.lend_for_stream("a", b1, 50_000, 0)[0]
    assert not server.lend_for_stream("b", b1, 50_000, 0.1)[0]  # lent to a
    assert not server.lend_for_stream("a", b2, 50_000, 0.2)[0]  # a holds its share, b waits
    assert server.lend_for_stream("b", b2, 50_000, 0.3)[0]


def test_superseed_share_config_rejects_a_negative_share():
    with pytest.raises(Exception, match="superseed_share"):
        ServerConfig(superseed_share=-1)
