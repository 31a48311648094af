"""ProviderFinder and ProviderAnnouncer over a fake DHT, in virtual time (trio's autojump clock):
happy eyeballs, deadlines, the negative cache, sweeps with bounded concurrency, withdraw."""

import pytest
import trio

from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from p2pcache.content.cid import CID, DAG_CBOR
from p2pcache.routing import (
    AnnouncerConfig,
    FinderConfig,
    LookupCut,
    ProviderAnnouncer,
    ProviderAnswer,
    ProviderFinder,
    dht_key,
)
from p2pcache.routing.query import distance

ALIAS = "sha256:" + "ab" * 32
KEY = dht_key(ALIAS)


def pid(name: str) -> ID:
    return ID(name.encode())


class FakeDHT:
    """A network as a table: who each peer knows, who it names as providers, how long it takes to answer
    (None: never answers)."""

    def __init__(self, me="me", seeds=(), knows=None, holders=None, latency=None):
        self.peer_id = pid(me)
        self.seeds = [pid(s) for s in seeds]
        self.knows = {pid(k): [pid(v) for v in vs] for k, vs in (knows or {}).items()}
        self.holders = {pid(k): [pid(v) for v in vs] for k, vs in (holders or {}).items()}
        self.latency = {pid(k): v for k, v in (latency or {}).items()}
        self.local: dict[bytes, list[PeerInfo]] = {}
        self.asked: list[tuple[ID, float]] = []
        self.cancelled = 0
        # announcer side
        self.provided: list[bytes] = []
        self.withdrawn: list[bytes] = []
        self.in_flight = self.max_in_flight = 0

    # finder interface
    def local_providers(self, key):
        return list(self.local.get(key, []))

    def closest_known_peers(self, key):
        return list(self.seeds)

    async def ask_providers(self, peer, key):
        self.asked.append((peer, trio.current_time()))
        delay = self.latency.get(peer, 0.1)
        try:
            if delay is None:
                await trio.sleep_forever()
            await trio.sleep(delay)
        except trio.Cancelled:
            self.cancelled += 1
            raise
        if peer not in self.knows and peer not in self.holders:
            raise ConnectionError(f"{peer} unreachable")
        return ProviderAnswer(tuple(PeerInfo(h, []) for h in self.holders.get(peer, [])),
                              tuple(self.knows.get(peer, [])))

    # announcer interface
    async def provide_key(self, key):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await trio.sleep(1)
        finally:
            self.in_flight -= 1
        self.provided.append(key)
        return True

    def withdraw_key(self, key):
        self.withdrawn.append(key)


def by_distance(*names):
    return sorted(names, key=lambda n: distance(KEY, pid(n).to_bytes()))


# -- finder ---------------------------------------------------------------------------------------


@pytest.mark.trio
async def test_happy_eyeballs_takes_the_first_answer_and_cancels_the_rest(autojump_clock):
    near, far = by_distance("a", "b")
    dht = FakeDHT(seeds=[near, far], knows={near: [], far: []}, holders={near: ["x"], far: ["y"]},
                  latency={near: 10.0, far: 0.2})
    finder = ProviderFinder(dht, FinderConfig(stagger=0.05, alpha=3))
    start = trio.current_time()
    result = await finder.lookup(ALIAS, timeout=30)
    # the nearest peer is asked at once; the other after `stagger`, and its answer wins
    assert [(p, round(t - start, 3)) for p, t in dht.asked] == [(pid(near), 0), (pid(far), 0.05)]
    assert [p.peer_id for p in result.providers] == [pid("y")]
    assert result.source == "dht" and result.hops == 1 and result.asked == 2
    assert trio.current_time() - start == pytest.approx(0.25)
    assert dht.cancelled == 1  # the slow question was abandoned


@pytest.mark.trio
async def test_a_failure_starts_the_next_question_without_waiting(autojump_clock):
    a, b = by_distance("a", "b")
    dht = FakeDHT(seeds=[a, b], knows={b: []}, holders={b: ["x"]}, latency={a: 0.01, b: 0.1})
    finder = ProviderFinder(dht, FinderConfig(stagger=1.0))
    start = trio.current_time()
    result = await finder.lookup(ALIAS, timeout=30)
    assert result.found
    assert [round(t - start, 3) for _, t in dht.asked] == [0, 0.01]  # a failed at 0.01: b asked right away


@pytest.mark.trio
async def test_multi_hop_lookup_counts_hops(autojump_clock):
    dht = FakeDHT(seeds=["p1"], knows={"p1": ["p2"], "p2": ["p3"], "p3": ["p4"], "p4": []},
                  holders={"p4": ["prov"]})
    finder = ProviderFinder(dht)
    result = await finder.lookup(ALIAS, timeout=30)
    assert result.hops == 4 and result.asked == 4
    assert finder.stats.hops == [4] and finder.stats.found_dht == 1


