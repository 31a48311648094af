"""Routing: who holds which store hash, and what they hold under it.

A node composes the pieces like this (all trio services take `task_status`):

    host = NodeHost(config)                          # p2pcache.net.host
    dht = DHT(host)                                  # Kademlia under /p2pcache/kad/1.0.0, server mode;
                                                     # build it before the host dials anyone
    await nursery.start(host.run)
    await nursery.start(dht.run)                     # bootstrapped from the host's connected peers
    announcer = ProviderAnnouncer(dht)
    for root in repo roots: announcer.add(root.cid, root.aliases)   # CID + sha256:/sha512:/nix: aliases
    await nursery.start(announcer.run)               # first sweep done; re-sweeps every interval
    finder = ProviderFinder(dht)
    ResolveServer(lookup=node.resolve_alias).register(host)         # answers /p2pcache/resolve/1.0.0

    providers = await finder.find_providers("sha256:<hex>", timeout=5)   # [] on a miss, never raises
    answer = await resolve(host, providers[0].peer_id, "sha256:<hex>")   # ResolveAnswer | None
    ... fetch answer.root with the exchange, which verifies every block against it ...
    announcer.withdraw(root.cid)                     # on GC

Modules: `keys` (the DHT key of each alias kind, pure), `query` (one lookup as a sans-IO state machine),
`race` (asking the providers a lookup found, happy eyeballs under one deadline, sans-IO, and its driver),
`dht` (py-libp2p KadDHT under our protocol id), `announcer`, `finder`, `resolve_wire` (resolve messages,
sans-IO) and `resolve` (its trio driver).
"""

from .announcer import Announcements, AnnouncerConfig, AnnouncerStats, ProviderAnnouncer
from .dht import DHT, KAD_PROTOCOL, DHTConfig, DHTStats, ProviderAnswer
from .errors import LookupCut, ResolveProtocolError, ResolveUnavailable, RoutingUsageError
from .finder import FinderConfig, FinderStats, LookupResult, ProviderFinder
from .keys import NIX_ALIAS_PREFIX, NIX_NAMESPACE, dht_key, nix_alias
from .query import ProviderQuery, QueryStats
from .race import AskState, NotHeld, ProviderStanding, RaceOutcome, RaceStats, ResolveRace, race_providers
from .resolve import ResolveServer, ResolveServerStats, resolve
from .resolve_wire import PROTOCOL as RESOLVE_PROTOCOL
from .resolve_wire import NarInfoFields, ResolveAnswer

__all__ = [
    "AskState", "NotHeld", "ProviderStanding", "RaceOutcome", "RaceStats", "ResolveRace", "race_providers",
    "Announcements", "AnnouncerConfig", "AnnouncerStats", "DHT", "DHTConfig", "DHTStats", "FinderConfig", "FinderStats",
    "KAD_PROTOCOL", "LookupCut", "LookupResult", "NIX_ALIAS_PREFIX", "NIX_NAMESPACE", "NarInfoFields", "ProviderAnnouncer",
    "ProviderAnswer", "ProviderFinder", "ProviderQuery", "QueryStats", "RESOLVE_PROTOCOL", "ResolveAnswer",
    "ResolveProtocolError", "ResolveServer", "ResolveServerStats", "ResolveUnavailable", "RoutingUsageError",
    "dht_key", "nix_alias", "resolve",
]
