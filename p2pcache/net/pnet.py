"""Private networks: kubo's `swarm.key` file and the libp2p PSK v1 connection protector.

Owns: reading, writing and generating swarm keys (`/key/swarm/psk/1.0.0/` + `/base16/` + 64 hex
digits, the format kubo and js-libp2p read), and wrapping a raw TCP connection so that everything on
it after the nonces is XSalsa20-encrypted with the key, as libp2p's pnet spec (PSK v1) says: each side
sends a random 24-byte nonce first, writes with XSalsa20(psk, own nonce) and reads with
XSalsa20(psk, peer's nonce). A peer with another key (or none) sees noise, so its security handshake
fails and the connection closes before any protocol runs.

Why not py-libp2p's own `psk=` option: it uses Salsa20 with an 8-byte nonce, which no other libp2p
implementation speaks, so a py-libp2p pnet node could never join a kubo or js-libp2p private network.
XSalsa20 comes from the system's libsodium (`crypto_stream_xsalsa20_xor_ic`, through ctypes; PyNaCl's
bundled copy does not export it): with `sodium_init()` it picks its AVX2/SSE2 Salsa20, about twice
pycryptodome's portable C here, so the swarm key costs about what Noise's ChaCha20 does. Where no
libsodium loads, XSalsa20 is built from HSalsa20 (a few microseconds of pure Python, once per connection)
and pycryptodome's Salsa20 (C, what py-libp2p already depends on); the bytes are the same.

It must not decide who may connect beyond "knows the key": peer allowlists are the host's job.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import re
import struct
from pathlib import Path
from typing import Any, Protocol

import trio
from Crypto.Cipher import Salsa20
from libp2p.io.exceptions import ConnectionClosedError

from ..errors import InvalidKey

log = logging.getLogger(__name__)

SWARM_KEY_HEADER = "/key/swarm/psk/1.0.0/"
NONCE_SIZE = 24
READ_SIZE = 256 << 10  # socket bytes read (and decrypted) at once
KEY_SIZE = 32

_SIGMA = struct.unpack("<4I", b"expand 32-byte k")
_MASK = 0xFFFFFFFF


def _rotl(v: int, c: int) -> int:
    return ((v << c) & _MASK) | (v >> (32 - c))


def hsalsa20(key: bytes, nonce16: bytes) -> bytes:
    """HSalsa20: the 32-byte subkey XSalsa20 derives from a key and the first 16 nonce bytes."""
    if len(key) != KEY_SIZE or len(nonce16) != 16:
        raise ValueError("hsalsa20 takes a 32-byte key and a 16-byte nonce")
    k = struct.unpack("<8I", key)
    n = struct.unpack("<4I", nonce16)
    x = [_SIGMA[0], k[0], k[1], k[2], k[3], _SIGMA[1], n[0], n[1],
         n[2], n[3], _SIGMA[2], k[4], k[5], k[6], k[7], _SIGMA[3]]

    def qr(a: int, b: int, c: int, d: int) -> None:
        x[b] ^= _rotl((x[a] + x[d]) & _MASK, 7)
        x[c] ^= _rotl((x[b] + x[a]) & _MASK, 9)
        x[d] ^= _rotl((x[c] + x[b]) & _MASK, 13)
        x[a] ^= _rotl((x[d] + x[c]) & _MASK, 18)

    for _ in range(10):  # 20 rounds: column round, then row round
        qr(0, 4, 8, 12); qr(5, 9, 13, 1); qr(10, 14, 2, 6); qr(15, 3, 7, 11)  # noqa: E702
        qr(0, 1, 2, 3); qr(5, 6, 7, 4); qr(10, 11, 8, 9); qr(15, 12, 13, 14)  # noqa: E702
    return struct.pack("<8I", x[0], x[5], x[10], x[15], x[6], x[7], x[8], x[9])


class KeyStream(Protocol):
    """XSalsa20(key, nonce) as a stream: each call XORs the next len(data) keystream bytes into data."""

    def xor(self, data: bytes) -> bytes | bytearray: ...

    def xor_into(self, data: bytes, out: bytearray) -> None:
        """out[:len(data)] = data XOR the next keystream bytes (`out` may be longer)."""

    def xor_in_place(self, buf: bytearray, start: int, end: int) -> None:
        """buf[start:end] XORed with the next end - start keystream bytes, in place."""


class PycryptodomeXSalsa20:
    """XSalsa20 from pure-Python HSalsa20 and pycryptodome's Salsa20: the fallback where no libsodium loads."""

    def __init__(self, key: bytes, nonce24: bytes) -> None:
        if len(nonce24) != NONCE_SIZE:
            raise ValueError("xsalsa20 takes a 24-byte nonce")
        self._cipher = Salsa20.new(key=hsalsa20(key, nonce24[:16]), nonce=nonce24[16:])

    def xor(self, data: bytes) -> bytes:
        return bytes(self._cipher.encrypt(data))

    def xor_into(self, data: bytes, out: bytearray) -> None:
        out[:len(data)] = self._cipher.encrypt(data)

    def xor_in_place(self, buf: bytearray, start: int, end: int) -> None:
        if end > start:
            buf[start:end] = self._cipher.encrypt(bytes(buf[start:end]))


