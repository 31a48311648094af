"""The libp2p host of a p2pcache node: identity, transports, private network, allowlist, bootstrap.

Owns: building a py-libp2p host that speaks TCP + Noise + Yamux and nothing else (no plaintext, no
mplex), with an ed25519 identity kept in a file (so the peer ID survives restarts), optionally inside
a private network (a kubo `swarm.key`, see `pnet`), optionally refusing every peer not on an
allowlist, and keeping connections to bootstrap peers up with exponential backoff. It hands out
streams and peer up/down events to the protocol drivers above it (bitswap, routing). Under every
stream runs our own data path (`wire`: Noise transport messages and Yamux after py-libp2p's Noise
handshake), or py-libp2p's own with `HostConfig.stock_data_path`.

It must not know any protocol beyond libp2p's own: drivers register their stream handlers here and
open their streams through `new_stream`.

    config = HostConfig(identity=Path("identity.key"), listen=("/ip4/0.0.0.0/tcp/4001",))
    async with open_host(config) as host:      # listening when the block starts
        print(host.peer_id, host.addrs())
        ...
or, in a nursery the caller owns: `host = NodeHost(config); await nursery.start(host.run)`.
"""

from __future__ import annotations

import contextvars
import logging
import math
import os
import random
import socket
import time
import weakref
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Iterable, Iterator, NoReturn, Sequence, cast

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer import muxer_multistream as _muxer_multistream
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.exceptions import ParseError
from libp2p.io.exceptions import ConnectionClosedError, IOException
from libp2p.utils.varint import encode_delim, read_delim
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.tcp.tcp import TCP

if TYPE_CHECKING:
    from libp2p.abc import INotifee
    from libp2p.network.swarm import Swarm

from ..errors import InvalidInput, InvalidKey, P2PCacheError
from .peers import PeerEvent, PeerEvents, StreamHandler, close_quietly, keep_connected, reset_quietly
from .pnet import KEY_SIZE, PskStream, ReadAheadStream, read_swarm_key, write_swarm_key
from .wire import FRAME_WRITE_TIMEOUT, FramedNoiseTransport, NoiseSession, YamuxConnection

log = logging.getLogger(__name__)
MULTISTREAM = "/multistream/1.0.0"

__all__ = [
    "HostConfig", "HostError", "NodeHost", "PeerEvent", "open_host", "load_identity", "new_swarm_key_file",
    "patient_dials",
    "parse_peer_addr", "resolve_addr", "select_protocol", "ProposedStream",
]


def _fit_yamux_frames_to_noise() -> None:
    """Yamux data frames that fit one Noise message. py-libp2p's yamux writes frames of up to 64 KiB
    of payload plus a 12-byte header, which its Noise layer (at most 65,519 plaintext bytes a message)
    splits into a full message and a 29-byte one: two encryptions, two sends and two reads for every
    frame. Capping the frame at one message's plaintext halves that; any yamux peer takes shorter
    frames. Measured (loaded, 64 MiB over one stream through this host): CPU per stream 0.27 -> 0.20 s
    reading, 0.25 -> 0.20 s writing."""
    from libp2p.security.noise import io as noise_io
    from libp2p.stream_muxer.yamux import yamux

    yamux.MAX_MESSAGE_SIZE = min(yamux.MAX_MESSAGE_SIZE, noise_io.MAX_PLAINTEXT_LENGTH)


_fit_yamux_frames_to_noise()


class HostError(P2PCacheError):
    """The host could not start (bad listen address, port in use, unreadable identity)."""


# -- identity -------------------------------------------------------------------------------------


