"""Routing over real py-libp2p hosts on loopback (TCP + Noise + Yamux): 12 nodes in two chains that meet
only after the announcement, so the finder is several DHT hops from every holder of the record."""

import hashlib
import os
from contextlib import asynccontextmanager

import pytest
import trio

from p2pcache.content.cid import CID, DAG_CBOR
from p2pcache.net.host import HostConfig, NodeHost
from p2pcache.routing import (
    DHT,
    KAD_PROTOCOL,
    DHTConfig,
    FinderConfig,
    ProviderAnnouncer,
    ProviderFinder,
    ResolveAnswer,
    ResolveServer,
    dht_key,
    resolve,
)

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)
ROOT = CID.for_block(DAG_CBOR, b"an archive manifest")
SHA256 = "sha256:" + "5e" * 32
SHA512 = "sha512:" + "a1" * 64
NIX = "nix:7h5mcfhx2cmdddb8lgg8z16p0w3zmxp5"


@asynccontextmanager
async def swarm(tmp_path, n):
    async with trio.open_nursery() as nursery:
        hosts = []
        for i in range(n):
            host = NodeHost(HostConfig(identity=tmp_path / f"node{i}.key", listen=LOOPBACK))
            hosts.append(await nursery.start(host.run))
        yield nursery, hosts
        nursery.cancel_scope.cancel()


async def chain(nursery, hosts):
    """Connect each host to the previous one only, then start its DHT (bootstrapped from that peer).
    `refresh=False` keeps each routing table to its neighbours and the peers that query it."""
    dhts = []
    for i, host in enumerate(hosts):
        if i:
            await host.connect(hosts[i - 1].addrs()[0])
        dht = DHT(host, DHTConfig(refresh=False))
        await nursery.start(dht.run)
        dhts.append(dht)
    return dhts


@pytest.mark.trio
async def test_provide_find_resolve_miss_and_withdraw(tmp_path):
    with trio.fail_after(60):
        async with swarm(tmp_path, 12) as (nursery, hosts):
            a_hosts, b_hosts = hosts[:6], hosts[6:]
            a_dhts = await chain(nursery, a_hosts)
            b_dhts = await chain(nursery, b_hosts)
            provider, seeker = b_dhts[-1], a_dhts[0]

            # the provider announces every alias of the root; the records land in its own chain only
            announcer = ProviderAnnouncer(provider)
            announcer.add(ROOT, [SHA256, SHA512, NIX])
            await nursery.start(announcer.run)
            assert announcer.stats.provided == 4 and announcer.stats.failed == 0
            keys = [dht_key(a) for a in (str(ROOT), SHA256, SHA512, NIX)]

            def holders():
                return {k: [i for i, d in enumerate(b_dhts[:-1])
                            if provider.peer_id in [p.peer_id for p in d.local_providers(k)]] for k in keys}

            with trio.fail_after(5):  # ADD_PROVIDER is fire-and-forget: the peers store it a moment later
                while not all(holders().values()):  # every key reached some peer other than the provider
                    await trio.sleep(0.02)
            assert all(d.local_providers(k) == [] for d in a_dhts for k in keys)

            # the chains meet at one end; the seeker is 6 hosts away from the nearest holder
            await a_hosts[-1].connect(b_hosts[0].addrs()[0])
            await a_dhts[-1].bootstrap()
            await b_dhts[0].bootstrap()
            assert provider.peer_id not in hosts[0].libp2p.get_connected_peers()

            finder = ProviderFinder(seeker, FinderConfig(negative_ttl=60))
            found = await finder.lookup(SHA256, timeout=20)
            assert found.source == "dht", found
            assert provider.peer_id in [p.peer_id for p in found.providers]
            assert found.hops is not None and found.hops >= 2  # nobody the seeker knew held the record
            for alias in (str(ROOT), NIX):
                assert provider.peer_id in [p.peer_id for p in await finder.find_providers(alias, timeout=20)]
            assert finder.stats.found_dht == 3 and finder.stats.rpcs >= 3

            # the provider is dialled and asked what it holds under the alias
            answer = ResolveAnswer(ROOT, "archive", 12345)
            ResolveServer({SHA256: answer}.get).register(b_hosts[-1])
            assert await resolve(a_hosts[0], provider.peer_id, SHA256, timeout=10) == answer

            # a miss comes back within its timeout, and a repeated miss from the negative cache
            missing = "sha256:" + "00" * 32
            with trio.fail_after(5 + 10):
                miss = await finder.lookup(missing, timeout=5)
            assert not miss.found and miss.source == "miss" and miss.asked >= 1
            rpcs = finder.stats.rpcs
            again = await finder.lookup(missing, timeout=5)
            assert again.source == "negative-cache" and not again.found
            assert finder.stats.rpcs == rpcs and finder.stats.negative_hits == 1 and finder.stats.misses == 1

            # withdraw: no more re-announcing, and the provider stops naming itself
            assert any(p.peer_id == provider.peer_id for p in provider.local_providers(dht_key(SHA256)))
            announcer.withdraw(ROOT)
            assert all(p.peer_id != provider.peer_id for k in keys for p in provider.local_providers(k))
            assert announcer.announcements.keys() == [] and announcer.stats.withdrawn == 4
            provided = announcer.stats.provided
            assert await announcer.sweep() == 0 and announcer.stats.provided == provided