def _load_libsodium() -> Any:
    """The system's libsodium, initialised (its fastest Salsa20 for this CPU chosen), or None."""
    for name in ("libsodium.so.23", ctypes.util.find_library("sodium")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            xor_ic = lib.crypto_stream_xsalsa20_xor_ic
        except (OSError, AttributeError):
            continue
        if lib.sodium_init() < 0:  # 0: initialised now, 1: already; -1: failed
            continue
        # (out, in, length, 24-byte nonce, first 64-byte block's counter, 32-byte key); out may be in
        xor_ic.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulonglong, ctypes.c_char_p, ctypes.c_uint64,
                           ctypes.c_char_p]
        xor_ic.restype = ctypes.c_int
        return lib
    return None


_SODIUM = _load_libsodium()
_BLOCK = 64  # Salsa20's keystream block: libsodium's counter counts these


def _address(buf: bytes | bytearray) -> int:
    if isinstance(buf, bytearray):
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))  # the bytearray's storage (len >= 1)
    return ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p).value or 0  # a bytes object's contents, not copied


class SodiumXSalsa20:
    """XSalsa20 by libsodium's `crypto_stream_xsalsa20_xor_ic`, which starts at a 64-byte block: the keystream
    offset is kept here, and a call that begins mid-block does that block's rest through a 64-byte scratch
    buffer (the window updates of Yamux are 30-byte writes)."""

    __slots__ = ("_key", "_nonce", "_offset", "_scratch", "_scratch_at")

    def __init__(self, key: bytes, nonce24: bytes) -> None:
        if len(key) != KEY_SIZE or len(nonce24) != NONCE_SIZE:
            raise ValueError("xsalsa20 takes a 32-byte key and a 24-byte nonce")
        if _SODIUM is None:
            raise RuntimeError("libsodium is not loaded")
        self._key, self._nonce = bytes(key), bytes(nonce24)
        self._offset = 0
        self._scratch = bytearray(_BLOCK)
        self._scratch_at = _address(self._scratch)

    def xor(self, data: bytes) -> bytearray:
        out = bytearray(len(data))
        self.xor_into(data, out)
        return out

    def xor_into(self, data: bytes, out: bytearray) -> None:
        n = len(data)
        if n == 0:
            return
        if len(out) < n:
            raise ValueError("xor_into: the output buffer is shorter than the data")
        if not isinstance(data, (bytes, bytearray)):
            data = bytes(data)
        block, skip = divmod(self._offset, _BLOCK)
        src, dst, left = _address(data), _address(out), n
        xor_ic = _SODIUM.crypto_stream_xsalsa20_xor_ic
        if skip:  # the rest of a block begun by an earlier call
            head = min(_BLOCK - skip, n)
            s = self._scratch
            s[skip:skip + head] = data[:head]
            xor_ic(self._scratch_at, self._scratch_at, skip + head, self._nonce, block, self._key)
            out[:head] = s[skip:skip + head]
            src, dst, left, block = src + head, dst + head, n - head, block + 1
        if left:
            xor_ic(dst, src, left, self._nonce, block, self._key)
        self._offset += n

    def xor_in_place(self, buf: bytearray, start: int, end: int) -> None:
        n = end - start
        if n <= 0:
            return
        if start < 0 or end > len(buf):
            raise ValueError("xor_in_place: the range is outside the buffer")
        block, skip = divmod(self._offset, _BLOCK)
        at, left = _address(buf) + start, n
        xor_ic = _SODIUM.crypto_stream_xsalsa20_xor_ic
        if skip:  # the rest of a block begun by an earlier call
            head = min(_BLOCK - skip, n)
            s = self._scratch
            s[skip:skip + head] = buf[start:start + head]
            xor_ic(self._scratch_at, self._scratch_at, skip + head, self._nonce, block, self._key)
            buf[start:start + head] = s[skip:skip + head]
            at, left, block = at + head, n - head, block + 1
        if left:
            xor_ic(at, at, left, self._nonce, block, self._key)
        self._offset += n