def load_identity(path: Path | str, create: bool = True) -> KeyPair:
    """The ed25519 key pair in `path` (libp2p's protobuf PrivateKey encoding, as kubo keeps it),
    created with mode 0600 if missing. The peer ID is derived from it, so it is stable."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if not create:
            raise InvalidKey(f"no node identity at {path}; start the node once to create it") from None
        pair = create_new_key_pair()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, pair.private_key.serialize())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # no clobbering: a concurrent creator wins and we read its key
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        return load_identity(path, create=False)
    except OSError as e:
        raise InvalidKey(f"cannot read node identity {path}: {e.strerror}") from None
    try:
        private = deserialize_private_key(data)
    except Exception:
        raise InvalidKey(f"{path} is not a libp2p private key; move it away to create a new identity") from None
    if path.stat().st_mode & 0o077:
        log.warning("node identity %s is readable by others; chmod 600 it", path)
    return KeyPair(private, private.get_public_key())


def new_swarm_key_file(path: Path | str, overwrite: bool = False) -> bytes:
    """Create a kubo-format swarm.key with a fresh random key (mode 0600). For `p2pcache swarm-key new`."""
    return write_swarm_key(path, overwrite=overwrite)


def parse_peer_addr(addr: str | multiaddr.Multiaddr) -> PeerInfo:
    """A dialable peer from a multiaddr ending in /p2p/<peer id>."""
    try:
        return info_from_p2p_addr(multiaddr.Multiaddr(str(addr)))
    except Exception as e:
        raise InvalidInput(f"{addr} is not a peer address (/ip4/…/tcp/…/p2p/<peer id>): {e}") from None


_DNS_FAMILIES = {"dns4": socket.AF_INET, "dns6": socket.AF_INET6, "dns": socket.AF_UNSPEC}


async def resolve_addr(addr: multiaddr.Multiaddr) -> list[multiaddr.Multiaddr]:
    """`addr` with a leading /dns4, /dns6 or /dns name replaced by each address the system resolver
    (getaddrinfo: /etc/hosts, then DNS) gives for it, in its order; other addresses unchanged. A name
    is looked up on every call, so a peer that moved is found at its new address on the next dial.
    Raises `HostError` (one line) if the name does not resolve."""
    parts = str(addr).split("/")  # ['', 'dns4', name, 'tcp', port, ...]
    if len(parts) < 3 or parts[1] not in _DNS_FAMILIES:
        return [addr]
    name, rest = parts[2], "/".join(parts[3:])
    try:
        infos = await trio.socket.getaddrinfo(name, None, _DNS_FAMILIES[parts[1]], socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise HostError(f"cannot resolve {name!r} in {addr}: {e.strerror}; check the name "
                        f"(it is looked up again on the next try)") from None
    out: list[multiaddr.Multiaddr] = []
    for family, _, _, _, sockaddr in infos:
        proto = "ip4" if family == socket.AF_INET else "ip6" if family == socket.AF_INET6 else None
        m = proto and multiaddr.Multiaddr(f"/{proto}/{sockaddr[0]}/{rest}")
        if m and m not in out:
            out.append(m)
    if not out:
        raise HostError(f"cannot resolve {name!r} in {addr}: no IPv4/IPv6 address for it")
    return out


def _peer_id(text: str | ID) -> ID:
    if isinstance(text, ID):
        return text
    try:
        peer = ID.from_base58(text)
    except Exception:
        peer = None
    # Most short words are valid base58: a peer ID must also be a multihash (identity or sha2-256)
    # of exactly its stated length.
    raw = peer.to_bytes() if peer is not None else b""
    if len(raw) < 3 or raw[0] not in (0x00, 0x12) or raw[1] != len(raw) - 2 or (raw[0] == 0x12 and raw[1] != 32):
        raise InvalidInput(f"{text!r} is not a peer ID (12D3KooW… or Qm…, as `p2pcache status` prints it)")
    assert peer is not None  # raw is non-empty only when it parsed
    return peer


# -- config ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostConfig:
    identity: Path  # ed25519 key file, created (0600) if missing
    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/4001",)
    swarm_key: bytes | None = None  # 32-byte PSK: only peers with the same key can connect
    allow_peers: frozenset[str] | None = None  # peer IDs (base58) allowed to connect; None: everyone
    bootstrap: tuple[str, ...] = ()  # /ip4/…/tcp/…/p2p/<id> addresses kept connected
    backoff_initial: float = 1.0  # seconds before the first redial of a bootstrap peer
    backoff_max: float = 60.0
    # A peer outside our private network sends noise, which some handshakes wait on rather than
    # reject: this bounds how long such a connection (or any slow dial) is kept.
    handshake_timeout: float = 10.0
    # Warn once if bootstrap peers are configured and no peer has completed a handshake this many
    # seconds after start (0: never) — the usual sign of a different swarm key.
    alone_warning: float = 0.0
    mdns: bool = False  # advertise and find nodes of this swarm on the LAN (see `lan`); dials still gated
    # py-libp2p's own Noise transport messages and Yamux under every stream instead of ours (`wire`): the
    # baseline of benches ("one raw py-libp2p stream"). Either speaks to the other.
    stock_data_path: bool = False

    def __post_init__(self) -> None:
        if self.swarm_key is not None and len(self.swarm_key) != KEY_SIZE:
            raise InvalidKey(f"a swarm key is {KEY_SIZE} bytes, got {len(self.swarm_key)}")
        for addr in self.listen:
            try:
                multiaddr.Multiaddr(addr)
            except Exception:
                raise InvalidInput(f"listen address {addr!r} is not a multiaddr (e.g. /ip4/0.0.0.0/tcp/4001)") from None
        if self.allow_peers is not None:
            for p in self.allow_peers:
                try:
                    _peer_id(p)
                except InvalidInput as e:
                    raise InvalidInput(f"allowed peer (--allow-peer / swarm.allow_peers): {e}") from None
        for b in self.bootstrap:
            parse_peer_addr(b)

    @classmethod
    def from_files(cls, identity: Path | str, swarm_key_file: Path | str | None = None, **kw: Any) -> "HostConfig":
        key = read_swarm_key(swarm_key_file) if swarm_key_file is not None else None
        if "allow_peers" in kw and kw["allow_peers"] is not None:
            kw["allow_peers"] = frozenset(kw["allow_peers"])
        return cls(identity=Path(identity), swarm_key=key, **kw)


# -- transports -----------------------------------------------------------------------------------


class _WrappedTCP(TCP):
    """TCP whose every connection, both directions, runs inside the PSK v1 protector (with a swarm key) or
    else a plain read-ahead (`ReadAheadStream`: a socket read per ~256 KiB, not two per Noise frame)."""

    def __init__(self, psk: bytes | None) -> None:
        super().__init__()
        self._psk = psk

    def _wrap(self, stream: Any) -> Any:
        return ReadAheadStream(stream) if self._psk is None else PskStream(stream, self._psk)

    async def dial(self, maddr: multiaddr.Multiaddr) -> Any:
        raw: Any = await super().dial(maddr)  # a RawConnection: its `stream` is what we wrap
        raw.stream = self._wrap(raw.stream)
        return raw

    async def dial_with_source(self, maddr: multiaddr.Multiaddr, source: tuple[str, int]) -> Any:
        raw: Any = await super().dial_with_source(maddr, source)
        raw.stream = self._wrap(raw.stream)
        return raw

    def create_listener(self, handler_function: Callable[[Any], Awaitable[None]]) -> Any:
        async def wrapped(stream: Any) -> None:
            await handler_function(self._wrap(stream))

        return super().create_listener(wrapped)


# A frame that has started out must go out whole, even if the task writing it is cancelled: each frame is
# Noise-encrypted (a nonce per message) and, in a private network, run through the PSK's XSalsa20 keystream
# before the socket takes a byte, so a write cut short by a cancel (a resolve's deadline, a race's loser, a
# DHT question no longer needed) leaves the peer's decryption out of step for good. Seen in the cold `nix
# copy` runs: the peer read a garbage frame length (5,607 or 15,630 bytes) and then waited for bytes that
# never came; every later stream on that connection hung until the process went away. A frame that cannot
# be written within FRAME_WRITE_TIMEOUT (the peer stopped reading its socket) closes the connection instead.
# Our own data path (`wire`) keeps the same rule for its writes.


class _WholeFrameYamux(Yamux):
    """py-libp2p's Yamux, except that a frame once begun is written whole or the connection is closed:
    waiting for the write lock may be cancelled (nothing is encrypted yet), the write itself is shielded."""

    async def _write_frame(self, data: bytes) -> None:
        async with self._write_lock:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(FRAME_WRITE_TIMEOUT) as waited:
                    await self.secured_conn.write(data)
                if waited.cancelled_caught:
                    log.warning("a %d-byte frame to %s took over %g s to write; closing the connection",
                                len(data), self.peer_id, FRAME_WRITE_TIMEOUT)
                    await close_quietly(self.secured_conn)
                    raise ConnectionClosedError(f"writing to {self.peer_id} stalled for {FRAME_WRITE_TIMEOUT:g} s")
        await trio.lowlevel.checkpoint()


def _yamux_for(secured_conn: Any, peer_id: ID, is_initiator: bool | None = None,
               on_close: Callable[[], Awaitable[Any]] | None = None) -> Any:
    """The muxer of a connection, by its security session: ours over our `NoiseSession`, py-libp2p's (whole
    frames) over its own Noise session (`HostConfig.stock_data_path`)."""
    if isinstance(secured_conn, NoiseSession):
        return YamuxConnection(secured_conn, peer_id, is_initiator=is_initiator, on_close=on_close)
    return _WholeFrameYamux(secured_conn, peer_id, is_initiator=is_initiator, on_close=on_close)


# py-libp2p 0.8.1's muxer negotiation builds `Yamux(...)` by name whatever class `muxer_opt` maps the protocol
# to, so the choice is made where it is looked up.
_muxer_multistream.Yamux = _yamux_for  # type: ignore[misc,assignment]


_PATIENT: contextvars.ContextVar[bool] = contextvars.ContextVar("p2pcache_patient_dials", default=False)


async def select_protocol(stream: Any, protocols: Sequence[str]) -> str:
    """Choose the first of `protocols` the other end of a fresh outbound stream speaks (multistream-select
    1.0.0, as the initiator), in one round trip when it speaks the first: the multistream header and the
    first proposal go out in one write, then both answers are read (go-libp2p's and js-libp2p's initiators
    do the same; a listener reads one message at a time, so it cannot tell). py-libp2p's own client waits
    for the header's echo before it proposes: two round trips through both event loops before a request
    could be written, paid by every resolve, DAG and DHT stream. Raises HostError if it speaks none."""
    if not protocols:
        raise HostError("no protocol to propose")
    first, *rest = protocols
    await stream.write(encode_delim(MULTISTREAM.encode()) + encode_delim(first.encode()))
    header = (await read_delim(stream)).decode(errors="replace")
    if header != MULTISTREAM:
        raise HostError(f"the peer speaks {header[:64]!r}, not {MULTISTREAM}")
    if (await read_delim(stream)).decode(errors="replace") == first:
        return first
    for proposal in rest:  # refused ("na"): the others one by one
        await stream.write(encode_delim(proposal.encode()))
        if (await read_delim(stream)).decode(errors="replace") == proposal:
            return proposal
    raise HostError(f"the peer speaks none of {', '.join(protocols)}")


class ProposedStream:
    """An outbound stream whose multistream-select proposal rides in its first write, and whose answer is
    read before the first read returns: no round trip before the request. Only for a protocol the peer
    chose on the same connection before (`NodeHost.new_stream`), as go-libp2p opens a stream to a peer
    whose protocols it knows. A peer that refuses it now fails the first read with one HostError, which
    callers take as a broken stream (never as a lie: nothing it sent is used); the stream is reset, every
    later read or write raises the same error (a writer does not go on into a stream nobody serves), and
    `on_refused` runs so the connection's next stream of the protocol negotiates again. A caller that only
    writes learns of a refusal only by reading the answer (as `DHT.add_providers` drains its stream).
    Everything else is the libp2p stream's."""

    def __init__(self, stream: Any, protocol: str, on_refused: Callable[[], None] | None = None) -> None:
        self.stream = stream
        self.protocol = protocol
        self._proposal: bytes | None = encode_delim(MULTISTREAM.encode()) + encode_delim(protocol.encode())
        self._answered = False
        self._failure: HostError | None = None
        self._on_refused = on_refused
        stream.set_protocol(TProtocol(protocol))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    def get_protocol(self) -> str:
        return self.protocol

    async def write(self, data: bytes) -> None:
        if self._failure is not None:
            raise self._failure
        if self._proposal is not None:
            data, self._proposal = self._proposal + bytes(data), None
        await self.stream.write(data)

    async def read(self, n: int | None = None) -> bytes:
        if self._failure is not None:
            raise self._failure
        if not self._answered:
            await self._answer()
        return await self.stream.read(n)

    async def close_write(self) -> None:
        if self._proposal is not None:
            await self.write(b"")
        await self.stream.close_write()

    async def _answer(self) -> None:
        if self._proposal is not None:
            await self.write(b"")
        try:
            header = (await read_delim(self.stream)).decode(errors="replace")
            answer = (await read_delim(self.stream)).decode(errors="replace") if header == MULTISTREAM else header
        except ParseError as e:
            await self._refused(HostError(f"a malformed answer to the proposal of {self.protocol}: {e}"))
        if answer != self.protocol:
            await self._refused(HostError(f"the peer no longer speaks {self.protocol} (answered {answer[:64]!r})"))
        self._answered = True

    async def _refused(self, failure: HostError) -> NoReturn:
        self._failure = failure
        if self._on_refused is not None:
            self._on_refused()
        with trio.CancelScope(shield=True):
            await reset_quietly(self.stream)
        raise failure


