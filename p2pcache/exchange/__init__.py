"""Block exchange, wire-compatible with IPFS bitswap 1.2.0, as two sans-IO engines.

`BitswapClient` fetches blocks for sessions, `BitswapServer` answers other peers' wants from a
`BlockSource`. Both are driven by `handle(event, now) -> list[action]` with the events and actions in
`events`; a driver (in `p2pcache.net`, or simnet) moves `message.encode_framed` bytes over streams
speaking `PROTOCOLS`, and feeds `message.decode`d messages back. Nothing here awaits, sleeps or
opens a socket.
"""

from .client import BitswapClient, ClientConfig, ClientStats, PeerStats
from .errors import ExchangeUsageError, ProtocolViolation
from .events import (
    AddProviders,
    BlocksAdded,
    CloseSession,
    Deliver,
    FetchFailed,
    MessageReceived,
    MessageSent,
    PeerConnected,
    PeerDisconnected,
    PeerMisbehaved,
    PenalisePeer,
    Send,
    SetTimer,
    Tick,
    Want,
)
from .message import (
    MAX_BLOCK_SIZE,
    MAX_MESSAGE_SIZE,
    PROTOCOL_1_2_0,
    PROTOCOLS,
    Block,
    FrameDecoder,
    Message,
    Presence,
    WantEntry,
    WantType,
    decode,
    encode,
    encode_framed,
    frame,
)
from .server import BitswapServer, BlockSource, Ledger, ServerConfig, ServerStats

__all__ = [
    "AddProviders", "BitswapClient", "BitswapServer", "Block", "BlockSource", "BlocksAdded", "ClientConfig",
    "ClientStats", "CloseSession", "Deliver", "ExchangeUsageError", "FetchFailed", "FrameDecoder", "Ledger",
    "MAX_BLOCK_SIZE", "MAX_MESSAGE_SIZE", "Message", "MessageReceived", "MessageSent", "PROTOCOLS",
    "PROTOCOL_1_2_0", "PeerConnected", "PeerDisconnected", "PeerMisbehaved", "PeerStats", "PenalisePeer",
    "Presence", "ProtocolViolation", "Send", "ServerConfig", "ServerStats", "SetTimer", "Tick", "Want", "WantEntry", "WantType",
    "decode", "encode", "encode_framed", "frame",
]
