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

A sweep (and any batch of at least `batch_min` new keys) is batched: one DHT walk per region of the key
space instead of one per key, and every peer gets the ADD_PROVIDERs of all its keys of a region on one
stream (`sweep.py` plans the regions and picks each key's peers). Walking per key costs about 0.3 s of
lookups each, so 10,000 keys took some 50 minutes per sweep; a region holds hundreds of keys. A few
new keys still go one `provide_key` each, which also walks for exactly their closest peers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ..content.cid import CID
from .interfaces import ProviderRouting
from .keys import dht_key
from .sweep import assign_peers, key_position, region_bits, split_regions

if TYPE_CHECKING:
    # `trio.TaskStatus` at run time; libp2p and multiaddr pull in trio-typing, whose trio-stubs shadow trio's own
    # types for mypy and export TaskStatus only from trio_typing.
    from libp2p.peer.id import ID
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

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
    batched: bool = True  # sweeps walk once per key-space region (see the module docstring)
    batch_min: int = 32  # new keys announced together batched from this many on


@dataclass
class AnnouncerStats:
    sweeps: int = 0
    provided: int = 0  # provides that reached at least one peer
    failed: int = 0  # provides that reached nobody or timed out
    withdrawn: int = 0
    last_sweep_keys: int = 0
    last_sweep_seconds: float = 0.0
    # the batched sweep under way (or the last one): keys whose ADD_PROVIDERs went out, of how many
    sweep_running: bool = False
    sweep_keys_done: int = 0
    sweep_keys_total: int = 0
    sweep_walks: int = 0  # DHT walks it took (one per region)
    sweep_add_providers: int = 0  # ADD_PROVIDER messages sent


class ProviderAnnouncer:
    """`await nursery.start(announcer.run)` returns once the first sweep is done; `add` and `withdraw`
    may be called any time before or after."""

    def __init__(self, dht: ProviderRouting, config: AnnouncerConfig = AnnouncerConfig()):
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
        ok = await (self._provide_batched(keys) if self.config.batched else self._provide(keys))
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
                    except Exception as e:  # counted as failed below; retried at the next sweep
                        log.debug("providing %s failed: %s", key, e)
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

    async def _provide_batched(self, keys: list[bytes]) -> int:
        """Announce `keys` one key-space region at a time: a walk towards a key in the middle of a
        region finds the peers around it, each key goes to the `k` of them closest to it, and each
        peer gets all its keys on one stream. A region too wide for what its walk found is split and
        its parts walked again. Returns how many keys reached at least one peer."""
        dht, cfg, stats = self.dht, self.config, self.stats
        k = getattr(dht, "k", 20)
        stats.sweep_running = True
        stats.sweep_keys_done = stats.sweep_walks = stats.sweep_add_providers = 0
        stats.sweep_keys_total = len(keys)
        dht.record_providing(keys)  # we answer for them ourselves at once, as provide_key does
        reached: set[bytes] = set()
        walks = trio.CapacityLimiter(cfg.concurrency)
        sends = trio.CapacityLimiter(cfg.concurrency)

        async def send(peer: ID, batch: list[bytes]) -> None:
            async with sends:
                batch = [key for key in batch if key in self.announcements]  # withdrawn meanwhile
                if not batch:
                    return
                with trio.move_on_after(cfg.provide_timeout):
                    try:
                        await dht.add_providers(peer, batch)
                    except Exception as e:  # that peer's keys count as not reached
                        log.debug("ADD_PROVIDER of %d keys to %s failed: %s", len(batch), peer, e)
                        return
                    reached.update(batch)
                    stats.sweep_add_providers += len(batch)

        async def region(items: list[tuple[int, bytes]], nursery: trio.Nursery) -> None:
            target_pos, target = items[len(items) // 2]
            peers: list[ID] = []
            async with walks:
                with trio.move_on_after(cfg.provide_timeout):
                    try:
                        # half as many again as a record needs: a key at the region's edge has
                        # closest peers the walk's target does not
                        peers = await dht.closest_peers(target, k + k // 2)
                    except Exception as e:  # the region reaches nobody: counted as failed below
                        log.debug("sweep walk for a region of %d keys failed: %s", len(items), e)
                        peers = []
                stats.sweep_walks += 1
            if not peers:
                stats.sweep_keys_done += len(items)  # reached nobody: counted as failed below
                return
            kth = max(position(p) ^ target_pos for p in peers[:k])
            bits = region_bits(kth)
            for part in split_regions(items, bits):
                if part[0][0] >> bits == target_pos >> bits:  # the walk's own neighbourhood
                    for peer, batch in assign_peers(part, peers, position, k).items():
                        nursery.start_soon(send, peer, batch)
                    stats.sweep_keys_done += len(part)
                else:
                    nursery.start_soon(region, part, nursery)

        positions: dict[object, int] = {}

        def position(peer: object) -> int:
            pos = positions.get(peer)
            if pos is None:
                pos = positions[peer] = key_position(peer.to_bytes())  # type: ignore[attr-defined]
            return pos

        items = sorted((key_position(key), key) for key in keys if key in self.announcements)
        try:
            if items:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(region, items, nursery)
        finally:
            stats.sweep_running = False
        gone = [key for key in keys if key not in self.announcements]
        for key in gone:  # withdrawn during the sweep: undo the local record
            self.dht.withdraw_key(key)
        ok = sum(1 for key in keys if key in reached)
        stats.provided += ok
        stats.failed += len(keys) - len(gone) - ok
        return ok

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
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
                if self.config.batched and len(batch) >= self.config.batch_min:
                    await self._provide_batched(list(batch))
                else:
                    await self._provide(batch)

    @property
    def pending(self) -> int:
        return len(self._pending)