@contextmanager
def patient_dials() -> Iterator[None]:
    """Streams opened inside (on this task) wait out a dial backoff that ends before their deadline
    (`NodeHost._dial`); elsewhere a peer in backoff fails at once."""
    token = _PATIENT.set(True)
    try:
        yield
    finally:
        _PATIENT.reset(token)


class DialBackoff:
    """How long a peer whose every address just failed is not dialled again: py-libp2p's swarm keeps such a
    peer in a negative cache for a flat 60 s (`Swarm._negative_peer_cache`), so a provider that restarted on
    its old address stayed unreachable for a minute after one failed dial. This stands in for that cache
    (same four methods): the first failure blocks for `initial` seconds, each further one in a row doubles
    it up to `maximum`; a failure more than `maximum` after the last block ended starts again at `initial`.
    A peer with a live connection is never blocked (py-libp2p checks the cache before it looks for one, so
    a peer that dialled us back was refused until its entry expired). `evict` (a successful dial, a new
    connection, any sign the peer is back) forgets the peer and wakes whoever waits it out (`wait`)."""

    def __init__(self, connected: Callable[[str], bool], *, initial: float = 1.0, maximum: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, max_size: int = 10_000) -> None:
        self._connected = connected
        self.initial, self.maximum = initial, maximum
        self._clock = clock
        self._max_size = max_size
        self._blocks: dict[str, tuple[float, int]] = {}  # peer -> (blocked until, failures in a row)
        self._lifted: dict[str, trio.Event] = {}  # peer -> set when its block is lifted (`evict`)

    def mark_failed(self, peer_id: str) -> None:
        now = self._clock()
        until, failures = self._blocks.get(peer_id, (0.0, 0))
        failures = failures + 1 if now - until < self.maximum else 1
        if peer_id not in self._blocks and len(self._blocks) >= self._max_size:
            self._blocks = {p: b for p, b in self._blocks.items() if now - b[0] < self.maximum}
            if len(self._blocks) >= self._max_size:
                del self._blocks[min(self._blocks, key=lambda p: self._blocks[p][0])]
        self._blocks[peer_id] = (now + min(self.maximum, self.initial * 2 ** (failures - 1)), failures)

    def blocked_for(self, peer_id: str) -> float:
        """Seconds until `peer_id` may be dialled again (0: now)."""
        block = self._blocks.get(peer_id)
        if block is None or self._connected(peer_id):
            return 0.0
        return max(0.0, block[0] - self._clock())

    def is_blocked(self, peer_id: str) -> bool:
        return self.blocked_for(peer_id) > 0

    def evict(self, peer_id: str) -> None:
        self._blocks.pop(peer_id, None)
        lifted = self._lifted.pop(peer_id, None)
        if lifted is not None:
            lifted.set()

    def clear(self) -> None:
        self._blocks.clear()
        for lifted in self._lifted.values():
            lifted.set()
        self._lifted.clear()

    async def wait(self, peer_id: str) -> None:
        """Until `peer_id` may be dialled: its block ran out, or something lifted it (`evict`)."""
        while (left := self.blocked_for(peer_id)) > 0:
            lifted = self._lifted.setdefault(peer_id, trio.Event())
            with trio.move_on_after(left):
                await lifted.wait()


