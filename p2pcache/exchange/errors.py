"""Errors of the block exchange: a peer's misbehaviour is one type, our own misuse another."""

from __future__ import annotations

from ..errors import InvalidInput, P2PCacheError


class ProtocolViolation(InvalidInput):
    """A peer sent something bitswap does not allow: malformed, oversized, or a block that does not
    hash to what it claims. The message is one line naming what was wrong; the caller decides what
    to do with the peer (the engines never disconnect anyone themselves)."""


class ExchangeUsageError(P2PCacheError, ValueError):
    """This process asked the exchange for something it cannot do (a message over the size limit,
    a block over the block limit, an unknown session). A bug in the caller, not a peer's fault."""