def xsalsa20(key: bytes, nonce24: bytes) -> KeyStream:
    """A stateful XSalsa20(key, nonce24) keystream: libsodium's where it loads, else pycryptodome's."""
    if _SODIUM is not None:
        return SodiumXSalsa20(key, nonce24)
    return PycryptodomeXSalsa20(key, nonce24)


# -- swarm.key files ------------------------------------------------------------------------------


def new_swarm_key() -> bytes:
    return os.urandom(KEY_SIZE)


def format_swarm_key(key: bytes) -> str:
    if len(key) != KEY_SIZE:
        raise InvalidKey(f"a swarm key is {KEY_SIZE} bytes, got {len(key)}")
    return f"{SWARM_KEY_HEADER}\n/base16/\n{key.hex()}\n"


def parse_swarm_key(text: str, where: str = "swarm key") -> bytes:
    """The 32 key bytes of a swarm.key file's text (`/base16/` encoding, as kubo writes it)."""
    lines = [ln.strip() for ln in text.strip().splitlines()]
    if len(lines) != 3 or lines[0] != SWARM_KEY_HEADER:
        raise InvalidKey(f"{where} is not a swarm key: expected the 3 lines '{SWARM_KEY_HEADER}', '/base16/', "
                         f"64 hex digits; create one with `p2pcache swarm-key new`")
    if lines[1] != "/base16/":
        raise InvalidKey(f"{where} uses encoding {lines[1]!r}; only /base16/ is supported")
    if not re.fullmatch(r"[0-9a-fA-F]{64}", lines[2]):
        raise InvalidKey(f"{where}: the key must be 64 hex digits (32 bytes)")
    return bytes.fromhex(lines[2])


