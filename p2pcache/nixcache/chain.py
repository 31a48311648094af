"""The narinfo lookup chain: an ordered list of `NarSource`s (`nix.lookup_order`), asked in turn.

Owns what the chain remembers across requests: answers from remote sources whose NAR is not fetched yet
(`pending`), misses (for `negative_ttl`; only true misses — a source that raised `LookupFailed` had
someone who failed, lied or was slow), and one lock per store path so that concurrent requests for the
same path make one remote lookup. Local sources before the first remote one are asked first on every
request, without the lock (they are cheap and their answers change as the repo does).

Pure of I/O except what the sources do: a test assembles a chain from fake sources.
"""

from __future__ import annotations

import time
from typing import Sequence

import trio

from .metrics import Metrics
from .sources import Found, LookupFailed, NarSource

__all__ = ["LookupChain"]

NEGATIVE_CACHE_ENTRIES = 65536  # beyond this many remembered misses, expired ones are swept out


class LookupChain:
    def __init__(self, sources: Sequence[NarSource], negative_ttl: float, metrics: Metrics) -> None:
        self.sources = list(sources)
        self.negative_ttl = negative_ttl
        self.metrics = metrics
        first_remote = next((i for i, s in enumerate(self.sources) if s.remote), len(self.sources))
        self._local = self.sources[:first_remote]
        self._rest = self.sources[first_remote:]
        self._pending: dict[str, Found] = {}
        self._negative: dict[str, float] = {}
        self._locks: dict[str, trio.Lock] = {}

    def source(self, name: str) -> NarSource | None:
        return next((s for s in self.sources if s.name == name), None)

    def lock(self, key: str) -> trio.Lock:
        return self._locks.setdefault(key, trio.Lock())

    # -- what the chain remembers -----------------------------------------------------------------------
    def pending(self, store_hash: str) -> Found | None:
        return self._pending.get(store_hash)

    def forget_pending(self, store_hash: str) -> None:
        self._pending.pop(store_hash, None)

    def known_miss(self, store_hash: str) -> bool:
        expiry = self._negative.get(store_hash)
        return expiry is not None and expiry > time.monotonic()

    def remember_miss(self, store_hash: str) -> None:
        self._negative[store_hash] = time.monotonic() + self.negative_ttl
        if len(self._negative) > NEGATIVE_CACHE_ENTRIES:
            now = time.monotonic()
            self._negative = {k: t for k, t in self._negative.items() if t > now}

    def forget_miss(self, store_hash: str) -> None:
        self._negative.pop(store_hash, None)

    # -- the lookup ---------------------------------------------------------------------------------
    async def find(self, store_hash: str) -> Found | None:
        """The first source's answer, or None (remembered for negative_ttl if every source truly missed)."""
        for source in self._local:
            found = await source.narinfo(store_hash)
            if found is not None:
                return found
        if not self._rest:
            return None
        if self.known_miss(store_hash):
            self.metrics.negative_hits.inc()
            return None
        pending = self._pending.get(store_hash)
        if pending is not None:
            return pending
        found = None
        conclusive = True
        async with self.lock(store_hash):
            pending = self._pending.get(store_hash)  # another request looked it up while we waited
            if pending is not None:
                return pending
            for source in self._rest:
                try:
                    found = await source.narinfo(store_hash)
                except LookupFailed:
                    conclusive = False
                    continue
                if found is not None:
                    break
        if found is None:
            if conclusive:  # someone had it but failed, lied or was too slow: not a miss to remember
                self.remember_miss(store_hash)
            return None
        if found.source.remote:
            self._pending[store_hash] = found
        return found