class _Notifee:
    """Swarm notifications, forwarded to the host's own task (never handled inline in the swarm)."""

    def __init__(self, send: trio.MemorySendChannel) -> None:
        self._send = send

    async def connected(self, network: Any, conn: Any) -> None:
        self._send.send_nowait(("up", conn))

    async def disconnected(self, network: Any, conn: Any) -> None:
        self._send.send_nowait(("down", conn))

    async def opened_stream(self, network: Any, stream: Any) -> None:
        pass

    async def closed_stream(self, network: Any, stream: Any) -> None:
        pass

    async def listen(self, network: Any, maddr: Any) -> None:
        pass

    async def listen_close(self, network: Any, maddr: Any) -> None:
        pass


# -- the host -------------------------------------------------------------------------------------


class NodeHost:
    """A running libp2p host (after `run` has started). `libp2p` is the py-libp2p host, for layers
    (like Kademlia) that take one; everything else goes through the methods here."""

    def __init__(self, config: HostConfig) -> None:
        self.config = config
        self.key_pair = load_identity(config.identity)
        noise = (NoiseTransport(self.key_pair, noise_privkey=_x25519_private()) if config.stock_data_path
                 else FramedNoiseTransport(self.key_pair, _x25519_private()))
        transports = [_WrappedTCP(config.swarm_key)]
        self.libp2p = new_host(
            key_pair=self.key_pair,
            sec_opt={NOISE_PROTOCOL_ID: noise},
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): _WholeFrameYamux},  # the class is chosen in `_yamux_for`
            listen_addrs=[multiaddr.Multiaddr(a) for a in config.listen],
            transports=transports,
            negotiate_timeout=max(1, math.ceil(config.handshake_timeout)),
            connection_config=ConnectionConfig(
                dial_timeout=config.handshake_timeout,
                inbound_upgrade_timeout=config.handshake_timeout,
                outbound_upgrade_timeout=config.handshake_timeout,
                outbound_stream_protocol_negotiation_timeout=config.handshake_timeout,
                inbound_stream_protocol_negotiation_timeout=config.handshake_timeout,
            ),
        )
        self.peer_id: ID = self.libp2p.get_id()
        # The swarm's flat 60 s negative cache of failed peers, replaced by a short exponential backoff that
        # any sign of the peer being back lifts (see DialBackoff, `peer_seen`). The swarm reads the attribute
        # by name in `dial_peer` (py-libp2p 0.8.1); an upgrade must re-check it.
        self.dial_backoff = DialBackoff(self._has_live_connection)
        cast(Any, self.libp2p.get_network())._negative_peer_cache = self.dial_backoff
        self._allowed = (
            frozenset(_peer_id(p) for p in config.allow_peers) if config.allow_peers is not None else None
        )
        self._conns: dict[ID, set[Any]] = {}  # open connections (swarm conns) per peer
        # Protocols each connection's peer chose for a stream of ours (`new_stream`): the next stream of one
        # proposes it in its first write (`ProposedStream`). Gone with the connection.
        self._spoken: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
        self._events = PeerEvents()
        self._running = False

    # -- queries ----------------------------------------------------------------------------------
    def allowed(self, peer: ID) -> bool:
        return self._allowed is None or peer in self._allowed

    def addrs(self) -> list[multiaddr.Multiaddr]:
        """Our listen addresses with /p2p/<peer id>, ready to hand to another node: a wildcard
        listen address (0.0.0.0, ::) stands for every address of this machine's interfaces."""
        suffix = f"/p2p/{self.peer_id.to_base58()}"
        out = []
        for a in self.libp2p.get_addrs():
            text = str(a)
            for concrete in expand_wildcard(text):
                out.append(multiaddr.Multiaddr(concrete if "/p2p/" in concrete else concrete + suffix))
        return out

    def connected_peers(self) -> list[ID]:
        return list(self._conns)

    def is_connected(self, peer: ID) -> bool:
        return bool(self._conns.get(peer))

    def _has_live_connection(self, peer: str) -> bool:
        conns = self.libp2p.get_network().connections.get(ID.from_base58(peer), ())
        return any(not getattr(c, "is_closed", False) for c in conns)

    def peer_seen(self, peer: ID) -> None:
        """Evidence that `peer` is up now (it connected, it announced a newer signed address record, the
        LAN saw it): dial it on the next ask, whatever earlier dials to it said."""
        if self.dial_backoff.blocked_for(str(peer)) > 0:
            log.debug("%s was seen again; dialling it is allowed at once", peer)
        self.dial_backoff.evict(str(peer))

    # -- connections and streams ------------------------------------------------------------------
    async def connect(self, addr: str | multiaddr.Multiaddr | PeerInfo) -> ID:
        """Dial a peer (a no-op if connected). Raises OSError-free `HostError` with one line on failure."""
        info = addr if isinstance(addr, PeerInfo) else parse_peer_addr(addr)
        if not self.allowed(info.peer_id):
            raise HostError(f"peer {info.peer_id} is not on this node's allowlist; not dialling it")
        if any(str(a).split("/")[1] in _DNS_FAMILIES for a in info.addrs):
            # py-libp2p's own resolver asks DNS servers directly (not /etc/hosts) and its failures
            # surface as "no addresses established a connection"; resolve here, once per dial.
            with trio.move_on_after(self.config.handshake_timeout) as lookup:
                info = PeerInfo(info.peer_id, [r for a in info.addrs for r in await resolve_addr(a)])
            if lookup.cancelled_caught:
                raise HostError(f"cannot connect to {info.peer_id}: looking up {[str(a) for a in info.addrs]} "
                                f"took over {self.config.handshake_timeout:g}s (is DNS reachable?)")
        try:
            with trio.fail_after(self.config.handshake_timeout):
                await self.libp2p.connect(info)
        except trio.TooSlowError:
            raise HostError(f"cannot connect to {info.peer_id}: no handshake within {self.config.handshake_timeout:g}s "
                            f"(a different swarm key?)") from None
        except Exception as e:
            raise HostError(f"cannot connect to {info.peer_id} at {[str(a) for a in info.addrs]}: {e}") from None
        self._mark_up(info.peer_id)
        return info.peer_id

    async def _dial(self, peer: ID) -> None:
        """Connect to `peer` from its known addresses within `handshake_timeout`. py-libp2p bounds only the
        handshake of one attempt (and tries four times), not the TCP connect, so an address that drops
        packets held a dial for 40 s or more; and a dial its caller cut short was never remembered as
        failed, so every later ask waited again. A dial that times out, or is cut after a second or more
        without an answer, puts the peer into the dial backoff like any failed dial.

        A peer still in its dial backoff is waited out by a caller that asked for it (`patient_dials`: a resolve,
        the ask a get or a lookup makes of a provider) if its deadline comes after the backoff ends, and within
        `handshake_timeout` (what a dial may take anyway): a get asked a second after its only provider's dial
        failed used to fail at once, whatever time it had left. Otherwise it fails at once (one line): a DHT
        walk's RPC to a dead peer must not spend the walk's time waiting (the walk is cut and a miss looks like
        a failed lookup), and a DAG fetch's lane hands its share to the other providers instead."""
        left = self.dial_backoff.blocked_for(str(peer))
        if left > 0:
            deadline = trio.current_effective_deadline()
            if (not _PATIENT.get() or trio.current_time() + left >= deadline
                    or left > self.config.handshake_timeout):
                raise HostError(f"cannot connect to {peer}: its last dials failed; the next is allowed in {left:.1f} s")
            log.debug("waiting %.1f s of dial backoff before dialling %s", left, peer)
            await self.dial_backoff.wait(str(peer))
        start = trio.current_time()
        try:
            with trio.move_on_after(self.config.handshake_timeout) as dial:
                await cast("Swarm", self.libp2p.get_network()).dial_peer(peer)
        except trio.Cancelled:
            if trio.current_time() - start >= 1.0 and not self._has_live_connection(str(peer)):
                self.dial_backoff.mark_failed(str(peer))
            raise
        if dial.cancelled_caught:
            self.dial_backoff.mark_failed(str(peer))
            raise HostError(f"cannot connect to {peer}: no answer within {self.config.handshake_timeout:g}s")
        self._mark_up(peer)

    def add_addrs(self, peer: ID, addrs: Iterable[multiaddr.Multiaddr], ttl: int = 3600) -> None:
        """Remember where `peer` listens, so `new_stream` can dial it."""
        self.libp2p.get_peerstore().add_addrs(peer, list(addrs), ttl)

    async def dial(self, peer: ID) -> None:
        """Connect to `peer` at the addresses known for it (a no-op if connected). HostError if it cannot be
        reached or is off the allowlist."""
        if not self.allowed(peer):
            raise HostError(f"peer {peer} is not on this node's allowlist")
        if not self._has_live_connection(str(peer)):
            await self._dial(peer)

    async def new_stream(self, peer: ID, protocols: Sequence[str]) -> Any:
        """A stream to `peer` speaking the first of `protocols` it accepts (dialling it if needed)."""
        if not self.allowed(peer):
            raise HostError(f"peer {peer} is not on this node's allowlist")
        if not self._has_live_connection(str(peer)):
            await self._dial(peer)
        net_stream = await self.libp2p.get_network().new_stream(peer)
        spoken = self._spoken.get(net_stream.muxed_conn)
        if len(protocols) == 1 and spoken is not None and protocols[0] in spoken:
            # It chose this protocol on this connection before: the proposal rides in the first write.
            self._mark_up(peer)
            return ProposedStream(net_stream, protocols[0], on_refused=partial(spoken.discard, protocols[0]))
        try:
            with trio.fail_after(self.config.handshake_timeout):
                chosen = await select_protocol(net_stream, protocols)
        except BaseException as e:
            with trio.CancelScope(shield=True):
                await reset_quietly(net_stream)
            if isinstance(e, trio.TooSlowError):
                raise HostError(f"peer {peer}: no protocol chosen within {self.config.handshake_timeout:g}s") from None
            if isinstance(e, (IOException, ParseError)):
                raise HostError(f"peer {peer}: the stream broke while choosing its protocol ({e})") from None
            raise
        net_stream.set_protocol(TProtocol(chosen))
        self._spoken.setdefault(net_stream.muxed_conn, set()).add(chosen)
        self._mark_up(peer)
        return net_stream

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Serve `protocol`. Streams from peers off the allowlist are reset before `handler` sees them."""

        async def gated(stream: Any) -> None:
            if not self.allowed(stream.muxed_conn.peer_id):
                await stream.reset()
                return
            await handler(stream)

        self.libp2p.set_stream_handler(TProtocol(protocol), gated)

    async def disconnect(self, peer: ID) -> None:
        await self.libp2p.disconnect(peer)

    def subscribe(self) -> trio.MemoryReceiveChannel[PeerEvent]:
        """PeerEvents from now on, starting with a `connected=True` for every peer connected now."""
        return self._events.subscribe(self.connected_peers())

    # -- running ----------------------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, keep bootstrap peers connected and enforce the allowlist until cancelled.
        `task_status.started(self)` once listening."""
        if self._running:
            raise HostError("this host is already running")
        self._running = True
        for addr in self.config.listen:
            check_port_free(addr)
        events_send, events_recv = trio.open_memory_channel(math.inf)
        self.libp2p.get_network().register_notifee(cast("INotifee", _Notifee(events_send)))  # duck-typed: every INotifee method
        try:
            async with self.libp2p.run(listen_addrs=[multiaddr.Multiaddr(a) for a in self.config.listen]):
                if not self.libp2p.get_addrs():
                    raise HostError(f"could not listen on {', '.join(self.config.listen)} (port in use?)")
                # The swarm's auto-connector redials every peer it ever saw to keep ~150 connections;
                # a cache node dials whom its bootstrap list and its drivers ask for, and a peer we
                # dropped for misbehaving must stay dropped.
                await cast("Swarm", self.libp2p.get_network()).auto_connector.stop()  # new_host makes a Swarm
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump_events, events_recv)
                    for addr in self.config.bootstrap:
                        nursery.start_soon(self._keep_connected, parse_peer_addr(addr))
                    if self.config.bootstrap and self.config.alone_warning > 0:
                        nursery.start_soon(self._warn_if_alone, self.config.alone_warning)
                    if self.config.mdns:
                        nursery.start_soon(self._discover_lan)
                    task_status.started(self)
                    await trio.sleep_forever()
        finally:
            self._running = False
            with trio.CancelScope(shield=True):
                await _close_listeners(self.libp2p)
                self._events.close()

    async def _pump_events(self, events: trio.MemoryReceiveChannel) -> None:
        async with trio.open_nursery() as nursery:
            async for kind, conn in events:
                try:
                    peer = conn.muxed_conn.peer_id
                except AttributeError:
                    continue
                if kind == "up":
                    if not self.allowed(peer):
                        log.info("closing connection from %s: not on the allowlist", peer)
                        nursery.start_soon(close_quietly, conn)
                        continue
                    self._mark_up(peer, conn)
                else:
                    self._mark_down(peer, conn)

    def _mark_up(self, peer: ID, conn: Any = None) -> None:
        """A connection to `peer` is up (`conn=None`: whatever connections the swarm has now)."""
        if not self.allowed(peer):
            return
        self.dial_backoff.evict(str(peer))  # whoever dialled whom, the peer is there
        conns = self._conns.setdefault(peer, set())
        was = len(conns)
        if conn is not None:
            conns.add(conn)
        else:
            conns.update(self.libp2p.get_network().connections.get(peer, []))
        if not conns:
            del self._conns[peer]
        elif was == 0:
            self._events.publish(PeerEvent(peer, True))

    def _mark_down(self, peer: ID, conn: Any) -> None:
        conns = self._conns.get(peer)
        if not conns:
            return
        conns.discard(conn)
        if not conns:
            del self._conns[peer]
            self._events.publish(PeerEvent(peer, False))

    async def _warn_if_alone(self, after: float) -> None:
        with trio.move_on_after(after):
            while not self._conns:
                await self._events.changed.wait()
            return
        log.warning("no peer completed a handshake within %g s of startup (bootstrap: %s): a different swarm key? "
                    "Check that every node has the same swarm.key, that the bootstrap addresses and peer IDs are "
                    "those `p2pcache status` prints there, and that the port is reachable",
                    after, ", ".join(self.config.bootstrap))

    async def _keep_connected(self, info: PeerInfo) -> None:
        """Dial a bootstrap peer, redial with exponential backoff (and jitter) whenever it is lost."""
        warned = False

        async def dial() -> None:
            # The swarm refuses, for 60 s, a peer whose addresses all failed; our own backoff
            # decides when a bootstrap peer is tried again.
            unblock = getattr(self.libp2p.get_network(), "unblock_peer", None)
            if unblock is not None:
                unblock(info.peer_id)
            await self.connect(info)
            log.info("connected to bootstrap peer %s", info.peer_id)

        def failed(e: Exception, delay: float) -> None:
            nonlocal warned
            # the first failure is worth a warning; the retries are routine
            log.log(logging.INFO if warned else logging.WARNING, "bootstrap dial failed, retrying in %.1fs: %s", delay, e)
            warned = True

        await keep_connected(info.peer_id, dial, self.is_connected, self._events,
                             initial=self.config.backoff_initial, maximum=self.config.backoff_max,
                             uniform=random.uniform, failure=HostError, on_failure=failed)

    async def _discover_lan(self) -> None:
        """Dial the swarm's nodes that mDNS finds on the LAN (through `connect`: allowlist and swarm key
        apply). A node found again while connected is left alone; a failed dial waits for its next
        announcement."""
        from .lan import lan_discovery

        listen = list(self.libp2p.get_addrs())
        try:
            async with lan_discovery(self.peer_id, listen, self.config.swarm_key) as found, trio.open_nursery() as n:
                async for info in found:
                    if info.peer_id != self.peer_id and not self.is_connected(info.peer_id) and self.allowed(info.peer_id):
                        n.start_soon(self._dial_found, info)
        except OSError as e:  # no multicast-capable interface, port 5353 unusable: run without it
            log.warning("LAN discovery (mDNS) is off: %s", e)

    async def _dial_found(self, info: PeerInfo) -> None:
        self.peer_seen(info.peer_id)  # it just announced itself on the LAN
        try:
            await self.connect(info)
            log.info("connected to %s, found on the LAN", info.peer_id)
        except HostError as e:
            log.debug("peer found on the LAN, not connected: %s", e)


