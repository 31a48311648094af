"""What the Nix binary cache refuses, by meaning. `http/nix.py` turns each into its status code; the
messages are the one-line answers a Nix user (or `nix copy`) sees.

Only these are answers the cache chose to give. Any other `P2PCacheError` escaping a service call is
reported by the HTTP layer the way the REST API reports it (by its exit code).
"""

from __future__ import annotations

from ..errors import P2PCacheError

__all__ = ["Busy", "Conflict", "Missing", "NoRoom", "Refusal", "Rejected", "SourceFailed", "StillLooking", "TooLarge"]


class Refusal(P2PCacheError):
    """Base: an answer the Nix cache gives on purpose instead of what was asked for."""


class Missing(Refusal):
    """Nobody (that answered) has it, or what is held no longer matches the request (404)."""


class Rejected(Refusal):
    """An upload or a request that does not check out: bad file name, narinfo, hashes (400)."""


class Conflict(Refusal):
    """A store path is held with other contents; its contents are never replaced (409)."""


class TooLarge(Refusal):
    """An upload over `nix.max_upload_size` (413)."""


class NoRoom(Refusal):
    """No room: the disk, the node's quota, or `nix.upload_quota` for uploads waiting for their narinfo (507)."""


class SourceFailed(Refusal):
    """A source that had it failed to deliver: an upstream cache, a lookup that broke (502)."""


class Busy(Refusal):
    """Too many streams or uploads in progress; retry in a few seconds (503)."""


class StillLooking(Refusal):
    """A remote lookup did not finish within the request's wait (`nix.lookup_wait`) and goes on in the
    background (503). Nix 2.8 retries a 5xx narinfo or NAR request (download-attempts, backing off from
    250 ms) and caches nothing, where a 404 would be remembered as "not valid" for an hour
    (narinfo-cache-negative-ttl): the retry finds the answer waiting."""
