"""Provider lookups for store hashes: who has this archive, NAR or store path?

Owns `ProviderFinder.lookup(alias, timeout)`: bounded in time, happy-eyeballs over the DHT (ask the closest
known peer at once, the next after `stagger` seconds or as soon as an answer or failure comes in, at most
`alpha` in flight; return the moment `want` providers are known and cancel the rest), and a negative cache:
a miss is remembered for `negative_ttl` seconds, so a caller asking again for something nobody has gets
its answer from memory instead of another walk of the DHT — only a miss the walk settled (it ran to its end and
some peer answered, or there was nobody to ask); a walk cut by its `timeout`, or one where every peer
failed, is no answer and is not remembered. A miss never raises and never runs past its `timeout`
(`providers` raises `LookupCut` for an unsettled one, for callers that must tell the two apart). Providers learned here are only candidates to ask: nothing they send is trusted before the
exchange verifies it against the root CID.

The Kademlia iteration itself is `query.ProviderQuery` (sans-IO); this module is its trio driver over a
`ProviderRouting` (`dht.DHT`, or simnet's `SimDHT`). Counters in `FinderStats` (lookups, cache answers, RPCs,
hops of each success, latencies) are what benchmarks and simulations read.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from .errors import LookupCut
from .interfaces import ProviderRouting
from .keys import dht_key
from .query import ProviderQuery

__all__ = ["FinderConfig", "FinderStats", "LookupResult", "ProviderFinder", "drive_query"]

P = TypeVar("P", bound=Hashable)
R = TypeVar("R")


@dataclass(frozen=True)
class FinderConfig:
    alpha: int = 3  # questions in flight at once
    stagger: float = 0.05  # seconds before asking the next peer while earlier questions are pending
    rpc_timeout: float = 2.0  # one GET_PROVIDERS round trip gives up after this long
    negative_ttl: float = 5.0  # seconds a miss is answered from memory
    negative_max: int = 4096  # entries the negative cache holds at most
    want: int = 1  # providers to wait for before returning
    default_timeout: float = 5.0


@dataclass(frozen=True)
class LookupResult:
    alias: str
    providers: tuple[PeerInfo, ...]
    source: str  # "local" (our provider store), "dht", "negative-cache" or "miss"
    hops: int | None  # hop of the peer whose answer named the first provider (0 = local)
    asked: int  # GET_PROVIDERS questions sent
    elapsed: float  # seconds, by the trio clock
    timed_out: bool = False
    answered: int = 0  # GET_PROVIDERS questions answered

    @property
    def found(self) -> bool:
        return bool(self.providers)

    @property
    def settled(self) -> bool:
        """Found, or a miss the walk settled: it ran to its end (not cut by the timeout) and some peer
        answered, or it knew no peer to ask. Only a settled miss means "nobody has it"."""
        return self.found or not self.timed_out and (self.answered > 0 or self.asked == 0)


@dataclass
class FinderStats:
    lookups: int = 0
    found_local: int = 0
    found_dht: int = 0
    misses: int = 0  # lookups that went to the network and found nothing
    timeouts: int = 0  # of which cut short by the deadline
    negative_hits: int = 0  # lookups answered from the negative cache
    rpcs: int = 0
    hops: list[int] = field(default_factory=list)  # per DHT success
    latencies: list[float] = field(default_factory=list)  # per network lookup, found or not


class ProviderFinder:
    """`dialable(peer)`: False while a dial to `peer` would be refused (the host's dial backoff after failed
    dials). Providers from our own provider store that all fail it are no answer yet: the lookup walks the DHT
    as well, whose answers carry the providers' signed peer records — a newer one (the provider restarted)
    lifts the backoff, where the record we held, unchanged since before the failures, never would."""

    def __init__(self, dht: ProviderRouting, config: FinderConfig = FinderConfig(),
                 clock: Callable[[], float] = trio.current_time, dialable: Callable[[ID], bool] | None = None):
        self.dht = dht
        self.config = config
        self.stats = FinderStats()
        self._clock = clock
        self._dialable = dialable
        self._negative: dict[bytes, float] = {}  # DHT key -> time the miss stops being believed

    async def find_providers(self, alias: str, timeout: float | None = None) -> list[PeerInfo]:
        """Providers of `alias` other than ourselves; empty if none turned up before `timeout`."""
        return list((await self.lookup(alias, timeout)).providers)

    async def providers(self, alias: str, timeout: float | None = None) -> list[PeerInfo]:
        """Like `find_providers`, but a miss the walk did not settle (`LookupResult.settled`) raises
        `LookupCut` instead of looking like "nobody has it"."""
        result = await self.lookup(alias, timeout)
        if not result.settled:
            why = "was cut by its timeout" if result.timed_out else f"got no answer from the {result.asked} peer(s) asked"
            raise LookupCut(f"the DHT lookup of {alias} {why} after {result.elapsed:.1f} s")
        return list(result.providers)

    def forget_miss(self, alias: str) -> None:
        """Drop a cached miss, e.g. after hearing that someone now has `alias`."""
        self._negative.pop(dht_key(alias), None)

    async def lookup(self, alias: str, timeout: float | None = None) -> LookupResult:
        key = dht_key(alias)  # InvalidKey for a malformed alias: the caller's input, not a miss
        timeout = self.config.default_timeout if timeout is None else timeout
        start = self._clock()
        self.stats.lookups += 1

        expiry = self._negative.get(key)
        if expiry is not None:
            if expiry > start:
                self.stats.negative_hits += 1
                return LookupResult(alias, (), "negative-cache", None, 0, 0.0)
            del self._negative[key]

        local = [p for p in self.dht.local_providers(key) if p.peer_id != self.dht.peer_id]
        if local and (self._dialable is None or any(self._dialable(p.peer_id) for p in local)):
            self.stats.found_local += 1
            return LookupResult(alias, tuple(local), "local", 0, 0, 0.0)

        query: ProviderQuery[ID, PeerInfo] = ProviderQuery(
            key, peer_bytes=ID.to_bytes, self_peer=self.dht.peer_id, alpha=self.config.alpha,
            want=self.config.want,
        )
        query.add_seeds(self.dht.closest_known_peers(key))
        timed_out = True
        with trio.move_on_after(timeout):
            await self._drive(query, key)
            timed_out = False
        elapsed = self._clock() - start
        self.stats.rpcs += query.stats.asked
        self.stats.latencies.append(elapsed)
        providers = tuple(query.providers.values())
        if local:  # none of them dialable now: the walk's answers come first, then what we held
            walked = {p.peer_id for p in providers}
            providers += tuple(p for p in local if p.peer_id not in walked)
            if not query.providers:
                self.stats.found_local += 1
                return LookupResult(alias, providers, "local", 0, query.stats.asked, elapsed, timed_out,
                                    query.stats.answered)
        if providers:
            self.stats.found_dht += 1
            assert query.stats.found_at_hop is not None
            self.stats.hops.append(query.stats.found_at_hop)
            return LookupResult(alias, providers, "dht", query.stats.found_at_hop, query.stats.asked,
                                elapsed, timed_out, query.stats.answered)
        self.stats.misses += 1
        self.stats.timeouts += timed_out
        result = LookupResult(alias, (), "miss", None, query.stats.asked, elapsed, timed_out, query.stats.answered)
        if result.settled:  # a walk cut short, or one nobody answered, says nothing about who has it
            self._remember_miss(key, self._clock())
        return result

    def _remember_miss(self, key: bytes, now: float) -> None:
        if len(self._negative) >= self.config.negative_max:
            for k in [k for k, t in self._negative.items() if t <= now] or [next(iter(self._negative))]:
                del self._negative[k]
        self._negative[key] = now + self.config.negative_ttl

    async def _drive(self, query: ProviderQuery[ID, PeerInfo], key: bytes) -> None:
        async def ask(peer: ID) -> None:
            try:
                with trio.fail_after(self.config.rpc_timeout):
                    answer = await self.dht.ask_providers(peer, key)
            except Exception:  # unreachable, slow, or a bad answer: that peer just does not count
                query.on_failure(peer)
            else:
                query.on_answer(peer, ((p.peer_id, p) for p in answer.providers), answer.closer)

        # happy eyeballs; once found, the questions still pending are not needed
        await drive_query(query, ask, stagger=self.config.stagger, cancel_pending=True)


async def drive_query(query: ProviderQuery[P, R], ask: Callable[[P], Awaitable[None]], *,
                      stagger: float | None, cancel_pending: bool) -> None:
    """Pump `query` until it is done: `ask(peer)` runs in a task for every peer `next_peer` hands out and
    reports to the query itself (`on_answer` / `on_failure`). `stagger`: after starting a question, wait
    up to this long for one to finish before starting another (happy eyeballs); None: start them as fast
    as the query allows (up to its `alpha`). `cancel_pending`: when the query is done, cancel questions
    still in flight (else wait for them). The one trio driver of `ProviderQuery` (`ProviderFinder`, and
    simnet's `SimDHT` walks)."""
    send, receive = trio.open_memory_channel[None](math.inf)

    async def one(peer: P) -> None:
        await ask(peer)
        send.send_nowait(None)

    async with trio.open_nursery() as nursery:
        while not query.done:
            peer = query.next_peer()
            if peer is not None:
                nursery.start_soon(one, peer)
                if stagger is not None:
                    with trio.move_on_after(stagger):
                        await receive.receive()
            elif query.in_flight:
                await receive.receive()
            else:
                break
        if cancel_pending:
            nursery.cancel_scope.cancel()
