"""The Nix binary cache service: what a node offers Nix, with no HTTP in it (http/nix.py routes to it).

    NixBinaryCache   narinfo lookups, NAR delivery, uploads, the hashed mirror (service.py)
    LookupChain      the ordered list of sources a narinfo is looked for in (`nix.lookup_order`)
    NarSource        the one read protocol every source implements; NarWriter the repo's write protocol
                     on top; NarSink where a NAR's bytes go (sources.py)
    Refusal and its kinds: what the cache answers instead (errors.py); http/ maps them to status codes
"""

from .chain import LookupChain
from .errors import Busy, Conflict, Missing, NoRoom, Refusal, Rejected, SourceFailed, StillLooking, TooLarge
from .metrics import Metrics
from .service import NixBinaryCache, build_sources
from .sources import (GATEWAY_MARKER, MAX_STREAMS, MAX_UPLOADS, Found, LookupFailed, NarSink, NarSource,
                      NarStreams, NarWriter, NixStoreSource, RepoSource, Room, Swarm, SwarmSource, UpstreamSource)

__all__ = ["GATEWAY_MARKER", "MAX_STREAMS", "MAX_UPLOADS", "Busy", "Conflict", "Found", "LookupChain",
           "LookupFailed", "Metrics", "Missing", "NarSink", "NarSource", "NarStreams", "NarWriter", "NixBinaryCache",
           "NixStoreSource", "NoRoom", "Refusal", "Rejected", "RepoSource", "Room", "SourceFailed", "StillLooking", "Swarm",
           "SwarmSource", "TooLarge", "UpstreamSource", "build_sources"]
