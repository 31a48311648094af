"""Announcing the store hashes this node holds: one provider record per alias of each root.

Owns the set of roots the node announces and the DHT keys of their aliases (`Announcements`, pure), and
the trio service that keeps them announced (`ProviderAnnouncer`): a newly added root is announced at once;
every `interval` seconds all keys are re-announced as one sweep with at most `concurrency` provides in
flight; `withdraw(root)` (on GC) stops re-announcing the keys no other root still needs and removes our
own record from the local provider store. Records already stored at other peers cannot be recalled: they
expire by their TTL (48 h in py-libp2p, the same as go-libp2p), which is why the sweep interval must stay
well below that TTL.

Only roots are announced, never blocks: which blocks a root needs is the exchange's business once a
provider is found.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import trio

from ..content.cid import CID
from .dht import DHT
from .keys import dht_key

__all__ = ["AnnouncerConfig", "AnnouncerStats", "Announcements", "ProviderAnnouncer"]


class Announcements:
    """Which roots we announce and which DHT keys that takes. A key shared by several roots (two archives
    cannot share a hash, but a NAR and an archive of the same bytes can) stays until the last one goes."""

    def __init__(self) -> None:
        self._keys_of: dict[CID, frozenset[bytes]] = {}
        self._roots_of: dict[bytes, set[CID]] = {}

    def add(self, root: CID, aliases: Iterable[str]) -> frozenset[bytes]:
        """Record `root` (its CID is always one of its aliases); return the keys that are new."""
        keys = frozenset({dht_key(str(root))} | {dht_key(a) for a in aliases})
        old = self._keys_of.get(root, frozenset())
        self._keys_of[root] = keys | old
        new = set()
        for k in keys - old:
            holders = self._roots_of.setdefault(k, set())
            if not holders:
                new.add(k)
            holders.add(root)
        return frozenset(new)

    def remove(self, root: CID) -> frozenset[bytes]:
        """Forget `root`; return the keys no remaining root needs."""
        gone = set()
        for k in self._keys_of.pop(root, frozenset()):
            holders = self._roots_of[k]
            holders.discard(root)
            if not holders:
                del self._roots_of[k]
                gone.add(k)
        return frozenset(gone)

    def keys(self) -> list[bytes]:
        return list(self._roots_of)

    def roots(self) -> list[CID]:
        return list(self._keys_of)

    def __contains__(self, key: bytes) -> bool:
        return key in self._roots_of


@dataclass(frozen=True)
class AnnouncerConfig:
    interval: float = 12 * 3600.0  # seconds between re-announce sweeps; keep well under the 48 h record TTL
    concurrency: int = 8  # provides in flight at once during a sweep
    provide_timeout: float = 30.0  # one provide (lookup + ADD_PROVIDERs) gives up after this long


@dataclass
class AnnouncerStats:
    sweeps: int = 0
    provided: int = 0  # provides that reached at least one peer
    failed: int = 0  # provides that reached nobody or timed out
    withdrawn: int = 0
    last_sweep_keys: int = 0
    last_sweep_seconds: float = 0.0


class ProviderAnnouncer:
    """`await nursery.start(announcer.run)` returns once the first sweep is done; `add` and `withdraw`
    may be called any time before or after."""

    def __init__(self, dht: DHT, config: AnnouncerConfig = AnnouncerConfig()):
        self.dht = dht
        self.config = config
        self.stats = AnnouncerStats()
        self.announcements = Announcements()
        self._pending: set[bytes] = set()
        self._wake = trio.Event()

    def add(self, root: CID, aliases: Iterable[str] = ()) -> None:
        """Announce `root` under its CID and `aliases` (e.g. `sha256:<hex>`, `sha512:<hex>`,
        `nix:<hash>`); the running service sends the new keys promptly."""
        self._pending |= self.announcements.add(root, aliases)
        self._wake.set()

    def withdraw(self, root: CID) -> None:
        """Stop announcing `root` (it was garbage-collected). Its keys leave the sweep and our own record
        leaves the local provider store at once; copies at other peers expire by their TTL."""
        for key in self.announcements.remove(root):
            self._pending.discard(key)
            self.dht.withdraw_key(key)
            self.stats.withdrawn += 1

    async def sweep(self) -> int:
        """Re-announce every announced key, at most `concurrency` at a time; return how many reached at
        least one peer."""
        self._pending.clear()
        keys = self.announcements.keys()
        start = trio.current_time()
        ok = await self._provide(keys)
        self.stats.sweeps += 1
        self.stats.last_sweep_keys = len(keys)
        self.stats.last_sweep_seconds = trio.current_time() - start
        return ok

    async def _provide(self, keys: Iterable[bytes]) -> int:
        ok = 0
        limiter = trio.CapacityLimiter(self.config.concurrency)

        async def one(key: bytes) -> None:
            nonlocal ok
            async with limiter:
                if key not in self.announcements:  # withdrawn before its turn
                    return
                reached = False
                with trio.move_on_after(self.config.provide_timeout):
                    try:
                        reached = await self.dht.provide_key(key)
                    except Exception:
                        reached = False
                if key not in self.announcements:  # withdrawn during the provide: undo the local record
                    self.dht.withdraw_key(key)
                    return
                if reached:
                    ok += 1
                    self.stats.provided += 1
                else:
                    self.stats.failed += 1

        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(one, key)
        return ok

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.sweep()
        task_status.started()
        next_sweep = trio.current_time() + self.config.interval
        while True:
            with trio.move_on_at(next_sweep):
                await self._wake.wait()
            self._wake = trio.Event()
            if trio.current_time() >= next_sweep:
                await self.sweep()
                next_sweep = trio.current_time() + self.config.interval
            elif self._pending:
                batch, self._pending = self._pending, set()
                await self._provide(batch)

    @property
    def pending(self) -> int:
        return len(self._pending)

