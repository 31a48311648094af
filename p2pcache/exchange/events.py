"""Events into and actions out of the exchange engines, as frozen dataclasses that compare equal.

Both engines are driven the same way: `actions = engine.handle(event, now)`, where `now` is the
driver's monotonic clock in seconds; the engines read time from nothing else. Peers are opaque
hashable ids chosen by the driver (a libp2p peer id, a simnet node name, a string in tests); sessions
are hashable ids chosen by the caller.

Driver contract for timers: `SetTimer(at)` replaces any earlier timer request of the same engine;
when it is due, call `handle(Tick(), now)`. A Tick when nothing is due is harmless.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

from ..content.cid import CID
from .frozen import fast_init
from .message import Message

PeerId = Hashable
SessionId = Hashable


# -- events shared by both engines ---------------------------------------------------------------


@fast_init
@dataclass(frozen=True, slots=True)
class PeerConnected:
    peer: PeerId


@fast_init
@dataclass(frozen=True, slots=True)
class PeerDisconnected:
    peer: PeerId


@fast_init
@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A message from `peer` that `message.decode` accepted. The driver hands the same message to
    both engines, the server first: the client reads blocks and presences, the server reads the
    wantlist and what the blocks and HAVEs prove the peer holds (it owes that peer no HAVE for them)."""

    peer: PeerId
    message: Message


@fast_init
@dataclass(frozen=True, slots=True)
class PeerMisbehaved:
    """The driver saw `peer` break the protocol (a `ProtocolViolation` while decoding its stream).
    The client stops asking it and re-asks elsewhere; the server forgets its wants."""

    peer: PeerId
    why: str


@fast_init
@dataclass(frozen=True, slots=True)
class Tick:
    """A timer the engine asked for with `SetTimer` is due (the time is `handle`'s `now`)."""


# -- client events -------------------------------------------------------------------------------


@fast_init
@dataclass(frozen=True, slots=True)
class Want:
    """Add `cids` to `session` (opening it if new). Each is fetched once and delivered once."""

    session: SessionId
    cids: tuple[CID, ...]


@fast_init
@dataclass(frozen=True, slots=True)
class AddProviders:
    """Peers that routing says have the session's content; asked in addition to connected peers.
    The driver dials them when the engine first sends to them."""

    session: SessionId
    peers: tuple[PeerId, ...]


@fast_init
@dataclass(frozen=True, slots=True)
class CloseSession:
    """The caller no longer wants anything of `session`; its outstanding wants are cancelled."""

    session: SessionId


# -- server events -------------------------------------------------------------------------------


@fast_init
@dataclass(frozen=True, slots=True)
class MessageSent:
    """The driver finished writing a message of `size` bytes (the `Send.size` it was given) to
    `peer`. The server keeps at most `max_outstanding_bytes` unacknowledged per peer, so a driver
    that never reports this stalls that peer after its first batch."""

    peer: PeerId
    size: int


@fast_init
@dataclass(frozen=True, slots=True)
class BlocksAdded:
    """These blocks are now in the local store; peers still waiting for them get them."""

    cids: tuple[CID, ...]


# -- actions -------------------------------------------------------------------------------------


@fast_init
@dataclass(frozen=True, slots=True)
class Send:
    """Write `message` to `peer` (dialling it if needed). `size`, when not 0, is the encoded size of a
    server message carrying blocks, to be echoed back in `MessageSent` once written; the client and
    presence-only server messages leave it 0."""

    peer: PeerId
    message: Message
    size: int = 0


@fast_init
@dataclass(frozen=True, slots=True)
class Deliver:
    """A block `session` wanted, already verified against `cid`."""

    session: SessionId
    cid: CID
    data: bytes = field(repr=False)


@fast_init
@dataclass(frozen=True, slots=True)
class FetchFailed:
    session: SessionId
    cid: CID
    why: str


@fast_init
@dataclass(frozen=True, slots=True)
class SetTimer:
    at: float


@fast_init
@dataclass(frozen=True, slots=True)
class PenalisePeer:
    """`peer` sent data that fails verification or was never asked for. The engine has already
    stopped using it; whether to disconnect, ban or report it is the driver's policy."""

    peer: PeerId
    why: str


Event = (
    PeerConnected | PeerDisconnected | MessageReceived | PeerMisbehaved | Tick | Want | AddProviders
    | CloseSession | MessageSent | BlocksAdded
)
Action = Send | Deliver | FetchFailed | SetTimer | PenalisePeer
