"""simnet running the real node composition: `p2pcache.node.Node` (repo on disk, BitswapExchange driver,
announcer, finder, resolve) over simulated hosts and a simulated DHT, in virtual time."""

from __future__ import annotations

import hashlib
import random
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from p2pcache.config import NodeConfig
from p2pcache.content.cid import CID
from p2pcache.errors import NotFound
from p2pcache.routing import RESOLVE_PROTOCOL
from simnet.cli import run_scenario
from simnet.hostsim import LiveSim, SimHostError, SimSwarm, repo_work_inline
from simnet.links import MBIT, LinkProfile, Network
from simnet.nodefetch import NodeWorld, archive_sha256, repos_without_fsync, scratch_dir
from simnet.routingsim import SimDHTConfig

SCENARIOS = Path(__file__).resolve().parent.parent / "simnet" / "scenarios"


def _noop(done, total):
    pass


def _run(main):
    """`main(root)` in a trio run on an autojumping MockClock, with the simulation's repo settings."""
    with scratch_dir() as tmp, repo_work_inline(), repos_without_fsync():
        return trio.run(main, Path(tmp), clock=trio.testing.MockClock(autojump_threshold=0))


def _archive(tmp: Path, size: int, seed: int = 7) -> tuple[Path, bytes]:
    data = random.Random(seed).randbytes(size)
    path = tmp / "artifact.bin"
    path.write_bytes(data)
    return path, data


async def _ring(world: NodeWorld, n: int, link: str = "lan-1g") -> None:
    """n nodes, each dialling its predecessor: a chain, so most nodes are not neighbours."""
    for i in range(n):
        await world.start_node(link, world.nodes[-1:])
        await trio.sleep(0.1)
    await trio.sleep(3.0)  # DHT bootstraps


# -- hosts and streams ----------------------------------------------------------------------------------


@asynccontextmanager
async def _running(sim, *hosts):
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.run)
        for h in hosts:
            await nursery.start(h.run)
        yield nursery


def _two_hosts(link: LinkProfile):
    sim = LiveSim(1)
    swarm = SimSwarm(sim, Network(sim, handshake_rtts=2))
    return sim, swarm.add_host(link), swarm.add_host(link)