@pytest.mark.trio
async def test_a_settled_miss_is_answered_from_the_negative_cache_until_it_expires(autojump_clock):
    dht = FakeDHT(seeds=["a", "b"], knows={"a": [], "b": []})  # both answer: nobody has it
    finder = ProviderFinder(dht, FinderConfig(negative_ttl=5.0))
    start = trio.current_time()
    first = await finder.lookup(ALIAS, timeout=1.5)
    assert not first.found and first.source == "miss" and not first.timed_out and first.settled
    asked, took = len(dht.asked), trio.current_time() - start
    second = await finder.lookup(ALIAS, timeout=1.5)
    assert second.source == "negative-cache" and not second.found
    assert len(dht.asked) == asked and trio.current_time() - start == pytest.approx(took)  # no network, no time
    assert (finder.stats.misses, finder.stats.timeouts, finder.stats.negative_hits) == (1, 0, 1)
    assert await finder.providers(ALIAS) == []  # a settled miss is an answer: "nobody"
    await trio.sleep(5.0)  # the miss is forgotten after negative_ttl
    third = await finder.lookup(ALIAS, timeout=0.5)
    assert third.source == "miss" and len(dht.asked) > asked


@pytest.mark.trio
async def test_a_miss_cut_by_the_timeout_is_bounded_and_not_remembered(autojump_clock):
    dht = FakeDHT(seeds=["a", "b"], knows={"a": [], "b": []}, latency={"a": None, "b": None})
    finder = ProviderFinder(dht, FinderConfig(negative_ttl=5.0, rpc_timeout=100))
    start = trio.current_time()
    first = await finder.lookup(ALIAS, timeout=1.5)
    assert not first.found and first.source == "miss" and first.timed_out and not first.settled
    assert trio.current_time() - start == pytest.approx(1.5)
    asked = len(dht.asked)
    second = await finder.lookup(ALIAS, timeout=1.5)  # walks again: a cut walk said nothing about "nobody"
    assert second.source == "miss" and len(dht.asked) > asked
    assert (finder.stats.misses, finder.stats.timeouts, finder.stats.negative_hits) == (2, 2, 0)
    assert await finder.find_providers(ALIAS, timeout=0.5) == []  # never raises
    with pytest.raises(LookupCut, match="cut by its timeout"):
        await finder.providers(ALIAS, timeout=0.5)


@pytest.mark.trio
async def test_a_miss_where_every_peer_failed_is_not_remembered(autojump_clock):
    dht = FakeDHT(seeds=["a", "b"], latency={"a": None, "b": None})
    finder = ProviderFinder(dht, FinderConfig(negative_ttl=5.0, rpc_timeout=0.5))
    first = await finder.lookup(ALIAS, timeout=10)
    assert not first.timed_out and first.asked == 2 and first.answered == 0 and not first.settled
    with pytest.raises(LookupCut, match="no answer from the 2 peer"):
        await finder.providers(ALIAS, timeout=10)
    assert finder.stats.negative_hits == 0


@pytest.mark.trio
async def test_local_providers_answer_without_asking_and_exclude_ourselves(autojump_clock):
    dht = FakeDHT(seeds=["a"], knows={"a": []})
    dht.local[KEY] = [PeerInfo(dht.peer_id, []), PeerInfo(pid("other"), [])]
    finder = ProviderFinder(dht)
    result = await finder.lookup(ALIAS)
    assert result.source == "local" and result.hops == 0 and dht.asked == []
    assert [p.peer_id for p in result.providers] == [pid("other")]
    dht.local[KEY] = [PeerInfo(dht.peer_id, [])]  # only ourselves: go to the network
    assert (await finder.lookup(ALIAS)).source == "miss"


# -- announcer ------------------------------------------------------------------------------------

ROOTS = [CID.for_block(DAG_CBOR, b"root %d" % i) for i in range(10)]


