"""Our own data path under every swarm stream: Noise transport messages and Yamux 1.0.0, in place of py-libp2p's.

Owns:
- `FramedNoiseTransport`, the security transport the host plugs into py-libp2p: py-libp2p's own Noise XX
  handshake (`libp2p.security.noise`: keys, signatures, the remote peer's identity), then a `NoiseSession`
  of our own for the transport messages (libp2p's noise spec: a 2-byte big-endian length, then
  ChaCha20-Poly1305 with the message counter as nonce, one `cryptography` cipher object per direction).
  One socket read is split into every complete message it holds and each is decrypted straight out of
  the read buffer; a message that does not authenticate ends the connection with one warning and
  nothing of it delivered; a connection that ends inside a message is a cut, not an end.
- `YamuxConnection` / `YamuxStream`, the stream muxer that runs over a `NoiseSession` (hashicorp's
  yamux spec.md, what go-, js- and py-libp2p speak): every frame of the decrypted messages is handled
  before the reader waits again; a stream's reader is woken only if it waits; 1 MiB receive window per
  stream, credited back as the application reads; a stream write goes out in one socket write (frames
  packed into Noise messages of at most 65,535 bytes) as far as the window allows (1 MiB at most per
  socket write); FIN half-close, RST, ping answers, keepalive pings, GoAway. What a peer's frames make us
  send back (ping answers, the acknowledgement or refusal of its streams) is bounded while it does not read
  (see MAX_PENDING_PONGS), and so is the number of streams it may hold open (MAX_INBOUND_STREAMS).

Why: py-libp2p 0.8.1's Noise and Yamux cost about one CPU-second per second of a transfer on each side,
most of it trio scheduling (a profile: ~5 task switches and ~7 lock acquires per 64 KiB frame, crypto
4–5 %), so the raw stream kept both cores of these VMs busy and nothing above it could reach 0.9× of it.

A write, once encryption has begun, goes out whole or the connection is closed (see FRAME_WRITE_TIMEOUT in
`host.py`): the Noise nonce (and the swarm key's keystream) advance with each message, so half a write
would desynchronise the peer for good. Waiting for a turn to write or for send window may be cancelled.

It must not know any protocol above the muxer, nor who may connect (the host's allowlist), nor the swarm
key (`pnet` hands in a socket that already speaks through it).
"""

from __future__ import annotations

import logging
import struct
import time
from collections import deque
from types import TracebackType
from typing import Any, Awaitable, Callable, Protocol

import multiaddr
import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from libp2p.abc import IMuxedConn, IMuxedStream, IRawConnection, ISecureConn, ISecureTransport
from libp2p.crypto.keys import KeyPair, PrivateKey
from libp2p.io.exceptions import ConnectionClosedError, IOException
from libp2p.peer.id import ID
from libp2p.security.base_session import BaseSession
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.exceptions import (
    MuxedConnUnavailable,
    MuxedStreamClosed,
    MuxedStreamEOF,
    MuxedStreamError,
    MuxedStreamReset,
)

log = logging.getLogger(__name__)

__all__ = [
    "FramedNoiseTransport", "NoiseSession", "NoiseError", "YamuxConnection", "YamuxStream", "ByteIO",
    "StreamIO", "STREAM_WINDOW", "session_from_handshake",
]

# -- Noise transport messages ---------------------------------------------------------------------

MAX_MESSAGE = 65535  # a Noise message, its 16-byte tag included (the 2-byte length counts it)
TAG = 16
MAX_PLAINTEXT = MAX_MESSAGE - TAG
RECEIVE_SIZE = 256 << 10  # socket bytes asked for at once
_LEN = struct.Struct(">H")
_NONCE = struct.Struct("<4xQ")  # ChaCha20-Poly1305's 96-bit nonce: 4 zero bytes, the counter little-endian
_NONCE_LIMIT = 2**64 - 1


class NoiseError(IOException):
    """The peer's Noise bytes are not to be trusted: a message failed authentication, or the connection
    ended inside a message. The connection is closed; nothing of it is delivered."""


class ByteIO(Protocol):
    """A connection's bytes, read into and written from the caller's buffers (`pnet.SocketIO` is one)."""

    async def receive_into(self, buf: bytearray, start: int) -> int: ...  # 0: the connection ended

    async def send_from(self, buf: bytearray, end: int) -> None: ...  # all of buf[:end]; may scramble it

    async def aclose(self) -> None: ...


