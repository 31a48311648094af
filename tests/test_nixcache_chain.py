"""The narinfo lookup chain (p2pcache.nixcache.chain) assembled from fake sources: order, what it remembers
(pending answers, true misses), one remote lookup per path at a time; and `nix.lookup_order` reordering the
chain a node builds. Pure code plus virtual time: the sources are fakes of the `NarSource` protocol."""

from __future__ import annotations

import contextlib
from typing import AsyncIterator

import pytest
import trio

from p2pcache.config import LOOKUP_SOURCES, NixConfig, check_lookup_order, load
from p2pcache.content.narinfo import NarInfo
from p2pcache.content.nixhash import NixHash
from p2pcache.content.storepath import StorePath
from p2pcache.errors import InvalidInput
from p2pcache.nixcache import (Found, LookupChain, LookupFailed, Metrics, NarSink, NarSource, StillLooking,
                               build_sources)
from p2pcache.nixcache.chain import PENDING_TTL, WAIT_FOREVER
from p2pcache.nixcache.service import default_patience

HASH = "0" * 31 + "1"
OTHER = "0" * 31 + "2"


def _info(store_hash: str = HASH) -> NarInfo:
    return NarInfo(store_path=StorePath.parse(f"/nix/store/{store_hash}-demo-1.0"), url="nar/x.nar",
                   nar_hash=NixHash("sha256", bytes(32)), nar_size=8)


class FakeSource:
    """A `NarSource` that answers from a dict (or fails), after `delay` seconds, and counts its lookups."""

    def __init__(self, name: str, *, remote: bool, holds: tuple[str, ...] = (), fails: bool = False,
                 delay: float = 0.0) -> None:
        self.name = self.label = name
        self.remote = remote
        self.holds = set(holds)
        self.fails = fails
        self.delay = delay
        self.asked: list[str] = []

    async def narinfo(self, store_hash: str) -> Found | None:
        self.asked.append(store_hash)
        await trio.sleep(self.delay)
        if self.fails:
            raise LookupFailed(f"{self.name}: a provider did not answer in time")
        return Found(_info(store_hash), self) if store_hash in self.holds else None

    async def stream_nar(self, found: Found, sink: NarSink, head: bool = False) -> None:
        await sink.start(found.narinfo.nar_size)
        await sink.write(b"\0" * found.narinfo.nar_size)
        await sink.end()


@contextlib.asynccontextmanager
async def _chain(*sources: NarSource, ttl: float = 30.0, wait: float = 5.0,
                 patience: float = 20.0) -> AsyncIterator[tuple[LookupChain, Metrics]]:
    """A chain with its background nursery running (as the node runs it), stopped on the way out."""
    metrics = Metrics()  # mypy checks the fakes against the NarSource protocol here
    chain = LookupChain(sources, ttl, metrics, wait=wait, patience=patience)
    async with trio.open_nursery() as nursery:
        await nursery.start(chain.run)
        yield chain, metrics
        nursery.cancel_scope.cancel()