def read_swarm_key(path: Path | str) -> bytes:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise InvalidKey(f"cannot read swarm key {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise InvalidKey(f"swarm key {path} is not text") from None
    return parse_swarm_key(text, str(path))


def write_swarm_key(path: Path | str, key: bytes | None = None, overwrite: bool = False) -> bytes:
    """Write a swarm.key file (mode 0600; a new random key unless `key` is given); returns the key."""
    path = Path(path)
    key = new_swarm_key() if key is None else key
    data = format_swarm_key(key).encode()
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise InvalidKey(f"{path} already exists; refusing to overwrite a swarm key") from None
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return key


# -- the connection protector ---------------------------------------------------------------------


class ReadAheadStream:
    """A `ReadWriteCloser` (py-libp2p's raw byte stream) whose reads take up to `READ_SIZE` bytes from the
    socket at once, whatever the caller asked for, and hand out the pieces asked for from them.

    The security layer above reads each Noise frame as a 2-byte length and then its body (~64 KiB), and
    asked the socket for each piece: two trio socket reads per frame, each a syscall and a checkpoint.
    Writes go straight through. Anything else (addresses, ...) is delegated to the wrapped stream.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._buf: bytes | bytearray = b""  # bytes read from the socket (decrypted); [pos:end] not yet asked for
        self._pos = self._end = 0

    async def write(self, data: bytes) -> None:
        await self._inner.write(data)

    async def read(self, n: int | None = None) -> bytes:
        if n == 0:
            return b""
        if self._pos < self._end:
            return self._take(n)
        if not await self._start_reading():
            return b""
        data = await self._inner.read(max(n or 0, READ_SIZE))
        if not data:
            return b""
        self._buf, self._pos, self._end = self._received(data), 0, len(data)
        return self._take(n)

    async def _start_reading(self) -> bool:
        """Before the first read: what must be read first (False: the stream ended)."""
        return True

    def _received(self, data: bytes) -> bytes | bytearray:
        return data

    def _take(self, n: int | None) -> bytes:
        buf, pos = self._buf, self._pos
        end = self._end if n is None else min(self._end, pos + n)
        self._pos = end
        if pos == 0 and end == len(buf) and isinstance(buf, bytes):
            return buf  # all of it: no copy
        with memoryview(buf) as view:
            return bytes(view[pos:end])

    async def close(self) -> None:
        await self._inner.close()

    def detach(self) -> tuple[bytes, SocketIO] | None:
        """For a layer above that reads and writes big chunks itself (`net.wire`'s Noise session): the bytes
        read ahead and not yet asked for, and a `SocketIO` that carries on this connection's byte stream
        straight on its trio socket (through the swarm key, for a `PskStream`), with none of the wrappers'
        locks and copies in between. None where the stream below is no trio socket or the swarm key's
        nonces are not both exchanged yet. After it, this stream is only closed, never read."""
        sock = getattr(self._inner, "stream", None)
        if not isinstance(sock, trio.SocketStream):
            return None
        io = self._socket_io(sock)
        if io is None:
            return None
        leftover = self._take(None) if self._pos < self._end else b""
        self._buf, self._pos, self._end = b"", 0, 0
        return leftover, io

    def _socket_io(self, sock: trio.SocketStream) -> SocketIO | None:
        return SocketIO(sock)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class SocketIO:
    """A connection's bytes read into and written from the caller's own buffers, straight on a trio socket.
    A socket error or a reset reads as `ConnectionClosedError`; a socket closed here reads as the end (0)."""

    def __init__(self, sock: trio.SocketStream) -> None:
        self._stream = sock
        self._sock = sock.socket

    async def receive_into(self, buf: bytearray, start: int) -> int:
        """Read what the socket has (at least one byte, or 0 at its end) into buf[start:]."""
        with memoryview(buf) as view:
            try:
                n = await self._sock.recv_into(view[start:])
            except trio.ClosedResourceError:
                return 0
            except OSError as e:
                raise ConnectionClosedError(f"the connection broke: {e.strerror or e}", transport="tcp") from None
        self._received(buf, start, start + n)
        return n

    def _received(self, buf: bytearray, start: int, end: int) -> None:
        pass

    async def send_from(self, buf: bytearray, end: int) -> None:
        """Send buf[:end], all of it (the buffer may be scrambled: it is the caller's scratch)."""
        self._sending(buf, end)
        with memoryview(buf) as view:
            try:
                await self._stream.send_all(view[:end])
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise ConnectionClosedError(f"the connection broke: {e}", transport="tcp") from None

    def _sending(self, buf: bytearray, end: int) -> None:
        pass

    async def aclose(self) -> None:
        await self._stream.aclose()


class PskSocketIO(SocketIO):
    """`SocketIO` through the swarm key's XSalsa20, decrypted and encrypted in place."""

    def __init__(self, sock: trio.SocketStream, read_cipher: KeyStream, write_cipher: KeyStream) -> None:
        super().__init__(sock)
        self._read_cipher, self._write_cipher = read_cipher, write_cipher

    def _received(self, buf: bytearray, start: int, end: int) -> None:
        self._read_cipher.xor_in_place(buf, start, end)

    def _sending(self, buf: bytearray, end: int) -> None:
        self._write_cipher.xor_in_place(buf, 0, end)


class PskStream(ReadAheadStream):
    """A `ReadAheadStream` encrypted with PSK v1.

    Our nonce goes out on the first write; the peer's is read (all 24 bytes) before the first read.
    Each read-ahead is decrypted in one cipher call (about 6 % less CPU than a call per piece for a 256
    MiB stream), into one buffer per connection, reused: a fresh 256 KiB buffer per read is above malloc's
    mmap threshold, which made each one fresh pages (page faults) in a microbench.
    """

    def __init__(self, inner: Any, psk: bytes) -> None:
        if len(psk) != KEY_SIZE:
            raise InvalidKey(f"a swarm key is {KEY_SIZE} bytes, got {len(psk)}")
        _warn_without_libsodium()
        super().__init__(inner)
        self._psk = psk
        self._write_cipher: KeyStream | None = None
        self._read_cipher: KeyStream | None = None
        self._plain = bytearray()  # the reused decryption buffer

    async def write(self, data: bytes) -> None:
        if self._write_cipher is None:
            nonce = os.urandom(NONCE_SIZE)
            self._write_cipher = xsalsa20(self._psk, nonce)
            await self._inner.write(nonce + self._write_cipher.xor(data))
            return
        await self._inner.write(self._write_cipher.xor(data))

    async def _start_reading(self) -> bool:
        if self._read_cipher is None:
            nonce = b""
            while len(nonce) < NONCE_SIZE:  # ask for exactly what is missing: nothing is read past it
                more = await self._inner.read(NONCE_SIZE - len(nonce))
                if not more:
                    return False
                nonce += more
            self._read_cipher = xsalsa20(self._psk, nonce)
        return True

    def _socket_io(self, sock: trio.SocketStream) -> SocketIO | None:
        if self._read_cipher is None or self._write_cipher is None:
            return None
        return PskSocketIO(sock, self._read_cipher, self._write_cipher)

    def _received(self, data: bytes) -> bytearray:
        if len(data) > len(self._plain):
            self._plain = bytearray(max(len(data), READ_SIZE))
        assert self._read_cipher is not None
        self._read_cipher.xor_into(data, self._plain)
        return self._plain


_warned = False


def _warn_without_libsodium() -> None:
    global _warned
    if _SODIUM is None and not _warned:
        _warned = True
        log.warning("pnet: libsodium not found (Debian: libsodium23); the swarm key's XSalsa20 runs on "
                    "pycryptodome's Salsa20, about half as fast")
