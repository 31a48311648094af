"""Batched announcing: one DHT walk per region of the key space, not one per key.

Owns the pure part of a provide sweep, as kubo's sweeping provider does it: keys sorted by their place in
the key space (sha256 of the key, the metric of `query.distance`), cut into regions (keys that share a
prefix of their position), and, once a walk has found the peers around a region, the choice of the `k`
peers each key of the region goes to (the `k` closest of those peers to that key). `BatchedProvide`
(the trio part, in `announcer.py`) walks once per region and sends every peer the ADD_PROVIDERs of all
its keys on one stream. Nothing here awaits or touches the network.

Why a region is as wide as it is. A walk towards a key `t` returns the `k` closest peers to `t`; call
`D` the distance of the k-th. For a key `x` with `d(x, t) < 2**m`, XOR distances to any peer agree
with those from `t` in every bit above `m`, so the peers closest to `x` are the ones closest to `t`
reordered only within `2**m` of each other. With `2**m` a small fraction of `D` (`width_shift`: at
most 1/4) and a walk that returns half as many peers again as a record needs, the `k` closest to `x`
are almost always among the peers the walk found: the region is the keys that share `t`'s position
above bit `m`. `m` comes from the walk itself, so a dense part of the network
gets narrow regions and a sparse one wide regions; a region found too wide for its own walk is split
and its parts walked again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterable, Sequence
from typing import Callable, TypeVar

__all__ = ["assign_peers", "key_position", "region_bits", "split_regions"]

P = TypeVar("P", bound=Hashable)


def key_position(key: bytes) -> int:
    """Where `key` sits in the Kademlia key space (sha256, as the DHT and `ProviderQuery` place it)."""
    return int.from_bytes(hashlib.sha256(key).digest(), "big")


def region_bits(kth_distance: int, width_shift: int = 2) -> int:
    """The `m` of a region around a walk whose k-th closest peer is `kth_distance` away: keys within
    `2**m` of the walk's target, `2**m` at most `kth_distance / 2**width_shift`."""
    return max(0, kth_distance.bit_length() - 1 - width_shift)


def split_regions(positions: Sequence[tuple[int, bytes]], bits: int) -> list[list[tuple[int, bytes]]]:
    """`positions` (sorted by position) cut into runs that share their position above bit `bits`."""
    out: list[list[tuple[int, bytes]]] = []
    last = None
    for item in positions:
        prefix = item[0] >> bits
        if prefix != last:
            out.append([])
            last = prefix
        out[-1].append(item)
    return out


def assign_peers(keys: Iterable[tuple[int, bytes]], peers: Sequence[P], peer_position: Callable[[P], int],
                 k: int) -> dict[P, list[bytes]]:
    """For each key, the `k` peers of `peers` closest to it; returned per peer (the keys it gets, in
    key order), so each peer can be sent all of its keys at once."""
    placed = [(peer_position(p), p) for p in peers]
    out: dict[P, list[bytes]] = {}
    for pos, key in keys:
        for _, peer in sorted(placed, key=lambda e: e[0] ^ pos)[:k]:
            out.setdefault(peer, []).append(key)
    return out