@pytest.mark.trio
async def test_announcer_sweeps_with_bounded_concurrency_and_resweeps(autojump_clock):
    dht = FakeDHT()
    announcer = ProviderAnnouncer(dht, AnnouncerConfig(interval=100.0, concurrency=3, batched=False))
    for i, root in enumerate(ROOTS):
        announcer.add(root, ["sha256:%064x" % i])
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        await nursery.start(announcer.run)
        assert len(dht.provided) == 20 and dht.max_in_flight == 3
        assert trio.current_time() - start == pytest.approx(7.0)  # 20 provides of 1 s, 3 at a time
        assert announcer.stats.sweeps == 1 and announcer.stats.last_sweep_keys == 20
        await trio.sleep(100.0 + 7.5)
        assert announcer.stats.sweeps == 2 and len(dht.provided) == 40
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_new_roots_are_announced_promptly_and_withdrawn_roots_leave_the_sweep(autojump_clock):
    dht = FakeDHT()
    announcer = ProviderAnnouncer(dht, AnnouncerConfig(interval=1000.0, concurrency=8, batched=False))
    async with trio.open_nursery() as nursery:
        await nursery.start(announcer.run)
        assert dht.provided == []
        announcer.add(ROOTS[0], ["sha256:" + "11" * 32, "sha512:" + "22" * 64])
        await trio.sleep(1.5)
        assert sorted(dht.provided) == sorted([dht_key(str(ROOTS[0])), dht_key("sha256:" + "11" * 32),
                                               dht_key("sha512:" + "22" * 64)])
        assert announcer.stats.sweeps == 1  # a prompt announcement is not a sweep
        announcer.add(ROOTS[1])
        while dht.in_flight == 0:  # let the announcer start providing ROOTS[1]
            await trio.sleep(0.01)
        announcer.withdraw(ROOTS[1])  # GC'd while its provide is in flight
        announcer.withdraw(ROOTS[0])
        await trio.sleep(2)
        assert set(dht.withdrawn) >= {dht_key(str(ROOTS[0])), dht_key(str(ROOTS[1]))}
        assert dht.withdrawn.count(dht_key(str(ROOTS[1]))) == 2  # and once more after its provide finished
        provided = len(dht.provided)
        assert await announcer.sweep() == 0 and len(dht.provided) == provided
        nursery.cancel_scope.cancel()


# -- batched sweeps: one walk per key-space region ---------------------------------------------------


class KeyspaceDHT:
    """A network of `n` peers placed by sha256 of their ids: a walk returns the true `k` closest (after
    0.3 s), ADD_PROVIDER streams are recorded."""

    def __init__(self, n, k=20):
        self.peer_id = pid("me")
        self.k = k
        self.peers = [pid(f"peer-{i}") for i in range(n)]
        self.walks = 0
        self.streams: list[tuple[ID, list[bytes]]] = []
        self.local: set[bytes] = set()
        self.withdrawn: list[bytes] = []
        self.refuse: set[ID] = set()

    def true_closest(self, key):
        return sorted(self.peers, key=lambda p: distance(key, p.to_bytes()))[: self.k]

    async def closest_peers(self, key, count):
        self.walks += 1
        await trio.sleep(0.3)
        return sorted(self.peers, key=lambda p: distance(key, p.to_bytes()))[:count]

    def record_providing(self, keys):
        self.local.update(keys)

    async def add_providers(self, peer, keys):
        await trio.sleep(0.05)
        if peer in self.refuse:
            raise ConnectionError("refused")
        self.streams.append((peer, list(keys)))

    def withdraw_key(self, key):
        self.withdrawn.append(key)


@pytest.mark.trio
async def test_batched_sweep_walks_once_per_region_and_sends_each_key_to_its_closest_peers(autojump_clock):
    dht = KeyspaceDHT(200)
    announcer = ProviderAnnouncer(dht, AnnouncerConfig(concurrency=8))
    roots = [CID.for_block(DAG_CBOR, b"root %d" % i) for i in range(500)]
    for i, root in enumerate(roots):
        announcer.add(root, ["sha256:%064x" % i])
    keys = announcer.announcements.keys()
    start = trio.current_time()
    assert await announcer.sweep() == len(keys) == 1000
    st = announcer.stats
    assert st.sweep_keys_done == st.sweep_keys_total == 1000 and not st.sweep_running
    assert st.provided == 1000 and st.failed == 0
    assert dht.walks <= 1000 / 5, dht.walks  # regions, not keys (per key: 1000 walks)
    assert trio.current_time() - start < 60
    got: dict[bytes, set] = {}
    for peer, batch in dht.streams:
        for key in batch:
            got.setdefault(key, set()).add(peer)
    assert sum(len(b) for _, b in dht.streams) == st.sweep_add_providers
    assert dht.local == set(keys)
    exact = sum(1 for key in keys if got.get(key, set()) == set(dht.true_closest(key)))
    assert exact >= 0.99 * len(keys), exact  # each key went to its true k closest peers
    assert all(len(got[key] & set(dht.true_closest(key))) >= 15 for key in keys)
    # one stream per peer per region: far fewer streams than ADD_PROVIDERs
    assert len(dht.streams) < st.sweep_add_providers / 5


@pytest.mark.trio
async def test_batched_sweep_counts_keys_that_reached_nobody_and_skips_withdrawn_ones(autojump_clock):
    dht = KeyspaceDHT(30, k=3)
    announcer = ProviderAnnouncer(dht, AnnouncerConfig(concurrency=4))
    roots = [CID.for_block(DAG_CBOR, b"r%d" % i) for i in range(60)]
    for root in roots:
        announcer.add(root)
    dht.refuse = set(dht.peers)  # every ADD_PROVIDER stream fails
    assert await announcer.sweep() == 0
    assert announcer.stats.failed == 60 and announcer.stats.provided == 0
    dht.refuse = set()
    announcer.withdraw(roots[0])
    assert await announcer.sweep() == 59
    sent = {key for _, batch in dht.streams for key in batch}
    assert dht_key(str(roots[0])) not in sent and len(sent) == 59
