"""SwarmSource's lookups over a swarm whose DHT is slow: the peers that answered the last lookups are asked at
once, beside the DHT walk (virtual time; the race is the real `routing.race`, the peers are fakes)."""

from __future__ import annotations

import os

import pytest
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from p2pcache.content.nar import Contents, RegularFile, write_nar
from p2pcache.content.nixhash import NixHash
from p2pcache.nixcache.metrics import Metrics
from p2pcache.nixcache.sources import RECENT_PROVIDERS, Intake, SwarmSource
from p2pcache.routing import NotHeld
from p2pcache.routing.race import ResolveRace, race_providers
from p2pcache.routing.resolve_wire import NarInfoFields, ResolveAnswer
from p2pcache.store.narstore import RepoNarStore, nix_alias
from p2pcache.store.repo import Repo

DHT_DELAY = 1.0  # seconds a DHT walk takes here
STAGGER = 0.2


def _peer(n: int) -> PeerInfo:
    return PeerInfo(ID(bytes([0, 4]) + n.to_bytes(4, "big")), [])


class SlowDhtSwarm:
    """The race as node.race_at_providers runs it (`first` asked at once, the DHT's providers after its walk,
    less those), over peers that hold what `held` says and a DHT that takes DHT_DELAY to name them."""

    lookup_timeout = 5.0
    me = None

    def __init__(self, repo: Repo) -> None:
        self.repo = repo
        self.held: dict[ID, dict[str, ResolveAnswer]] = {}
        self.named: dict[str, list[PeerInfo]] = {}  # the DHT's providers of each alias
        self.gateway_lookups: list[float] = []
        self.dead: set[ID] = set()
        self.asked: list[tuple[float, str, PeerInfo]] = []

    def ready(self) -> bool:
        return True

    async def race(self, alias, ask, more=(), timeout=None, first=()):
        race: ResolveRace = ResolveRace(deadline=trio.current_time() + (timeout or self.lookup_timeout),
                                        stagger=STAGGER)
        race.add_peers(first, trio.current_time())
        first_ids = {p.peer_id for p in first}

        async def dht(left: float) -> list[PeerInfo]:
            await trio.sleep(DHT_DELAY)
            return [p for p in self.named.get(alias, []) if p.peer_id not in first_ids]

        return await race_providers(race, ask, [dht, *more])

    async def resolve(self, peer: PeerInfo, alias: str) -> ResolveAnswer | None:
        self.asked.append((trio.current_time(), alias, peer))
        await trio.sleep(0.01)
        if peer.peer_id in self.dead:
            raise ConnectionError("gone")
        return self.held.get(peer.peer_id, {}).get(alias)

    async def fetch_blocks(self, cids, peers):
        return {c: self.repo.load_block(c) for c in cids}

    async def providers(self, alias, timeout=None):  # only the gateways' marker is looked up this way
        self.gateway_lookups.append(trio.current_time())
        await trio.sleep(0.05)
        return []


def _add(swarm: SlowDhtSwarm, store: RepoNarStore, holders: list[PeerInfo], name: str) -> str:
    nar = b"".join(write_nar([RegularFile(64), Contents(os.urandom(64))]))
    store_hash = name * 32
    root = store.add_nar(None, [nar]).root
    fields = NarInfoFields(store_path=f"/nix/store/{store_hash}-{name}", nar_hash=str(NixHash.of(nar)),
                           nar_size=len(nar))
    for p in holders:
        swarm.held.setdefault(p.peer_id, {})[nix_alias(store_hash)] = ResolveAnswer(root, "nar", len(nar), fields)
    swarm.named[nix_alias(store_hash)] = list(holders)
    return store_hash


@pytest.mark.trio
async def test_the_peer_that_answered_the_last_lookup_is_asked_at_once_not_after_the_dht_walk(tmp_path, autojump_clock):
    with Repo.init(tmp_path / "repo", durable=False) as repo:
        store = RepoNarStore(repo)
        swarm = SlowDhtSwarm(repo)
        a, c, gone = _peer(1), _peer(2), _peer(3)
        source = SwarmSource(swarm, Intake(None, None, None, lambda root: None, Metrics()),  # type: ignore[arg-type]
                             "/nix/store", ask_gateways=False)
        top, mid, only_c, after = (_add(swarm, store, holders, n) for holders, n in
                                   (([a], "a"), ([a, gone], "b"), ([c], "c"), ([a], "d")))

        t = trio.current_time()
        found = await source.narinfo(top)  # nobody answered before: the DHT walk first
        assert found is not None and found.providers == [a]
        assert trio.current_time() - t >= DHT_DELAY

        t = trio.current_time()
        found = await source.narinfo(mid)  # a answered the last one: asked at once, the walk is not waited for
        assert found is not None and found.providers[0] == a
        assert trio.current_time() - t < DHT_DELAY / 2
        assert swarm.asked[-1][1:] == (nix_alias(mid), a)

        # a path a does not hold: a says so at once, and c, whom the walk names, answers
        t = trio.current_time()
        found = await source.narinfo(only_c)
        assert found is not None and found.providers == [c]  # a, asked only because it is recent, is no provider
        assert trio.current_time() - t >= DHT_DELAY
        assert [p for _, alias, p in swarm.asked if alias == nix_alias(only_c)] == [a, c]
        assert list(source._recent) == [a.peer_id, c.peer_id]

        # a peer that fails is forgotten: c is gone now; a (still recent) answers
        swarm.dead.add(c.peer_id)
        found = await source.narinfo(after)
        assert found is not None and found.providers[0] == a
        assert list(source._recent) == [a.peer_id]

        # at most RECENT_PROVIDERS are remembered
        for n in range(RECENT_PROVIDERS + 2):
            p = _peer(10 + n)
            found = await source.narinfo(_add(swarm, store, [p], "fghjklmnp"[n]))
            assert found is not None and found.providers[0] == p
        assert len(source._recent) == RECENT_PROVIDERS