class StreamIO:
    """`ByteIO` over anything with `read(n)`/`write(data)` (a py-libp2p raw connection) or `receive_some`/
    `send_all` (a trio stream): one copy more than a socket's own, for transports `pnet` cannot detach."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._trio = hasattr(stream, "receive_some")

    async def receive_into(self, buf: bytearray, start: int) -> int:
        want = len(buf) - start
        try:
            data = await (self._stream.receive_some(want) if self._trio else self._stream.read(want))
        except (trio.BrokenResourceError, OSError) as e:
            raise ConnectionClosedError(f"the connection broke: {e}") from None
        except trio.ClosedResourceError:
            return 0
        buf[start:start + len(data)] = data
        return len(data)

    async def send_from(self, buf: bytearray, end: int) -> None:
        data = bytes(buf[:end])
        try:
            await (self._stream.send_all(data) if self._trio else self._stream.write(data))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise ConnectionClosedError(f"the connection broke: {e}") from None

    async def aclose(self) -> None:
        await (self._stream.aclose() if self._trio else self._stream.close())


class NoiseSession(BaseSession):
    """A Noise connection after its handshake: the transport messages, ours (see the module docstring).

    The muxer reads with `receive_messages` (every complete message of the next socket read) and writes
    with `seal` + `send_sealed` (many plaintext pieces packed into messages, one socket write). `read`
    and `write` are the byte-stream view py-libp2p's multistream-select uses to choose the muxer."""

    def __init__(self, io: ByteIO, *, send_key: bytes, send_nonce: int, recv_key: bytes, recv_nonce: int,
                 local_peer: ID, local_private_key: PrivateKey, remote_peer: ID, remote_permanent_pubkey: Any,
                 is_initiator: bool, leftover: bytes = b"", closer: Any = None) -> None:
        super().__init__(local_peer=local_peer, local_private_key=local_private_key, remote_peer=remote_peer,
                         remote_permanent_pubkey=remote_permanent_pubkey, is_initiator=is_initiator)
        self._io = io
        self._closer = closer  # what `close` closes (the raw connection), else the io
        self._send = ChaCha20Poly1305(send_key)
        self._recv = ChaCha20Poly1305(recv_key)
        self._send_n, self._recv_n = send_nonce, recv_nonce
        # Buffers grow with use (to RECEIVE_SIZE and one message for reads, to the biggest batch for writes),
        # so an idle connection (DHT, identify) holds ~80 KiB and a busy one ~1.4 MiB at most.
        self._in = bytearray(len(leftover) + 2 + MAX_MESSAGE + (16 << 10))
        self._in[:len(leftover)] = leftover
        self._start, self._end = 0, len(leftover)
        self._out = bytearray(4096)
        self._pending: deque[bytes] = deque()  # plaintext `read` took from the wire and has not handed out
        self._closed = False

    # -- messages -------------------------------------------------------------------------------------
    async def receive_messages(self) -> list[bytes]:
        """The plaintexts of every complete message the next socket read completes (empty ones skipped);
        [] when the connection ended at a message boundary. Raises NoiseError for a forged message or a
        connection cut inside one, ConnectionClosedError if the socket broke. One reader at a time."""
        if self._pending:
            out = list(self._pending)
            self._pending.clear()
            return out
        buf = self._in
        while True:
            out = self._decrypt_complete()
            if out:
                return out
            start, end = self._start, self._end
            if start:  # move the partial message to the front: the next read goes after it
                buf[:end - start] = buf[start:end]
                self._start, self._end = 0, end - start
            free = len(buf) - self._end
            got = await self._io.receive_into(buf, self._end)
            if got == free and len(buf) < RECEIVE_SIZE + 2 + MAX_MESSAGE:  # busy: read more at once from now on
                bigger = bytearray(RECEIVE_SIZE + 2 + MAX_MESSAGE)
                bigger[:self._end + got] = buf[:self._end + got]
                buf = self._in = bigger
            if not got:
                if self._end > self._start:
                    raise NoiseError(f"the connection ended inside a Noise message ({self._end - self._start} "
                                     f"bytes of it)")
                return []
            self._end += got

    def _decrypt_complete(self) -> list[bytes]:
        buf, pos, end = self._in, self._start, self._end
        out: list[bytes] = []
        n = self._recv_n
        with memoryview(buf) as view:
            while end - pos >= 2:
                length = (buf[pos] << 8) | buf[pos + 1]
                if end - pos - 2 < length:
                    break
                if length < TAG:
                    raise NoiseError(f"a {length}-byte Noise message is shorter than its tag")
                try:
                    plain = self._recv.decrypt(_NONCE.pack(n), view[pos + 2:pos + 2 + length], None)
                except InvalidTag:
                    raise NoiseError(f"Noise message {n} does not authenticate (forged or corrupt)") from None
                n += 1
                pos += 2 + length
                if plain:
                    out.append(plain)
        if n >= _NONCE_LIMIT:
            raise NoiseError("the Noise receive nonce is used up")
        self._recv_n, self._start = n, pos
        return out

    def seal(self, frames: list[tuple[Any, ...]]) -> int:
        """Encrypt `frames` into the send buffer; returns its length. A frame is given as its parts (bytes-
        like: a header, a slice of the caller's data) of at most MAX_PLAINTEXT bytes in all; consecutive
        frames are packed into one message while they fit, and no frame is split. Each part is copied once,
        straight into the buffer, and encrypted there. Advances the nonce: what is sealed must be sent
        whole with `send_sealed` before the next seal, or the connection closed."""
        sizes = [sum(len(p) for p in f) for f in frames]
        bound = sum(sizes) + (2 + TAG) * len(frames)
        if len(self._out) < bound:
            self._out = bytearray(max(bound, 2 * len(self._out)))
        out, n = self._out, self._send_n
        start = used = 0  # the message being filled: where it starts, its plaintext bytes so far
        encrypt = self._send.encrypt_into
        with memoryview(out) as view:
            for frame, size in zip(frames, sizes):
                if size > MAX_PLAINTEXT:
                    raise ValueError(f"a {size}-byte frame does not fit one Noise message")
                if used and used + size > MAX_PLAINTEXT:
                    body = view[start + 2:start + 2 + used]
                    encrypt(_NONCE.pack(n), body, None, view[start + 2:start + 2 + used + TAG])
                    out[start], out[start + 1] = (used + TAG) >> 8, (used + TAG) & 0xFF
                    n += 1
                    start, used = start + 2 + used + TAG, 0
                at = start + 2 + used
                for part in frame:
                    view[at:at + len(part)] = part
                    at += len(part)
                used += size
            if used or frames:
                encrypt(_NONCE.pack(n), view[start + 2:start + 2 + used], None, view[start + 2:start + 2 + used + TAG])
                out[start], out[start + 1] = (used + TAG) >> 8, (used + TAG) & 0xFF
                n += 1
                start += 2 + used + TAG
        if n >= _NONCE_LIMIT:
            raise NoiseError("the Noise send nonce is used up")
        self._send_n = n
        return start

    async def send_sealed(self, length: int) -> None:
        await self._io.send_from(self._out, length)

    def take_pending(self) -> list[bytes]:
        """Plaintext `read` took off the wire and did not hand out (for the muxer that takes over)."""
        out = list(self._pending)
        self._pending.clear()
        return out

    # -- the byte-stream view (muxer negotiation) ---------------------------------------------------
    async def read(self, n: int | None = None) -> bytes:
        if n == 0:
            return b""
        if not self._pending:
            self._pending.extend(await self.receive_messages())
            if not self._pending:
                raise ConnectionClosedError("Connection closed")
        first = self._pending[0]
        if n is None or n < 0 or n >= len(first):
            self._pending.popleft()
            return first
        self._pending[0] = first[n:]
        return first[:n]

    async def write(self, data: bytes) -> None:
        if not data:
            return
        view = memoryview(data)
        length = self.seal([(view[i:i + MAX_PLAINTEXT],) for i in range(0, len(view), MAX_PLAINTEXT)])
        with trio.CancelScope(shield=True):  # sealed: it goes out whole
            await self.send_sealed(length)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            try:
                await (self._closer.close() if self._closer is not None else self._io.aclose())
            except Exception as e:  # already broken: nothing left to release
                log.debug("closing a Noise session: %s", e)

    def get_remote_address(self) -> tuple[str, int] | None:
        get = getattr(self._closer, "get_remote_address", None)
        return get() if get is not None else None

    def get_transport_addresses(self) -> list[multiaddr.Multiaddr]:
        get = getattr(self._closer, "get_transport_addresses", None)
        return get() if get is not None else []

    def get_connection_type(self) -> Any:
        from libp2p.connection_types import ConnectionType

        get = getattr(self._closer, "get_connection_type", None)
        return get() if get is not None else ConnectionType.DIRECT