def _negative_hits(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("p2pcache_narinfo_negative_cache_hits_total") or 0.0


@pytest.mark.trio
async def test_sources_are_asked_in_order_and_the_first_answer_wins():
    repo, nixstore = FakeSource("repo", remote=False), FakeSource("nixstore", remote=False, holds=(HASH,))
    swarm = FakeSource("swarm", remote=True, holds=(HASH,))
    async with _chain(repo, nixstore, swarm) as (chain, _):
        found = await chain.find(HASH)
        assert found is not None and found.source is nixstore
        assert (repo.asked, nixstore.asked, swarm.asked) == ([HASH], [HASH], [])
        assert chain.pending(HASH) is None  # a local answer is not remembered: the next request asks again
        await chain.find(HASH)
        assert nixstore.asked == [HASH, HASH]


@pytest.mark.trio
async def test_a_remote_answer_stays_pending_until_forgotten():
    repo, swarm = FakeSource("repo", remote=False), FakeSource("swarm", remote=True, holds=(HASH,))
    async with _chain(repo, swarm) as (chain, _):
        first = await chain.find(HASH)
        assert first is not None and first.source is swarm and chain.pending(HASH) is first
        assert await chain.find(HASH) is first and swarm.asked == [HASH]  # not asked again
        assert repo.asked == [HASH, HASH]  # the repo is asked every time: an upload may have come meanwhile
        chain.forget_pending(HASH)
        await chain.find(HASH)
        assert swarm.asked == [HASH, HASH]


@pytest.mark.trio
async def test_a_true_miss_is_remembered_for_the_ttl(autojump_clock):
    repo, swarm, upstreams = (FakeSource("repo", remote=False), FakeSource("swarm", remote=True),
                              FakeSource("upstreams", remote=True))
    async with _chain(repo, swarm, upstreams, ttl=30.0) as (chain, metrics):
        assert await chain.find(HASH) is None
        assert await chain.find(HASH) is None
        assert (swarm.asked, upstreams.asked) == ([HASH], [HASH])
        assert _negative_hits(metrics) == 1
        repo.holds.add(HASH)  # a local source still answers while the miss is remembered
        found = await chain.find(HASH)
        assert found is not None and found.source is repo
        repo.holds.clear()
        chain.forget_miss(HASH)  # what an upload of the path does
        assert await chain.find(HASH) is None and swarm.asked == [HASH, HASH]


@pytest.mark.trio
async def test_the_miss_expires(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("p2pcache.nixcache.chain.time.monotonic", lambda: now[0])
    swarm = FakeSource("swarm", remote=True)
    async with _chain(FakeSource("repo", remote=False), swarm, ttl=30.0) as (chain, _):
        await chain.find(HASH)
        now[0] += 29.0
        await chain.find(HASH)
        assert swarm.asked == [HASH]
        now[0] += 2.0
        await chain.find(HASH)
        assert swarm.asked == [HASH, HASH]


@pytest.mark.trio
async def test_a_failed_lookup_is_asked_again_within_its_patience_then_not_remembered(autojump_clock):
    swarm = FakeSource("swarm", remote=True, fails=True)
    upstreams = FakeSource("upstreams", remote=True)
    async with _chain(FakeSource("repo", remote=False), swarm, upstreams, wait=5.0,
                      patience=6.0) as (chain, metrics):
        assert await chain.find(HASH, wait=WAIT_FOREVER) is None  # the patience ran out
        assert trio.current_time() == pytest.approx(6.0)
        # tried again after 0.5, 1, 2 s of back-off (at 0, 0.5, 1.5, 3.5 s), later sources each time
        assert swarm.asked == upstreams.asked == [HASH] * 4
        assert _negative_hits(metrics) == 0 and not chain.known_miss(HASH)
        assert metrics.registry.get_sample_value("p2pcache_narinfo_lookup_retries_total") == 4
        upstreams.holds.add(HASH)
        found = await chain.find(HASH)
        assert found is not None and found.source is upstreams and chain.pending(HASH) is found


@pytest.mark.trio
async def test_a_source_that_fails_once_is_found_by_the_lookups_second_try(autojump_clock):
    class Flaky(FakeSource):
        async def narinfo(self, store_hash: str) -> Found | None:
            self.fails = not self.asked  # e.g. the manifest fetch timed out while the peer was busy
            return await super().narinfo(store_hash)

    swarm = Flaky("swarm", remote=True, holds=(HASH,))
    async with _chain(FakeSource("repo", remote=False), swarm) as (chain, _):
        found = await chain.find(HASH)  # one request, no 404: the lookup asked again after 0.5 s
        assert found is not None and swarm.asked == [HASH, HASH]
        assert trio.current_time() == pytest.approx(0.5)


@pytest.mark.trio
async def test_concurrent_requests_for_one_path_make_one_remote_lookup(autojump_clock):
    swarm = FakeSource("swarm", remote=True, holds=(HASH,), delay=2.0)
    async with _chain(FakeSource("repo", remote=False), swarm) as (chain, _):
        results: list[Found | None] = []

        async def ask(store_hash: str) -> None:
            results.append(await chain.find(store_hash))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(ask, HASH)
            nursery.start_soon(ask, OTHER)  # another path is not held up behind the lock
        assert swarm.asked.count(HASH) == 1 and swarm.asked.count(OTHER) == 1
        assert len({id(r) for r in results if r is not None}) == 1 and results.count(None) == 1
        assert trio.current_time() == pytest.approx(2.0)  # OTHER ran beside HASH, not after it


def test_lookup_order_reorders_and_leaves_out_the_chain():
    repo, local = FakeSource("repo", remote=False), FakeSource("nixstore", remote=False)
    swarm, upstream = FakeSource("swarm", remote=True), FakeSource("upstreams", remote=True)
    default = build_sources(NixConfig(), repo, local, swarm, upstream)
    assert [s.name for s in default] == list(LOOKUP_SOURCES) == ["repo", "nixstore", "swarm", "upstreams"]
    cfg = NixConfig(lookup_order=["repo", "upstreams", "swarm"])
    assert [s.name for s in build_sources(cfg, repo, local, swarm, upstream)] == ["repo", "upstreams", "swarm"]
    # a source this node does not have (no local store served, no upstreams) is left out
    assert [s.name for s in build_sources(NixConfig(), repo, None, swarm, None)] == ["repo", "swarm"]


@pytest.mark.trio
async def test_a_reordered_chain_asks_upstreams_before_the_swarm():
    repo = FakeSource("repo", remote=False)
    swarm, upstreams = FakeSource("swarm", remote=True, holds=(HASH,)), FakeSource("upstreams", remote=True, holds=(HASH,))
    sources = build_sources(NixConfig(lookup_order=["repo", "upstreams", "swarm"]), repo, None, swarm, upstreams)
    async with _chain(*sources) as (chain, _):
        found = await chain.find(HASH)
        assert found is not None and found.source is upstreams and swarm.asked == []


@pytest.mark.parametrize("order", [["swarm", "upstreams"], ["repo", "repo"], ["repo", "cache.example"], []])
def test_bad_lookup_orders_are_one_line_errors(order):
    with pytest.raises(InvalidInput, match="nix.lookup_order must list distinct names"):
        check_lookup_order(order, "config.toml")


def test_lookup_order_in_config_toml(tmp_path):
    (tmp_path / "config.toml").write_text('[nix]\nlookup_order = ["repo", "upstreams", "nixstore", "swarm"]\n')
    assert load(tmp_path).nix.lookup_order == ["repo", "upstreams", "nixstore", "swarm"]
    (tmp_path / "config.toml").write_text('[nix]\nlookup_order = ["swarm"]\n')
    with pytest.raises(InvalidInput, match=r"config.toml: nix.lookup_order"):
        load(tmp_path)


@pytest.mark.trio
async def test_a_slow_lookup_is_still_looking_not_a_miss_and_goes_on_for_the_retry(autojump_clock):
    swarm = FakeSource("swarm", remote=True, holds=(HASH,), delay=8.0)
    async with _chain(FakeSource("repo", remote=False), swarm, wait=5.0, patience=20.0) as (chain, metrics):
        with pytest.raises(StillLooking, match="still looking"):
            await chain.find(HASH)
        assert trio.current_time() == pytest.approx(5.0) and chain.looking_up(HASH)
        assert not chain.known_miss(HASH)
        await trio.sleep(0.3)  # Nix's first retry comes 250-350 ms later, and waits again
        found = await chain.find(HASH)
        assert found is not None and found.source is swarm and chain.pending(HASH) is found
        assert trio.current_time() == pytest.approx(8.0)  # the answer came as soon as the lookup had it
        assert swarm.asked == [HASH]  # one lookup for both requests
        assert metrics.registry.get_sample_value("p2pcache_narinfo_still_looking_total") == 1


@pytest.mark.trio
async def test_a_lookup_cut_by_its_patience_is_answered_as_a_miss_but_not_remembered(autojump_clock):
    swarm = FakeSource("swarm", remote=True, holds=(HASH,), delay=60.0)
    async with _chain(FakeSource("repo", remote=False), swarm, wait=5.0, patience=20.0) as (chain, metrics):
        with pytest.raises(StillLooking):
            await chain.find(HASH)
        assert await chain.find(HASH, wait=WAIT_FOREVER) is None
        assert trio.current_time() == pytest.approx(20.0) and not chain.looking_up(HASH)
        assert not chain.known_miss(HASH) and _negative_hits(metrics) == 0
        assert metrics.registry.get_sample_value("p2pcache_narinfo_lookups_unsettled_total") == 1
        swarm.delay = 0.0
        found = await chain.find(HASH)  # looked up afresh
        assert found is not None and swarm.asked == [HASH, HASH]


@pytest.mark.trio
async def test_a_look_aheads_miss_is_remembered_only_once_nix_asked_too(autojump_clock):
    swarm = FakeSource("swarm", remote=True, delay=1.0)
    async with _chain(FakeSource("repo", remote=False), swarm) as (chain, _):
        assert await chain.find(HASH, remember_miss=False, wait=WAIT_FOREVER) is None
        assert not chain.known_miss(HASH)
        async with trio.open_nursery() as nursery:  # a look-ahead under way, then Nix asks for the same path
            nursery.start_soon(lambda: chain.find(OTHER, remember_miss=False, wait=WAIT_FOREVER))
            await trio.sleep(0.5)
            assert await chain.find(OTHER) is None
        assert chain.known_miss(OTHER) and swarm.asked == [HASH, OTHER]


@pytest.mark.trio
async def test_pending_answers_expire_and_are_bounded(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("p2pcache.nixcache.chain.time.monotonic", lambda: now[0])
    monkeypatch.setattr("p2pcache.nixcache.chain.PENDING_ENTRIES", 3)
    hashes = [f"{i:032d}" for i in range(5)]
    swarm = FakeSource("swarm", remote=True, holds=tuple(hashes))
    async with _chain(FakeSource("repo", remote=False), swarm) as (chain, _):
        first = await chain.find(hashes[0])  # e.g. a look-ahead's answer whose NAR Nix never asks for
        now[0] += PENDING_TTL - 1
        assert chain.pending(hashes[0]) is first
        now[0] += 2
        assert chain.pending(hashes[0]) is None  # too old: a request now looks it up again
        assert await chain.find(hashes[0]) is not None and swarm.asked == [hashes[0]] * 2
        for h in hashes[1:]:
            await chain.find(h)
            now[0] += 1
        assert chain.pending_count() == 3  # the oldest went first
        assert [h for h in hashes if chain.pending(h) is not None] == hashes[2:]


@pytest.mark.trio
async def test_a_source_that_breaks_gives_each_waiting_request_its_error_and_the_chain_lives_on():
    class Broken(FakeSource):
        async def narinfo(self, store_hash: str) -> Found | None:
            self.asked.append(store_hash)
            raise InvalidInput("the peer sent a narinfo that does not parse")

    swarm = Broken("swarm", remote=True)
    async with _chain(FakeSource("repo", remote=False), swarm) as (chain, _):
        for _ in range(2):
            with pytest.raises(InvalidInput, match="does not parse"):
                await chain.find(HASH)
        assert swarm.asked == [HASH, HASH] and not chain.known_miss(HASH)


@pytest.mark.trio
async def test_per_key_locks_are_dropped_once_free():
    async with _chain(FakeSource("repo", remote=False)) as (chain, _):
        async with chain.locked("nar:x"):
            assert "nar:x" in chain._locks
        assert chain._locks == {}


@pytest.mark.trio
async def test_a_lookup_slower_than_the_wait_that_ends_unsettled_answers_the_retry_not_another_503(autojump_clock):
    swarm = FakeSource("swarm", remote=True, fails=True, delay=6.0)  # a silent provider's ask times out at 6 s
    async with _chain(FakeSource("repo", remote=False), swarm, wait=5.0, patience=7.0) as (chain, _):
        with pytest.raises(StillLooking):
            await chain.find(HASH)
        await trio.sleep(2.5)  # the lookup's patience ends meanwhile (7 s), with nobody waiting
        assert await chain.find(HASH) is None and swarm.asked == [HASH, HASH]  # the retry gets that ending
        assert not chain.known_miss(HASH)
        with pytest.raises(StillLooking):  # taken once: the next request looks again
            await chain.find(HASH)
        assert swarm.asked == [HASH, HASH, HASH]


@pytest.mark.trio
@pytest.mark.parametrize("wait", [0.0, 2.0, 5.0])
async def test_with_the_default_patience_nixs_last_attempt_gets_a_final_answer(autojump_clock, wait):
    """Nix 2.8 retries a 503 narinfo 4 times, backing off 250 ms × 2^(n-1) (the shortest schedule): a lookup
    that never answers has ended by its fifth attempt, which gets a 404, not a 503 that fails the copy."""
    swarm = FakeSource("swarm", remote=True, holds=(HASH,), delay=1e6)
    async with _chain(FakeSource("repo", remote=False), swarm, wait=wait,
                      patience=default_patience(wait)) as (chain, _):
        for attempt in range(4):
            with pytest.raises(StillLooking):
                await chain.find(HASH)
            await trio.sleep(0.25 * 2 ** attempt)
        assert await chain.find(HASH) is None and not chain.known_miss(HASH)


@pytest.mark.trio
@pytest.mark.parametrize("offset", [0.0, 0.3, 1.2, 2.6])
@pytest.mark.parametrize("jitter", [0.0, 0.5])
async def test_two_requests_for_one_path_retrying_side_by_side_both_get_a_final_answer(autojump_clock, offset, jitter):
    """Nix 2.8 asks for a path's narinfo more than once at a time (HEAD for isValidPath, then GET), each with
    its own 5 attempts: a lookup that ends while one of them waits must still answer the other's last
    attempt, not start another lookup that gives it a 503 (seen in a cold `nix copy --from`)."""
    swarm = FakeSource("swarm", remote=True, fails=True, delay=5.5)  # a provider that never answers in time
    wait = 5.0
    async with _chain(FakeSource("repo", remote=False), swarm, wait=wait,
                      patience=default_patience(wait)) as (chain, _):
        last: dict[str, object] = {}

        async def nix(name: str, start: float) -> None:
            await trio.sleep(start)
            for attempt in range(5):
                try:
                    last[name] = await chain.find(HASH)
                    return
                except StillLooking as e:
                    last[name] = e
                await trio.sleep(0.25 * 2 ** attempt * (1 + jitter))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(nix, "head", 0.0)
            nursery.start_soon(nix, "get", offset)
        assert last == {"head": None, "get": None}
        assert not chain.known_miss(HASH)
        assert chain._ended == {}  # nothing owed any more: the next request looks again