@pytest.mark.trio
async def test_the_manifest_root_in_the_answer_is_checked_and_saves_the_fetch(tmp_path, autojump_clock):
    """An answer that carries the manifest root's bytes needs no fetch of them (a round trip per lookup); bytes
    that do not hash to the root the peer named make that peer's answer a failure (the race goes on to an
    honest one), never a narinfo handed to Nix."""
    with Repo.init(tmp_path / "repo", durable=False) as repo:
        store = RepoNarStore(repo)
        swarm = SlowDhtSwarm(repo)
        fetched: list[list] = []
        load = swarm.fetch_blocks

        async def counting(cids, peers):
            fetched.append(cids)
            return await load(cids, peers)

        swarm.fetch_blocks = counting  # type: ignore[method-assign]
        liar, honest = _peer(1), _peer(2)
        source = SwarmSource(swarm, Intake(None, None, None, lambda root: None, Metrics()),  # type: ignore[arg-type]
                             "/nix/store", ask_gateways=False)
        store_hash = _add(swarm, store, [liar, honest], "a")
        alias = nix_alias(store_hash)
        for peer, block in ((honest, None), (liar, b"not the manifest")):
            answer = swarm.held[peer.peer_id][alias]
            swarm.held[peer.peer_id][alias] = ResolveAnswer(answer.root, answer.kind, answer.size, answer.narinfo,
                                                            block or repo.load_block(answer.root))
        found = await source.narinfo(store_hash)
        assert found is not None and found.providers[0] == honest
        assert found.root_block == repo.load_block(found.root)
        assert [p for _, a, p in swarm.asked if a == alias] == [liar, honest]  # the liar was asked, and failed
        assert fetched == []


@pytest.mark.trio
async def test_the_gateways_are_looked_up_only_once_no_provider_is_being_asked(tmp_path, autojump_clock):
    """The gateways' DHT lookup (always a miss in a swarm without gateways) ran beside every lookup's asks on
    the node's one event loop; now it waits while a provider is being asked, so a lookup a provider answers
    makes none, and one nobody can answer still asks the gateways, without waiting for GATEWAY_DELAY."""
    from p2pcache.nixcache.sources import GATEWAY_DELAY

    with Repo.init(tmp_path / "repo", durable=False) as repo:
        store = RepoNarStore(repo)
        swarm = SlowDhtSwarm(repo)
        lookups = swarm.gateway_lookups
        a = _peer(1)
        source = SwarmSource(swarm, Intake(None, None, None, lambda root: None, Metrics()),  # type: ignore[arg-type]
                             "/nix/store", ask_gateways=True)
        held = _add(swarm, store, [a], "a")
        found = await source.narinfo(held)
        assert found is not None and found.providers == [a]
        assert lookups == []
        t = trio.current_time()
        assert await source.narinfo("b" * 32) is None  # nobody has it: the gateways are asked
        assert len(lookups) == 1 and lookups[0] - t < GATEWAY_DELAY + DHT_DELAY


def test_a_stream_behind_its_fetch_reads_spilled_blocks_back_a_run_at_a_time(tmp_path):
    """Nix unpacking a tree of small files is slower than the fetch: blocks beyond the in-memory hold go to
    the repo only. The stream reads them back a run at a time in arrival order (one thread hop per run, not
    per block), out-of-order asks still get their own bytes, and a finished prefetch's held blocks join the
    run order ahead of those spilled (they came first)."""
    from p2pcache.content.cid import RAW, CID
    from p2pcache.nixcache.sources import READBACK_BYTES, ArrivingBlocks

    repo = Repo.init(tmp_path / "r")
    blocks = [(CID.for_block(RAW, d), d) for d in (os.urandom(4000 + i) for i in range(600))]
    repo.put_blocks(blocks)
    hops = {"load_block": 0, "load_blocks": 0}
    for name in hops:
        real = getattr(repo, name)

        def counted(*a, _real=real, _name=name):
            hops[_name] += 1
            return _real(*a)
        setattr(repo, name, counted)

    async def main() -> None:
        arriving = ArrivingBlocks(repo, hold=64 << 10)  # 15 blocks in memory, the rest spilled
        for cid, data in blocks:
            arriving.verified(cid, data)
        arriving.stored([c for c, _ in blocks])
        asked = [*blocks[:300], blocks[450], *blocks[300:]]  # one ask out of order
        for cid, data in asked:
            assert await arriving.get(cid) == data
        total = sum(len(d) for _, d in blocks)
        assert hops["load_blocks"] <= total // READBACK_BYTES + 3, hops
        assert hops["load_block"] <= 2, hops  # the out-of-order one, and maybe its repeat after the run passed it

        hops.update(load_block=0, load_blocks=0)
        again = ArrivingBlocks(repo, hold=256 << 10)  # a prefetch that finished before Nix asked
        for cid, data in blocks:
            again.verified(cid, data)
        again.stored([c for c, _ in blocks])
        again.drop_held()
        for cid, data in blocks:
            assert await again.get(cid) == data
        assert hops["load_block"] == 0 and hops["load_blocks"] <= total // READBACK_BYTES + 2, hops

    trio.run(main)
    repo.close()
