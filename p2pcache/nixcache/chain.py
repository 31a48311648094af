"""The narinfo lookup chain: an ordered list of `NarSource`s (`nix.lookup_order`), asked in turn.

Owns what the chain remembers across requests: answers from remote sources whose NAR is not fetched yet
(`pending`, for at most `pending_ttl` seconds and `PENDING_ENTRIES`), misses (for `negative_ttl`; only settled
misses — every remote source ran to its end and said nobody has it; a source that raised `LookupFailed`
had someone who failed, lied or was slow, or could not finish its walk), and the remote lookups under way:
one per store path, run in the chain's own nursery (`run`), so concurrent requests for the same path share
it and a request that stops waiting does not stop the lookup. Local sources before the first remote one
are asked first on every request, outside all that (they are cheap and their answers change as the repo
does).

A request waits `wait` seconds for a remote lookup; if it is still going the request gets `StillLooking`
(503, which Nix retries without caching anything) and the lookup goes on for up to `patience` seconds,
so the retry finds the answer pending. A lookup whose sources did not settle (someone announces the path
but failed, lied or was slow; a walk did not finish; an upstream failed) is tried again, backing off,
while its patience lasts; only when the patience ran out is it answered as a miss, and not remembered:
the next request looks again, except the retries owed an answer: each 503 a lookup gave is followed by
one retry, and the retries that come after it ended (within `ENDING_LINGER`) take that ending, however
many requests for the path Nix has going at once (it asks HEAD for isValidPath and GET side by side).

Pure of I/O except what the sources do: a test assembles a chain from fake sources.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

import trio

from ..errors import P2PCacheError
from .background import Background
from .errors import SourceFailed, StillLooking
from .metrics import Metrics
from .sources import Found, LookupFailed, NarSource

__all__ = ["LookupChain"]

log = logging.getLogger("p2pcache.nixcache")

NEGATIVE_CACHE_ENTRIES = 65536  # beyond this many remembered misses, expired ones are swept out
# An answer waits this long (nix.pending_ttl's default) for Nix to ask for its NAR: Nix asks right after the
# narinfo, or (a large closure's look-ahead answers) once the copy reaches the path. A later request looks it
# up again.
PENDING_TTL = 600.0
PENDING_ENTRIES = 4096  # beyond this many, the oldest pending answers are dropped
# An unsettled ending (or an error) is kept this long for the retries it still owes an answer (`_Lookup.owed`:
# the 503s it gave, less the requests that came for it since), so a lookup that always takes longer than the
# wait cannot make every retry a 503 that starts it over. Nix 2.8 asks for a path's narinfo more than once at
# a time (HEAD for isValidPath, GET), each retrying on its own: one lookup ending while the GET waits must
# still answer the HEAD's last attempt, where a new lookup's 503 fails the copy. Nix retries within about
# 3 s of a 503.
ENDING_LINGER = 10.0
RETRY_FIRST, RETRY_MAX = 0.5, 4.0  # an unsettled lookup is tried again after these back-offs, within its patience
WAIT_FOREVER = math.inf


@dataclass
class _Lookup:
    """One remote lookup under way, shared by every request for its path."""

    remember_miss: bool  # someone who may remember a settled miss (not only a look-ahead) asked
    done: trio.Event = field(default_factory=trio.Event)
    waiting: int = 0  # requests waiting for it right now
    found: Found | None = None
    error: P2PCacheError | None = None
    owed: int = 0  # 503s given whose retry has not come yet (each 503 is retried once)


class LookupChain:
    def __init__(self, sources: Sequence[NarSource], negative_ttl: float, metrics: Metrics, *,
                 wait: float = 5.0, patience: float = 20.0, pending_ttl: float = PENDING_TTL) -> None:
        self.sources = list(sources)
        self.negative_ttl = negative_ttl
        self.metrics = metrics
        self.wait = wait
        self.patience = max(patience, wait)
        self.pending_ttl = pending_ttl
        first_remote = next((i for i, s in enumerate(self.sources) if s.remote), len(self.sources))
        self._local = self.sources[:first_remote]
        self._rest = self.sources[first_remote:]
        self._pending: dict[str, tuple[float, Found]] = {}  # (when, answer), oldest first
        self._negative: dict[str, float] = {}
        self._lookups: dict[str, _Lookup] = {}
        self._ended: dict[str, tuple[float, _Lookup]] = {}  # unsettled endings owed to retries (ENDING_LINGER)
        self._locks: dict[str, trio.Lock] = {}
        self._background = Background("LookupChain")

    def source(self, name: str) -> NarSource | None:
        return next((s for s in self.sources if s.name == name), None)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Background task (the node's nursery): the nursery remote lookups run in."""
        await self._background.run(task_status=task_status)

    @contextlib.asynccontextmanager
    async def locked(self, key: str) -> AsyncIterator[None]:
        """One holder at a time per `key` (e.g. one NAR fetch per path); the lock is dropped once free."""
        lock = self._locks.setdefault(key, trio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting and self._locks.get(key) is lock:
                del self._locks[key]

    # -- what the chain remembers -----------------------------------------------------------------------
    def pending(self, store_hash: str) -> Found | None:
        entry = self._pending.get(store_hash)
        if entry is None:
            return None
        if time.monotonic() - entry[0] > self.pending_ttl:
            del self._pending[store_hash]
            return None
        return entry[1]

    def _remember_pending(self, store_hash: str, found: Found) -> None:
        self._pending.pop(store_hash, None)
        now = time.monotonic()
        self._pending[store_hash] = (now, found)
        if len(self._pending) > PENDING_ENTRIES:
            self._pending = {k: e for k, e in self._pending.items() if now - e[0] <= self.pending_ttl}
            while len(self._pending) > PENDING_ENTRIES:
                del self._pending[next(iter(self._pending))]

    def pending_count(self) -> int:
        """Answers still waiting for their NAR request (expired ones are dropped here)."""
        now = time.monotonic()
        self._pending = {k: e for k, e in self._pending.items() if now - e[0] <= self.pending_ttl}
        return len(self._pending)

    def forget_pending(self, store_hash: str) -> None:
        self._pending.pop(store_hash, None)

    def looking_up(self, store_hash: str) -> bool:
        """A remote lookup of it is under way."""
        return store_hash in self._lookups

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
    async def find(self, store_hash: str, remember_miss: bool = True, wait: float | None = None) -> Found | None:
        """The first source's answer, or None. A remote lookup is waited for `wait` seconds (default the
        chain's `wait`; `WAIT_FOREVER` for the whole lookup), then `StillLooking` while it goes on. A
        settled miss is remembered for negative_ttl unless every asker passed `remember_miss=False` (a
        look-ahead: its miss is Nix's to find)."""
        for source in self._local:
            found = await source.narinfo(store_hash)
            if found is not None:
                return found
        if not self._rest:
            return None
        if self.known_miss(store_hash):
            self.metrics.negative_hits.inc()
            return None
        pending = self.pending(store_hash)
        if pending is not None:
            return pending
        lookup = self._lookups.get(store_hash)
        if lookup is None:
            ended = self._ended.pop(store_hash, None)
            if ended is not None and time.monotonic() - ended[0] <= ENDING_LINGER:
                lookup = ended[1]  # a retry owed an answer takes how its lookup ended
                lookup.owed -= 1
                if lookup.owed > 0:
                    self._ended[store_hash] = ended
            else:
                lookup = self._start(store_hash, remember_miss)
        else:
            lookup.owed = max(0, lookup.owed - 1)  # (as likely as not) the retry of one of its 503s
            if remember_miss:
                lookup.remember_miss = True
        wait = self.wait if wait is None else wait
        lookup.waiting += 1
        try:
            with trio.move_on_after(wait):
                await lookup.done.wait()
        finally:
            lookup.waiting -= 1
        if not lookup.done.is_set():
            lookup.owed += 1
            self.metrics.still_looking.inc()
            raise StillLooking(f"{store_hash}: still looking for it after {wait:g} s (the lookup goes on "
                               f"for up to {self.patience:g} s); retry")
        if lookup.error is not None:
            raise lookup.error
        return lookup.found

    def _start(self, store_hash: str, remember_miss: bool) -> _Lookup:
        lookup = _Lookup(remember_miss)
        self._background.start_soon(self._look_up, store_hash, lookup)
        self._lookups[store_hash] = lookup
        return lookup

    async def _look_up(self, store_hash: str, lookup: _Lookup) -> None:
        found = None
        settled = False  # until the sources ran to their end
        why = "cancelled"
        try:
            with trio.move_on_after(self.patience) as scope:
                backoff = RETRY_FIRST
                while True:
                    settled, why = True, ""
                    for source in self._rest:
                        try:
                            found = await source.narinfo(store_hash)
                        except LookupFailed as e:
                            settled, why = False, str(e)
                            continue
                        if found is not None:
                            break
                    if found is not None or settled:
                        break
                    # Someone announces it (or an upstream is there) but did not deliver: a transient
                    # failure as often as not (a busy peer, a slow manifest fetch). Ask again while the
                    # patience lasts; the requests meanwhile get 503s, which Nix retries.
                    self.metrics.retries.inc()
                    await trio.sleep(backoff)
                    backoff = min(2 * backoff, RETRY_MAX)
            if scope.cancelled_caught:
                found, settled, why = None, False, f"no answer within {self.patience:g} s (nix.lookup_patience)"
        except P2PCacheError as e:
            lookup.error = e
        except Exception as e:  # a bug must not take the node down with it; the request gets a 502
            log.exception("looking up %s", store_hash)
            lookup.error = SourceFailed(f"looking up {store_hash}: {type(e).__name__}: {e}")
        finally:
            del self._lookups[store_hash]
            lookup.found = found
            if found is not None and found.source.remote:
                self._remember_pending(store_hash, found)
            elif found is None and lookup.error is None:
                if settled:
                    if lookup.remember_miss:
                        self.remember_miss(store_hash)
                else:  # someone had it but failed, lied or was too slow, or a walk did not finish
                    self.metrics.unsettled.inc()
                    log.info("lookup of %s ended unsettled, answered as a miss, not remembered: %s", store_hash, why)
            if found is None and lookup.owed > 0 and not (settled and lookup.error is None):
                now = time.monotonic()
                self._ended = {k: e for k, e in self._ended.items() if now - e[0] <= ENDING_LINGER}
                self._ended[store_hash] = (now, lookup)
            lookup.done.set()