def test_stream_bytes_cross_the_link_in_order_with_latency_and_bandwidth():
    link = LinkProfile("t", latency=0.010, up=100 * MBIT, down=1000 * MBIT)

    async def main():
        sim, a, b = _two_hosts(link)
        got = []

        async def echo_len(stream):
            buf = bytearray()
            while True:
                try:
                    buf += await stream.read(1 << 20)
                except EOFError:
                    break
            got.append((trio.current_time(), bytes(buf)))
            await stream.write(len(buf).to_bytes(8, "big"))
            await stream.close()

        b.set_stream_handler("/t/1", echo_len)
        async with _running(sim, a, b) as nursery:
            t0 = trio.current_time()
            with pytest.raises(SimHostError):
                await a.new_stream(b.peer_id, ["/nope/1"])
            t_dialled = trio.current_time()
            assert a.is_connected(b.peer_id) and b.is_connected(a.peer_id)
            payload = bytes(range(256)) * 4096  # 1 MiB: 10 frames-worth of uplink time at 100 Mbit/s
            s = await a.new_stream(b.peer_id, ["/nope/1", "/t/1"])
            assert s.get_protocol() == "/t/1" and s.muxed_conn.peer_id == b.peer_id
            t1 = trio.current_time()
            await s.write(payload)
            t_written = trio.current_time()
            await s.close_write()
            answer = await s.read()
            t_answer = trio.current_time()
            nursery.cancel_scope.cancel()
        rtt = 0.040
        # dial: 2 RTTs (handshake) + 1 RTT for the refused protocol proposal
        assert t_dialled - t0 == pytest.approx(3 * rtt, rel=0.01)
        assert got[0][1] == payload and int.from_bytes(answer, "big") == len(payload)
        # write returns once the uplink has sent it: size / 100 Mbit/s (plus per-frame overhead)
        assert t_written - t1 == pytest.approx(len(payload) / (100 * MBIT), rel=0.01)
        # the answer comes one one-way latency after the last byte arrived, which is one after it left
        assert t_answer - t_written == pytest.approx(rtt, rel=0.05)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_next_stream_of_a_protocol_the_peer_chose_opens_without_a_round_trip_as_the_daemons_do():
    link = LinkProfile("t", latency=0.010, up=1000 * MBIT, down=1000 * MBIT)

    async def main():
        sim, a, b = _two_hosts(link)

        async def echo(stream):
            await stream.write(await stream.read(1024))
            await stream.close()

        b.set_stream_handler("/t/1", echo)
        async with _running(sim, a, b) as nursery:
            await a.connect(b.peer_id)
            t0 = trio.current_time()
            s = await a.new_stream(b.peer_id, ["/t/1"])
            t1 = trio.current_time()
            await s.write(b"x")
            assert await s.read() == b"x"
            t2 = trio.current_time()
            s = await a.new_stream(b.peer_id, ["/t/1"])
            t3 = trio.current_time()
            assert s.get_protocol() == "/t/1"
            await s.write(b"y")
            assert await s.read() == b"y"
            t4 = trio.current_time()
            b.remove_stream_handler("/t/1")  # B stops speaking it: the open is refused, and the first read fails
            s = await a.new_stream(b.peer_id, ["/t/1"])
            await s.write(b"z")
            with pytest.raises(Exception) as e:
                await s.read()
            assert type(e.value).__name__ == "StreamReset"
            # the refusal is remembered: the next stream negotiates again, and is refused before it is handed out
            with pytest.raises(SimHostError, match="serves none of /t/1"):
                await a.new_stream(b.peer_id, ["/t/1"])
            b.set_stream_handler("/t/1", echo)
            t5 = trio.current_time()
            s = await a.new_stream(b.peer_id, ["/t/1"])
            t6 = trio.current_time()
            await s.write(b"w")
            assert await s.read() == b"w"
            nursery.cancel_scope.cancel()
        rtt = 0.040
        assert t6 - t5 == pytest.approx(rtt, rel=0.05)  # negotiated again: one round trip
        assert t1 - t0 == pytest.approx(rtt, rel=0.05)  # the first: one round trip to choose the protocol
        assert t3 - t2 == 0  # the next: its proposal goes with the request
        assert t4 - t3 == pytest.approx(rtt, rel=0.05)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_cut_connection_resets_streams_and_an_unreachable_peer_fails_to_dial():
    link = LinkProfile("t", latency=0.005, up=100 * MBIT, down=100 * MBIT)

    async def main():
        sim = LiveSim(1)
        net = Network(sim)
        swarm = SimSwarm(sim, net)
        a, b = swarm.add_host(link), swarm.add_host(link)
        b.set_stream_handler("/hold/1", lambda stream: trio.sleep_forever())
        events = a.subscribe()
        async with trio.open_nursery() as nursery:
            await nursery.start(sim.run)
            await nursery.start(a.run)
            await nursery.start(b.run)
            s = await a.new_stream(b.peer_id, ["/hold/1"])
            assert (await events.receive()).connected
            net.partition([{a.peer_id}, {b.peer_id}])
            with pytest.raises(Exception) as e:
                await s.read()
            assert type(e.value).__name__ == "StreamReset"
            ev = await events.receive()
            assert ev.peer == b.peer_id and not ev.connected
            t0 = trio.current_time()
            with pytest.raises(SimHostError):
                await a.new_stream(b.peer_id, ["/hold/1"])
            assert 4.9 <= trio.current_time() - t0 <= 10.1  # an unreachable dial times out
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


# -- real nodes -----------------------------------------------------------------------------------------


