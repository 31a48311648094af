"""Errors of routing: a peer's misbehaviour is one type, a peer we could not get an answer from another."""

from __future__ import annotations

from ..errors import InvalidInput, P2PCacheError


class ResolveProtocolError(InvalidInput):
    """A peer broke the resolve protocol: a frame over the size limit, bytes that do not decode, or an
    answer that is not well-formed (unknown kind, a root that is not a CID, too many references...).
    The message is one line naming what was wrong; the driver resets the stream, the caller decides
    what to do with the peer."""


class ResolveUnavailable(P2PCacheError):
    """A peer could not be asked: no connection, the protocol is not supported, the stream broke, or it
    did not answer before the deadline. Not a protocol violation; try another peer."""


class RoutingUsageError(P2PCacheError, ValueError):
    """This process asked routing for something it cannot do (encode an answer over the limits, an
    unknown kind). A bug in the caller, not a peer's fault."""


class LookupCut(P2PCacheError):
    """A provider lookup ended before it could say that nobody has the key: cut by its timeout, or no
    peer of the DHT answered. Not a miss: a caller must not remember it as one."""
