"""The provider-routing seam: what the announcer, the finder and the node need of a DHT.

Owns `ProviderRouting`, the `typing.Protocol` that `dht.DHT` (py-libp2p's KadDHT) and simnet's `SimDHT`
(Kademlia over simulated links) both satisfy, and the two records that cross it, `ProviderAnswer` and
`DHTStats`. `ProviderAnnouncer`, `ProviderFinder` and `Node` are written against the Protocol, so a type
checker proves either DHT plugs in. It must not hold an implementation: the Kademlia wire helpers both
DHTs share live in `dht` (`parse_peer_entry`, `provider_answer`, `closest_known`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

if TYPE_CHECKING:
    # `trio.TaskStatus` at run time; libp2p pulls in trio-typing, whose stubs shadow trio's for mypy.
    from trio_typing import TaskStatus

__all__ = ["DHTStats", "ProviderAnswer", "ProviderRouting"]


@dataclass(frozen=True)
class ProviderAnswer:
    """One GET_PROVIDERS answer: the providers a peer knows for a key, and peers it says are closer."""

    providers: tuple[PeerInfo, ...]
    closer: tuple[ID, ...]


@dataclass
class DHTStats:
    bootstraps: int = 0
    provides: int = 0
    provide_failures: int = 0
    rpcs: int = 0
    rpc_failures: int = 0
    add_providers: int = 0  # ADD_PROVIDER messages a peer took (a provide's and a sweep's)


class ProviderRouting(Protocol):
    """Provider records in a Kademlia DHT. `await nursery.start(dht.run)` returns once the routing table
    holds the peers known at once (the connected ones; the walk that finds more may go on after); the rest
    may be called after that."""

    @property
    def peer_id(self) -> ID: ...

    @property
    def k(self) -> int: ...  # the closest peers a record goes to

    @property
    def stats(self) -> DHTStats: ...

    async def run(self, *, task_status: TaskStatus[Any] = ...) -> None: ...

    async def provide_key(self, key: bytes) -> bool: ...

    def withdraw_key(self, key: bytes) -> None: ...

    async def closest_peers(self, key: bytes, count: int = 20) -> list[ID]: ...

    def record_providing(self, keys: Sequence[bytes]) -> None: ...

    async def add_providers(self, peer: ID, keys: Sequence[bytes]) -> None: ...

    def local_providers(self, key: bytes) -> list[PeerInfo]: ...

    def closest_known_peers(self, key: bytes, count: int = 20) -> list[ID]: ...

    async def ask_providers(self, peer: ID, key: bytes) -> ProviderAnswer: ...