def test_real_nodes_fetch_an_archive_by_its_sha256_via_dht_resolve_and_bitswap():
    async def main(tmp: Path):
        # k=2: the seed's record lives on itself and 2 peers, so most fetchers must look it up remotely.
        world = NodeWorld(3, tmp / "nodes", dht_config=SimDHTConfig(k=2))
        async with trio.open_nursery() as nursery:
            await nursery.start(world.run)
            await _ring(world, 6)
            seed, fetchers = world.nodes[0], world.nodes[1:]
            path, data = _archive(tmp, 1_500_000)
            added = await seed.add_file(str(path), "artifact.bin", _noop)
            await trio.sleep(2.0)  # announced
            assert seed.announcer.stats.provided >= 1
            alias = "sha256:" + hashlib.sha256(data).hexdigest()
            results = {}
            t0 = trio.current_time()

            async def fetch(node):
                results[node] = (await node.fetch(alias, _noop), trio.current_time() - t0)

            async with trio.open_nursery() as fetches:
                for node in fetchers:
                    fetches.start_soon(fetch, node)
            for node in fetchers:
                res, took = results[node]
                assert res["source"] == "swarm" and res["root"] == added["root"] and res["size"] == len(data)
                assert archive_sha256(node, CID.parse(res["root"])) == (hashlib.sha256(data).hexdigest(), len(data))
                assert 0 < took < 5.0
            # Lookups went through the real ProviderFinder: at most 2 fetchers held the record themselves.
            assert sum(n.finder.stats.found_dht for n in fetchers) >= 3
            assert sum(n.finder.stats.found_dht + n.finder.stats.found_local for n in fetchers) == len(fetchers)
            # The real resolve protocol answered the fetchers (some may have asked a fetcher that was done).
            assert seed.host.accepted.get(RESOLVE_PROTOCOL, 0) >= 1
            assert seed.bytes_served >= len(data)
            # Fetched roots are announced: a late node finds providers other than the seed.
            again = await fetchers[0].fetch(alias, _noop)
            assert again["source"] == "local"
            world.stop()

    _run(main)


def test_a_second_seed_serves_when_the_first_has_left():
    async def main(tmp: Path):
        world = NodeWorld(5, tmp / "nodes", dht_config=SimDHTConfig(k=3))
        async with trio.open_nursery() as nursery:
            await nursery.start(world.run)
            await _ring(world, 5, link="wan-100m-40ms")
            gone, seed, fetchers = world.nodes[0], world.nodes[1], world.nodes[2:]
            path, data = _archive(tmp, 1_000_000, seed=11)
            for node in (gone, seed):
                await node.add_file(str(path), "artifact.bin", _noop)
            await trio.sleep(3.0)
            world.stop_node(gone)
            await trio.sleep(0.01)
            assert not gone.host.running
            alias = "sha256:" + hashlib.sha256(data).hexdigest()
            async with trio.open_nursery() as fetches:
                for node in fetchers:
                    fetches.start_soon(node.fetch, alias, _noop)
            for node in fetchers:
                root = node.repo.resolve(alias)
                assert archive_sha256(node, root) == (hashlib.sha256(data).hexdigest(), len(data))
            assert gone.bytes_served == 0
            assert seed.bytes_served > 0
            world.stop()

    _run(main)