@pytest.mark.trio
async def test_dht_speaks_only_our_protocol_id(tmp_path):
    with trio.fail_after(30):
        async with swarm(tmp_path, 2) as (nursery, (a, b)):
            await chain(nursery, [a, b])
            stream = await a.new_stream(b.peer_id, [KAD_PROTOCOL])
            await stream.close()
            with pytest.raises(Exception):  # no /ipfs/kad/1.0.0 handler: team records stay in the team swarm
                await a.new_stream(b.peer_id, ["/ipfs/kad/1.0.0"])


def test_a_fresh_node_whose_first_bootstrap_peer_drops_packets_announces_while_that_dial_still_hangs(tmp_path, daemons):
    """Real daemons. B's first bootstrap address accepts TCP and never answers (a host that vanished behind a
    firewall looks so): py-libp2p's walk waited out the dial on it and sent nothing before the walk ended, so
    B started late and its first ADD_PROVIDER left long after that. Now B is up and its connected DHT peer
    gets the record while the dial to the dead address still hangs. B is given a handshake timeout (120 s)
    longer than anything the test waits for, so the order of events is checked, not the clock: the hole still
    holds B's unanswered connection, open, when B is ready and when A has B's record."""
    import select
    import socket
    import threading
    import time

    from p2pcache.net.host import NodeHost

    from .helpers.daemons import start_daemon

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    held: list[socket.socket] = []  # accepted, never read from or written to

    def hold() -> None:
        while True:
            try:
                held.append(hole.accept()[0])
            except OSError:
                return

    def dial_still_hangs() -> bool:
        """B dialed the hole and every connection it made there is open: what B sent (its handshake) is
        read and dropped, and no EOF or reset has followed it."""
        for conn in held:
            while select.select([conn], [], [], 0)[0]:
                try:
                    if not conn.recv(65536):
                        return False
                except OSError:
                    return False
        return bool(held)

    threading.Thread(target=hold, daemon=True).start()
    try:
        dead_id = NodeHost(HostConfig(identity=tmp_path / "dead.key")).peer_id.to_base58()
        a = start_daemon(tmp_path / "a")
        daemons.append(a)
        (tmp_path / "b").mkdir()
        (tmp_path / "b" / "config.toml").write_text("[swarm]\nhandshake_timeout = 120\n")
        b = start_daemon(tmp_path / "b", bootstrap=[f"/ip4/127.0.0.1/tcp/{hole.getsockname()[1]}/p2p/{dead_id}",
                                                    a.addr], timeout=60)
        daemons.append(b)
        src = tmp_path / "x.bin"
        src.write_bytes(os.urandom(4096))
        b.cli("add", str(src))
        deadline = time.monotonic() + 60  # only so that a broken build ends; the check is the order below
        while b.status()["announce"]["add_providers_sent"] < 1:
            assert time.monotonic() < deadline, b.status()["announce"]
            time.sleep(0.05)
        assert dial_still_hangs(), "B announced only after giving up on the dead bootstrap address"
        # and A holds the record: a node that knows only A finds B through it
        c = start_daemon(tmp_path / "c", bootstrap=[a.addr])
        daemons.append(c)
        out = tmp_path / "out.bin"
        c.cli("get", "sha256:" + hashlib.sha256(src.read_bytes()).hexdigest(), "-o", str(out))
        assert out.read_bytes() == src.read_bytes()
    finally:
        hole.close()
        for conn in held:
            conn.close()