def session_from_handshake(session: Any, raw: Any) -> ISecureConn:
    """Our `NoiseSession` in place of the `SecureSession` py-libp2p's Noise XX handshake made over `raw`:
    its keys and nonces, its peers. The socket is detached from `pnet`'s stream when it can be (no locks
    or copies between the socket and the decryption), else read through `raw`."""
    proto = session.conn.noise_state.noise_protocol
    enc, dec = proto.cipher_state_encrypt, proto.cipher_state_decrypt
    if session.high_watermark > session.low_watermark:  # the handshake read nothing past itself into it
        raise NoiseError("bytes left in the handshake's session buffer")
    detach = getattr(getattr(raw, "stream", None), "detach", None)
    detached = detach() if detach is not None else None
    if detached is not None:
        leftover, io = detached
    else:
        leftover, io = b"", StreamIO(raw)
    return NoiseSession(io, send_key=enc.k, send_nonce=enc.n, recv_key=dec.k, recv_nonce=dec.n,
                        local_peer=session.local_peer, local_private_key=session.local_private_key,
                        remote_peer=session.remote_peer, remote_permanent_pubkey=session.remote_permanent_pubkey,
                        is_initiator=session.is_initiator, leftover=leftover, closer=raw)


class FramedNoiseTransport(ISecureTransport):
    """py-libp2p's Noise transport (`/noise`, XX) for the handshake, our `NoiseSession` after it."""

    def __init__(self, key_pair: KeyPair, noise_privkey: PrivateKey) -> None:
        self.handshake = NoiseTransport(key_pair, noise_privkey=noise_privkey)

    async def secure_inbound(self, conn: IRawConnection) -> ISecureConn:
        return session_from_handshake(await self.handshake.secure_inbound(conn), conn)

    async def secure_outbound(self, conn: IRawConnection, peer_id: ID) -> ISecureConn:
        return session_from_handshake(await self.handshake.secure_outbound(conn, peer_id), conn)


# -- Yamux 1.0.0 ----------------------------------------------------------------------------------