def test_a_partitioned_node_misses_within_the_lookup_timeout_and_fetches_after_the_heal():
    async def main(tmp: Path):
        config = NodeConfig(lookup_timeout=3.0, negative_ttl=5.0)
        world = NodeWorld(9, tmp / "nodes", node_config=config, dht_config=SimDHTConfig(k=2))
        async with trio.open_nursery() as nursery:
            await nursery.start(world.run)
            await _ring(world, 4)
            seed, lonely = world.nodes[0], world.nodes[3]
            path, data = _archive(tmp, 300_000, seed=3)
            await seed.add_file(str(path), "artifact.bin", _noop)
            await trio.sleep(2.0)
            others = {n.host.peer_id for n in world.nodes if n is not lonely}
            world.net.partition([others, {lonely.host.peer_id}])
            await trio.sleep(0.5)
            # Its own store may hold the record (k=2): drop what it holds, as if it never received it.
            lonely.dht.providers.clear()
            alias = "sha256:" + hashlib.sha256(data).hexdigest()
            t0 = trio.current_time()
            with pytest.raises(NotFound):
                await lonely.fetch(alias, _noop)
            assert trio.current_time() - t0 <= 3.0 + 0.01
            world.net.heal()
            await trio.sleep(6.0)  # reconnected; the cached miss has expired
            assert lonely.host.connected_peers()
            res = await lonely.fetch(alias, _noop)
            assert res["source"] == "swarm"
            assert archive_sha256(lonely, CID.parse(res["root"]))[0] == hashlib.sha256(data).hexdigest()
            world.stop()

    _run(main)


# -- the scenario ---------------------------------------------------------------------------------------


def test_node_fetch_scenario_verifies_every_archive():
    overrides = {"nodes": "5", "artifact_size": "600KiB", "k": "2", "settle": "5s"}
    results, series = run_scenario(str(SCENARIOS / "node-fetch.toml"), 4, overrides)
    assert results.value("fetch_success") == 1.0
    assert results.value("verified") == 4
    assert all(r["verified"] and r["source"] == "swarm" for r in series["fetches"])
    assert 0 < results.value("fetch_time_p50") <= results.value("fetch_time_p99") < 10
    assert results.value("lookups_found") == 4
    assert "BitswapExchange" in results.value("layers") and "not run: TCP, Noise, Yamux" in results.value("layers")
    # Real trio tasks: the program does not claim a reproducible history, and marks what can vary.
    records = {r["metric"]: r for r in results.records()}
    assert records["deterministic"]["value"] is False
    assert records["fetch_time_p50"]["deterministic"] is False and records["virtual_time"]["deterministic"] is False


def test_a_lan_fleet_of_real_nodes_gets_each_block_from_the_seed_about_once():
    """Real Nodes with the daemon's own [exchange]/[transfer] defaults, every node dialling every other
    (as LAN discovery does): the seed's DAG server lends each leaf to one fetcher (super-seeding, one
    lending table with bitswap), the others get it from whoever has it, the moment it is verified."""
    overrides = {"nodes": "7", "artifact_size": "2MiB", "link": "lan-1g", "degree": "6", "k": "2", "settle": "5s"}
    on, series = run_scenario(str(SCENARIOS / "node-fetch.toml"), 4, overrides)
    off, _ = run_scenario(str(SCENARIOS / "node-fetch.toml"), 4, {**overrides, "node.superseed_window": "0s"})
    assert on.value("verified") == 6 and off.value("verified") == 6
    assert all(r["verified"] for r in series["fetches"])
    assert off.value("seed_upload_copies") > 5  # without it, every fetcher streams the whole DAG from the seed
    assert on.value("seed_upload_copies") < 2.5
    assert on.value("seed_share") < 0.5  # the fetchers served most of each other's blocks


def test_identities_and_artifact_follow_the_seed():
    def ids(seed):
        sim = LiveSim(seed)
        swarm = SimSwarm(sim, Network(sim))
        return [swarm.add_host("lan-1g").peer_id for _ in range(3)]

    assert ids(1) == ids(1) and ids(1) != ids(2)
    a, _ = run_scenario(str(SCENARIOS / "node-fetch.toml"), 6, {"nodes": "3", "artifact_size": "200KiB"})
    b, _ = run_scenario(str(SCENARIOS / "node-fetch.toml"), 6, {"nodes": "3", "artifact_size": "200KiB"})
    assert [r["root"] for r in a.records() if r["metric"] == "artifact_size"] == \
        [r["root"] for r in b.records() if r["metric"] == "artifact_size"]