def expand_wildcard(addr: str) -> list[str]:
    """/ip4/0.0.0.0/tcp/N -> /ip4/<each interface address>/tcp/N, non-loopback first (what another
    runner can dial); other addresses unchanged."""
    parts = addr.split("/")
    if len(parts) < 3 or (parts[1], parts[2]) not in (("ip4", "0.0.0.0"), ("ip6", "::")):
        return [addr]
    import socket

    import psutil  # type: ignore[import-untyped]

    family = socket.AF_INET if parts[1] == "ip4" else socket.AF_INET6
    found: list[str] = []
    for nic_addrs in psutil.net_if_addrs().values():
        for a in nic_addrs:
            if a.family == family and not a.address.startswith("fe80") and "%" not in a.address:
                found.append(a.address)
    found = sorted(set(found), key=lambda ip: (ip.startswith("127.") or ip == "::1", ip))
    return ["/".join(parts[:2] + [ip] + parts[3:]) for ip in found] or [addr]


async def _close_listeners(libp2p: Any) -> None:
    """py-libp2p 0.8.1's swarm, stopped by cancellation, leaves its listening sockets open (the listener
    close in its shutdown path is itself cancelled): a stopped host would keep its port, and with
    SO_REUSEPORT a later host there would share it with a socket nobody accepts on. Close them
    (shielded by the caller; closing twice is a no-op)."""
    with trio.move_on_after(5):
        for listener in list(getattr(libp2p.get_network(), "listeners", {}).values()):
            try:
                await listener.close()
            except Exception as e:  # a listener half torn down already: nothing more to release
                log.debug("closing a listener: %s", e)