PROTOCOL_ID = "/yamux/1.0.0"
_HEADER = struct.Struct(">BBHII")  # version, type, flags, stream id, length
HEADER_SIZE = 12
TYPE_DATA, TYPE_WINDOW_UPDATE, TYPE_PING, TYPE_GO_AWAY = 0, 1, 2, 3
FLAG_SYN, FLAG_ACK, FLAG_FIN, FLAG_RST = 1, 2, 4, 8
GO_AWAY_NORMAL, GO_AWAY_PROTOCOL_ERROR, GO_AWAY_INTERNAL_ERROR = 0, 1, 2
INITIAL_WINDOW = 256 << 10  # the spec's initial window of every stream, each way
STREAM_WINDOW = 1 << 20  # what we let a peer send on a stream before we read it (SYN/ACK raise it to this)
MAX_FRAME_PAYLOAD = MAX_PLAINTEXT - HEADER_SIZE  # a data frame with its header fits one Noise message
_CREDIT_AT = STREAM_WINDOW // 4  # read this much and the peer gets it back as window
# At most this much of a stream write per socket write (a peer may grant more window than we do: py-libp2p's
# grows to 16 MiB), which bounds the send buffer of a connection.
WRITE_BATCH = STREAM_WINDOW
ACCEPT_BACKLOG = 256  # inbound streams not yet taken by the swarm; beyond, a SYN is refused (RST)
# Streams the peer has open on this connection at once (taken or not); beyond, a SYN is refused (RST). Each
# holds a handler task and may buffer up to STREAM_WINDOW: without a bound one peer could hold any number of
# MiB here (go-libp2p's resource manager bounds inbound streams per peer too). Our own protocols use a few.
MAX_INBOUND_STREAMS = 512
GO_AWAY_TIMEOUT = 1.0  # closing: how long the GoAway may take to go out before the socket is closed anyway
# A write that cannot finish within this long (the peer stopped reading its socket) closes the connection:
# it cannot be abandoned half way (see the module docstring). host.py's stock data path uses it too.
FRAME_WRITE_TIMEOUT = 30.0
# Control frames the peer's own frames make us send wait in memory while it does not read its socket, until
# FRAME_WRITE_TIMEOUT: a peer flooding pings or SYNs without reading grew that queue by 12 bytes (a Python
# object of about 70) per frame. A ping beyond MAX_PENDING_PONGS answers not yet sent goes unanswered (an
# answer is a courtesy: the pinger sees a lost pong, as over a congested link); once MAX_CONTROL_BACKLOG
# frames of any kind wait, a frame of the peer's that asks for one more closes the connection.
MAX_PENDING_PONGS = 32
MAX_CONTROL_BACKLOG = 4096
# A connection that has received nothing for KEEPALIVE_INTERVAL sends a ping; if nothing at all arrives within
# KEEPALIVE_TIMEOUT after it, the peer is gone (a runner's VM torn down leaves the socket open here, and a fetch
# would pick the "connected" peer and wait out its deadlines) and the connection closes. go-yamux pings every 30 s.
KEEPALIVE_INTERVAL = 30.0
KEEPALIVE_TIMEOUT = 20.0


def _frame(typ: int, flags: int, sid: int, length: int) -> bytes:
    return _HEADER.pack(0, typ, flags, sid, length)


class YamuxProtocolError(Exception):
    """The peer broke the yamux spec: the session ends with a GoAway (protocol error)."""


class YamuxStream(IMuxedStream):
    """One yamux stream. `read(n)` returns up to n buffered bytes (all of them for None), waiting only if
    there are none; EOF after the peer's FIN raises MuxedStreamEOF, a reset or a lost connection
    MuxedStreamReset. `write` returns once its bytes are on the socket. `close` (= `close_write`) sends
    FIN: reading goes on. `reset` aborts both ways."""

    def __init__(self, conn: YamuxConnection, stream_id: int, send_window: int) -> None:
        self.muxed_conn = conn
        self.conn = conn
        self.stream_id = stream_id
        self.send_window = send_window
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._unread_credit = 0  # bytes read and not yet credited back to the peer
        self._recv_window = INITIAL_WINDOW  # what the peer may still send before our next credit
        self.local_fin = False
        self.remote_fin = False
        self.reset_by: str | None = None  # "peer", "us", "connection": no more bytes either way
        self._read_lot = trio.lowlevel.ParkingLot()
        self._window_lot = trio.lowlevel.ParkingLot()

    # -- called by the connection's reader (no await) ------------------------------------------------
    def _on_data(self, payload: bytes) -> None:
        if self.remote_fin or self.reset_by:
            return  # after its FIN, or reset by us: dropped (the peer may not know yet)
        if len(payload) > self._recv_window:
            raise YamuxProtocolError(f"stream {self.stream_id}: {len(payload)} bytes past a "
                                     f"{self._recv_window}-byte receive window")
        self._recv_window -= len(payload)
        self._chunks.append(payload)
        self._buffered += len(payload)
        if self._read_lot:
            self._read_lot.unpark_all()

    def _on_window(self, delta: int) -> None:
        self.send_window += delta
        if self._window_lot:
            self._window_lot.unpark_all()

    def _on_fin(self) -> None:
        self.remote_fin = True
        self._wake()
        self.conn._maybe_forget(self)

    def _on_reset(self, by: str) -> None:
        if self.reset_by is None:
            self.reset_by = by
        self._chunks.clear()
        self._buffered = 0
        self._wake()
        self.conn._forget(self)

    def _wake(self) -> None:
        if self._read_lot:
            self._read_lot.unpark_all()
        if self._window_lot:
            self._window_lot.unpark_all()

    # -- the application's side ----------------------------------------------------------------------
    async def read(self, n: int | None = None) -> bytes:
        if n == 0:
            return b""
        while not self._chunks:
            if self.reset_by is not None:
                raise MuxedStreamReset(f"stream {self.stream_id} was reset ({self.reset_by})")
            if self.remote_fin:
                raise MuxedStreamEOF(f"stream {self.stream_id}: the peer closed it")
            await self._read_lot.park()
        chunks = self._chunks
        if n is None or n < 0 or n >= self._buffered:
            out = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
        else:
            first = chunks[0]
            if len(first) > n:
                out, chunks[0] = first[:n], first[n:]
            elif len(first) == n:
                out = chunks.popleft()
            else:
                parts, left = [], n
                while left:
                    c = chunks[0]
                    if len(c) <= left:
                        parts.append(chunks.popleft())
                        left -= len(c)
                    else:
                        parts.append(c[:left])
                        chunks[0] = c[left:]
                        left = 0
                out = b"".join(parts)
        self._buffered -= len(out)
        self._unread_credit += len(out)
        if self._unread_credit >= _CREDIT_AT and not self.remote_fin and self.reset_by is None:
            self._recv_window += self._unread_credit
            credit, self._unread_credit = self._unread_credit, 0
            await self.conn._send_control(_frame(TYPE_WINDOW_UPDATE, 0, self.stream_id, credit))
        self.conn._maybe_forget(self)
        return out

    async def write(self, data: bytes) -> None:
        view = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
        pos, total = 0, len(view)
        conn = self.conn
        while True:
            self._check_writable()
            while self.send_window <= 0 and total:
                await self._window_lot.park()
                self._check_writable()
            await conn._acquire_write()
            try:
                self._check_writable()
                take = min(self.send_window, total - pos, WRITE_BATCH)
                if take <= 0 and total:
                    continue  # another writer of this stream took the window while we waited
                frames: list[tuple[Any, ...]] = []
                end = pos + take
                while pos < end:
                    n = min(MAX_FRAME_PAYLOAD, end - pos)
                    frames.append((_frame(TYPE_DATA, 0, self.stream_id, n), view[pos:pos + n]))
                    pos += n
                self.send_window -= take
                await conn._write_locked(frames)
            finally:
                conn._release_write()
            if pos >= total:
                return

    def _check_writable(self) -> None:
        if self.reset_by is not None:
            raise MuxedStreamReset(f"stream {self.stream_id} was reset ({self.reset_by})")
        if self.local_fin:
            raise MuxedStreamClosed(f"stream {self.stream_id} is closed for writing")

    async def close(self) -> None:
        """Half-close: FIN to the peer (after everything written before it); reading goes on."""
        if self.local_fin or self.reset_by is not None:
            return
        self.local_fin = True
        self.conn._queue(_frame(TYPE_WINDOW_UPDATE, FLAG_FIN, self.stream_id, 0))
        self._wake()
        self.conn._maybe_forget(self)
        await trio.lowlevel.checkpoint()

    close_write = close

    async def reset(self) -> None:
        if self.reset_by is None:
            if not (self.local_fin and self.remote_fin):
                self.conn._queue(_frame(TYPE_WINDOW_UPDATE, FLAG_RST, self.stream_id, 0))
            self._on_reset("us")
        await trio.lowlevel.checkpoint()

    @property
    def is_closed(self) -> bool:
        return self.reset_by is not None or (self.local_fin and self.remote_fin)

    def set_deadline(self, ttl: int) -> None:
        raise NotImplementedError("yamux streams have no deadlines: use a trio cancel scope")

    def get_remote_address(self) -> tuple[str, int] | None:
        return self.conn.get_remote_address()

    async def __aenter__(self) -> YamuxStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