def check_port_free(addr: str) -> None:
    """Refuse a fixed TCP port another process listens on. py-libp2p listens with SO_REUSEPORT (for
    hole punching), so a second node on the same port would start and share it with the first —
    and half the dials would reach the wrong node. A probe without SO_REUSEPORT cannot bind a port
    anyone listens on, so it tells."""
    import socket

    ma = multiaddr.Multiaddr(addr)
    protos = {p.name for p in ma.protocols()}
    if "tcp" not in protos:
        return
    port = int(ma.value_for_protocol("tcp"))
    if port == 0:
        return
    family, host = ((socket.AF_INET6, ma.value_for_protocol("ip6")) if "ip6" in protos
                    else (socket.AF_INET, ma.value_for_protocol("ip4") if "ip4" in protos else "0.0.0.0"))
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT leftover is no listener
        probe.bind((host, port))
    except OSError as e:
        raise HostError(f"cannot listen on {addr}: {e.strerror} (TCP port {port} is taken, maybe by another "
                        f"p2pcache daemon; pick another --listen port or stop that process)") from None
    finally:
        probe.close()


def _x25519_private() -> Any:
    from libp2p.crypto.x25519 import create_new_key_pair as new_x25519

    return new_x25519().private_key



@asynccontextmanager
async def open_host(config: HostConfig) -> AsyncIterator[NodeHost]:
    """A listening host for the duration of the block; stopped (connections closed) after it."""
    host = NodeHost(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        try:
            yield host
        finally:
            nursery.cancel_scope.cancel()


if TYPE_CHECKING:
    from .peers import Host

    def _node_host_is_a_host(host: NodeHost) -> Host:
        return host  # `make typecheck` proves NodeHost satisfies the Protocol (so does simnet's SimHost)