class YamuxConnection(IMuxedConn):
    """A yamux session over a `NoiseSession` (see the module docstring). Plugs in where py-libp2p builds
    its `Yamux(secured_conn, peer_id, is_initiator=..., on_close=...)`; `start` runs it until the
    connection ends, then every stream still open reads as reset and `on_close` runs."""

    def __init__(self, secured_conn: NoiseSession, peer_id: ID, is_initiator: bool | None = None,
                 on_close: Callable[[], Awaitable[Any]] | None = None) -> None:
        self.secured_conn = secured_conn
        self.peer_id = peer_id
        self._initiator = secured_conn.is_initiator if is_initiator is None else is_initiator
        self.on_close = on_close
        self.event_started = trio.Event()
        self.event_closed = trio.Event()
        self.streams: dict[int, YamuxStream] = {}
        self._next_id = 1 if self._initiator else 2
        self._accept_send: trio.MemorySendChannel[YamuxStream]
        self._accept_recv: trio.MemoryReceiveChannel[YamuxStream]
        self._accept_send, self._accept_recv = trio.open_memory_channel(ACCEPT_BACKLOG)
        self._control: list[bytes] = []  # control frames waiting to go out (before the next data)
        self._pongs = 0  # of them, answers to the peer's pings
        self.pings_unanswered = 0  # pings of the peer's dropped (MAX_PENDING_PONGS answers were waiting)
        self.streams_refused = 0  # SYNs refused with RST (ACCEPT_BACKLOG waiting or MAX_INBOUND_STREAMS open)
        self._inbound = 0  # of `streams`, those the peer opened
        self._writing = False
        self._write_lot = trio.lowlevel.ParkingLot()
        self._flush_lot = trio.lowlevel.ParkingLot()
        self._nursery: trio.Nursery | None = None
        self._dead: str | None = None  # why the session ended
        self._remote_go_away = False
        self._carry = b""  # the start of a frame the next message completes (a foreign peer's framing)
        self._created_at = time.time()  # py-libp2p's connection pruner reads it
        self._received_at = 0.0  # trio time of the last socket read that brought messages
        self.pings_sent = self.pongs_received = 0  # keepalive pings, and the peer's answers to them
        self._torn_down = False

    # -- IMuxedConn -----------------------------------------------------------------------------------
    @property
    def is_initiator(self) -> bool:
        return self._initiator

    @property
    def is_established(self) -> bool:
        return self.event_started.is_set() and self._dead is None

    @property
    def is_closed(self) -> bool:
        return self.event_closed.is_set()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self.secured_conn.get_remote_address()

    def get_transport_addresses(self) -> list[multiaddr.Multiaddr]:
        return self.secured_conn.get_transport_addresses()

    def get_connection_type(self) -> Any:
        return self.secured_conn.get_connection_type()

    async def start(self) -> None:
        if self.event_started.is_set():
            return
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._flush_loop)
                self._received_at = trio.current_time()
                nursery.start_soon(self._keepalive)
                self.event_started.set()
                try:
                    await self._read_loop()
                finally:
                    nursery.cancel_scope.cancel()
                    if self._writing:  # stalled on a peer that does not read (shielded): closing the socket ends it
                        await self.secured_conn.close()
        finally:
            with trio.CancelScope(shield=True):
                await self._teardown(self._dead or "the muxer stopped")

    async def open_stream(self) -> YamuxStream:
        if self._dead is not None:
            raise MuxedStreamError(f"the connection to {self.peer_id} is closed ({self._dead})")
        if self._remote_go_away:
            raise MuxedStreamError(f"{self.peer_id} sent GoAway: no new streams on this connection")
        sid = self._next_id
        self._next_id += 2
        stream = YamuxStream(self, sid, INITIAL_WINDOW)
        stream._recv_window = STREAM_WINDOW
        self.streams[sid] = stream
        # SYN carrying the window raise; it rides in front of the stream's first write (or the flusher's)
        self._queue(_frame(TYPE_WINDOW_UPDATE, FLAG_SYN, sid, STREAM_WINDOW - INITIAL_WINDOW))
        await trio.lowlevel.checkpoint()
        return stream

    async def accept_stream(self) -> YamuxStream:
        try:
            return await self._accept_recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise MuxedConnUnavailable(f"the connection to {self.peer_id} is closed") from None

    async def close(self, error_code: int = GO_AWAY_NORMAL) -> None:
        """GoAway to the peer (bounded by GO_AWAY_TIMEOUT), then the connection is closed."""
        if self._dead is None:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(GO_AWAY_TIMEOUT):
                    try:
                        await self._acquire_write()
                        try:
                            if self._dead is None:
                                await self._write_locked([(_frame(TYPE_GO_AWAY, 0, 0, error_code),)])
                        finally:
                            self._release_write()
                    except (IOException, MuxedStreamError) as e:
                        log.debug("GoAway to %s not sent: %s", self.peer_id, e)
                await self._teardown("closed here")

    # -- writing ----------------------------------------------------------------------------------------
    async def _acquire_write(self) -> None:
        """Our turn to write (cancellable: nothing is sealed yet)."""
        while self._writing:
            await self._write_lot.park()
        if self._dead is not None:
            self._write_lot.unpark()  # pass the news on
            raise MuxedStreamReset(f"the connection to {self.peer_id} is closed ({self._dead})")
        self._writing = True

    def _release_write(self) -> None:
        self._writing = False
        if self._write_lot:
            self._write_lot.unpark()
        elif self._control and self._flush_lot:
            self._flush_lot.unpark()

    async def _write_locked(self, frames: list[tuple[Any, ...]]) -> None:
        """Seal the waiting control frames and `frames` and send them in one socket write, whole: shielded,
        and a write that takes over FRAME_WRITE_TIMEOUT closes the connection."""
        if self._control:
            frames = [(c,) for c in self._control] + frames
            self._control, self._pongs = [], 0
        if not frames:
            return
        length = self.secured_conn.seal(frames)
        with trio.CancelScope(shield=True, deadline=trio.current_time() + FRAME_WRITE_TIMEOUT) as scope:
            try:
                await self.secured_conn.send_sealed(length)
            except IOException as e:
                self._dead = self._dead or f"writing failed: {e}"
                self._cancel()
                raise MuxedStreamReset(f"the connection to {self.peer_id} broke: {e}") from None
        if scope.cancelled_caught:
            log.warning("a %d-byte write to %s took over %g s; closing the connection", length, self.peer_id,
                        FRAME_WRITE_TIMEOUT)
            self._dead = f"a write stalled for {FRAME_WRITE_TIMEOUT:g} s"
            self._cancel()
            raise MuxedStreamReset(f"writing to {self.peer_id} stalled for {FRAME_WRITE_TIMEOUT:g} s")

    async def _send_control(self, frame: bytes) -> None:
        """A control frame from an application task: written at once by this task if nobody is writing
        (no hand-off to the flusher), else it rides in front of the current writer's next batch."""
        self._control.append(frame)
        if self._writing or self._dead is not None:
            return
        self._writing = True
        try:
            await self._write_locked([])
        except MuxedStreamError:
            pass  # the connection is going: what the caller read stays read
        finally:
            self._release_write()

    def _queue(self, frame: bytes) -> None:
        """A control frame, sent before the next data (or by the flusher if nobody writes)."""
        if self._dead is not None:
            return
        self._control.append(frame)
        if not self._writing and self._flush_lot:
            self._flush_lot.unpark()

    def _room_to_answer(self) -> None:
        """Before a control frame one of the peer's frames asks for: raises YamuxProtocolError (the connection
        closes) if MAX_CONTROL_BACKLOG frames already wait for a peer that does not read."""
        if len(self._control) >= MAX_CONTROL_BACKLOG:
            raise YamuxProtocolError(f"{len(self._control)} control frames wait to go out: the peer sends "
                                     f"frames that need an answer and does not read the answers")

    async def _flush_loop(self) -> None:
        while True:
            while not self._control or self._writing:
                await self._flush_lot.park()
            try:
                await self._acquire_write()
            except MuxedStreamError:
                return
            try:
                await self._write_locked([])
            except MuxedStreamError:
                return
            finally:
                self._release_write()

    def _cancel(self) -> None:
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _keepalive(self) -> None:
        """Pings while nothing arrives; ends the connection once a ping has gone unanswered (and nothing else
        came) for KEEPALIVE_TIMEOUT. Any frame counts as a sign of life, not only the answer."""
        opaque = 0
        while True:
            idle_until = self._received_at + KEEPALIVE_INTERVAL
            if trio.current_time() < idle_until:
                await trio.sleep_until(idle_until)
                continue
            opaque += 1
            self.pings_sent += 1
            sent = trio.current_time()
            self._queue(_frame(TYPE_PING, FLAG_SYN, 0, opaque))
            await trio.sleep_until(sent + KEEPALIVE_TIMEOUT)
            if self._received_at < sent:
                # One more I/O pass first: after this loop stalled (a long synchronous step), the timer and the
                # answer waiting in the socket come due together, and the timer's task may run first.
                await trio.sleep(min(1.0, KEEPALIVE_TIMEOUT / 10))
            if self._received_at < sent:
                log.warning("closing the connection to %s: nothing from it for %.0f s, a keepalive ping unanswered "
                            "for %.0f s", self.peer_id, trio.current_time() - self._received_at,
                            KEEPALIVE_TIMEOUT)
                self._dead = self._dead or "the peer stopped answering keepalive pings"
                self._cancel()
                return

    # -- reading ----------------------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        session = self.secured_conn
        try:
            for message in session.take_pending():
                self._handle(message)
            while True:
                messages = await session.receive_messages()
                self._received_at = trio.current_time()
                if not messages:
                    self._dead = self._dead or "the peer closed the connection"
                    return
                for message in messages:
                    self._handle(message)
        except NoiseError as e:
            log.warning("closing the connection to %s: %s", self.peer_id, e)
            self._dead = self._dead or str(e)
        except YamuxProtocolError as e:
            log.warning("closing the connection to %s: yamux protocol error: %s", self.peer_id, e)
            self._dead = f"protocol error: {e}"
            await self._go_away_now(GO_AWAY_PROTOCOL_ERROR)
        except IOException as e:
            log.debug("the connection to %s broke: %s", self.peer_id, e)
            self._dead = self._dead or f"the connection broke: {e}"

    async def _go_away_now(self, code: int) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(GO_AWAY_TIMEOUT):
            if not self._writing:
                self._writing = True
                try:
                    self._control, self._pongs = [], 0
                    length = self.secured_conn.seal([(_frame(TYPE_GO_AWAY, 0, 0, code),)])
                    await self.secured_conn.send_sealed(length)
                except IOException:
                    pass
                finally:
                    self._writing = False

    def _handle(self, data: bytes) -> None:
        """Every frame in `data` (after what the last message left unfinished)."""
        if self._carry:
            data = self._carry + data
            self._carry = b""
        pos, end = 0, len(data)
        unpack = _HEADER.unpack_from
        while end - pos >= HEADER_SIZE:
            version, typ, flags, sid, length = unpack(data, pos)
            if version != 0:
                raise YamuxProtocolError(f"version {version}")
            if typ == TYPE_DATA:
                if length > STREAM_WINDOW:
                    raise YamuxProtocolError(f"a {length}-byte data frame is larger than any window we give")
                if end - pos - HEADER_SIZE < length:
                    break
                payload = data[pos + HEADER_SIZE:pos + HEADER_SIZE + length]
                pos += HEADER_SIZE + length
                self._on_frame(typ, flags, sid, length, payload)
            else:
                pos += HEADER_SIZE
                self._on_frame(typ, flags, sid, length, b"")
        if pos < end:
            self._carry = bytes(data[pos:])

    def _on_frame(self, typ: int, flags: int, sid: int, length: int, payload: bytes) -> None:
        if typ == TYPE_PING:
            if flags & FLAG_SYN:
                if self._pongs >= MAX_PENDING_PONGS:
                    self.pings_unanswered += 1
                    if self.pings_unanswered == 1:
                        log.info("%s pings faster than it reads the answers: pings beyond %d waiting answers go "
                                 "unanswered", self.peer_id, MAX_PENDING_PONGS)
                else:
                    self._room_to_answer()
                    self._pongs += 1
                    self._queue(_frame(TYPE_PING, FLAG_ACK, 0, length))
            elif flags & FLAG_ACK:  # an answer to a keepalive ping of ours
                self.pongs_received += 1
            return
        if typ == TYPE_GO_AWAY:
            if length != GO_AWAY_NORMAL:
                log.info("%s sent GoAway (error code %d)", self.peer_id, length)
            self._remote_go_away = True
            if not self.streams:
                self._dead = "the peer sent GoAway"
                self._cancel()
            return
        if typ not in (TYPE_DATA, TYPE_WINDOW_UPDATE):
            raise YamuxProtocolError(f"frame type {typ}")
        stream = self.streams.get(sid)
        if flags & FLAG_SYN:
            if stream is not None:
                raise YamuxProtocolError(f"stream {sid} opened twice")
            if flags & FLAG_RST:
                return  # opened and aborted at once: nothing to accept
            if sid == 0 or (sid % 2 == 1) != (not self._initiator):
                raise YamuxProtocolError(f"stream id {sid} is not the peer's to open")
            stream = self._accept(sid)
            if stream is None:
                return
        elif stream is None:
            return  # a stream already gone (reset here, or both sides done): its last frames are dropped
        if flags & FLAG_RST:
            stream._on_reset("peer")
            return
        if typ == TYPE_DATA:
            if length:
                stream._on_data(payload)
        elif length:
            stream._on_window(length)
        if flags & FLAG_FIN:
            stream._on_fin()

    def _accept(self, sid: int) -> YamuxStream | None:
        self._room_to_answer()  # a refusal or an acknowledgement goes back
        if self._dead is not None or self._remote_go_away:
            self._queue(_frame(TYPE_WINDOW_UPDATE, FLAG_RST, sid, 0))
            return None
        stream = YamuxStream(self, sid, INITIAL_WINDOW)
        refuse = self._inbound >= MAX_INBOUND_STREAMS
        if not refuse:
            try:
                self._accept_send.send_nowait(stream)
            except trio.WouldBlock:
                refuse = True
        if refuse:
            self.streams_refused += 1
            if self.streams_refused == 1:  # once: a flood of SYNs is not a flood of log lines
                log.info("refusing streams from %s: %d streams are open (at most %d) and %d wait to be taken "
                         "(at most %d)", self.peer_id, self._inbound, MAX_INBOUND_STREAMS,
                         self._accept_send.statistics().current_buffer_used, ACCEPT_BACKLOG)
            self._queue(_frame(TYPE_WINDOW_UPDATE, FLAG_RST, sid, 0))
            return None
        stream._recv_window = STREAM_WINDOW
        self.streams[sid] = stream
        self._inbound += 1
        self._queue(_frame(TYPE_WINDOW_UPDATE, FLAG_ACK, sid, STREAM_WINDOW - INITIAL_WINDOW))
        return stream

    # -- the end of streams and of the session ----------------------------------------------------------
    def _forget(self, stream: YamuxStream) -> None:
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
            if (stream.stream_id % 2 == 1) != self._initiator:  # the peer's
                self._inbound -= 1
            if self._remote_go_away and not self.streams:
                self._dead = self._dead or "the peer sent GoAway"
                self._cancel()

    def _maybe_forget(self, stream: YamuxStream) -> None:
        # both FINs are through: no frame that matters can come for it (what it holds stays readable)
        if stream.local_fin and stream.remote_fin:
            self._forget(stream)

    async def _teardown(self, why: str) -> None:
        if self._torn_down:
            return
        self._torn_down = True
        self._dead = self._dead or why
        self._control, self._pongs = [], 0
        for stream in list(self.streams.values()):
            if stream.remote_fin:  # all the peer meant to send is here: it stays readable to its end
                stream.local_fin = True
                stream._wake()
            else:
                stream._on_reset("connection")
        self.streams.clear()
        self._inbound = 0
        self._accept_send.close()
        self._write_lot.unpark_all()
        self._flush_lot.unpark_all()
        self._cancel()
        await self.secured_conn.close()
        self.event_closed.set()
        if self.on_close is not None:
            try:
                await self.on_close()
            except Exception as e:  # the swarm's bookkeeping: never the reason a close fails
                log.debug("on_close of the connection to %s: %s", self.peer_id, e)


