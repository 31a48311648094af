"""Private networks: kubo's `swarm.key` file and the libp2p PSK v1 connection protector.

Owns: reading, writing and generating swarm keys (`/key/swarm/psk/1.0.0/` + `/base16/` + 64 hex
digits, the format kubo and js-libp2p read), and wrapping a raw TCP connection so that everything on
it after the nonces is XSalsa20-encrypted with the key, as libp2p's pnet spec (PSK v1) says: each side
sends a random 24-byte nonce first, writes with XSalsa20(psk, own nonce) and reads with
XSalsa20(psk, peer's nonce). A peer with another key (or none) sees noise, so its security handshake
fails and the connection closes before any protocol runs.

Why not py-libp2p's own `psk=` option: it uses Salsa20 with an 8-byte nonce, which no other libp2p
implementation speaks, so a py-libp2p pnet node could never join a kubo or js-libp2p private network.
XSalsa20 is built here from HSalsa20 (a few microseconds of pure Python, once per connection) and
pycryptodome's Salsa20 (C, what py-libp2p already depends on).

It must not decide who may connect beyond "knows the key": peer allowlists are the host's job.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Any

from Crypto.Cipher import Salsa20

from ..errors import InvalidKey

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


def xsalsa20(key: bytes, nonce24: bytes) -> Any:
    """A keystream cipher object (`.encrypt(data)`, stateful) for XSalsa20(key, nonce24)."""
    if len(nonce24) != NONCE_SIZE:
        raise ValueError("xsalsa20 takes a 24-byte nonce")
    return Salsa20.new(key=hsalsa20(key, nonce24[:16]), nonce=nonce24[16:])


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


class PskStream:
    """A `ReadWriteCloser` (py-libp2p's raw byte stream) encrypted with PSK v1.

    Our nonce goes out on the first write; the peer's is read (all 24 bytes) before the first read.
    Reads take up to `READ_SIZE` bytes from the socket at once and decrypt them in one call, whatever
    the caller asked for: the security layer above reads each frame as a 2-byte length and then its
    body, which was a socket read and a cipher call per piece (about 6 % less CPU for a 256 MiB
    stream read that way; the cipher itself, ~1 GB/s, is the rest).
    Anything else (addresses, ...) is delegated to the wrapped stream.
    """

    def __init__(self, inner: Any, psk: bytes) -> None:
        if len(psk) != KEY_SIZE:
            raise InvalidKey(f"a swarm key is {KEY_SIZE} bytes, got {len(psk)}")
        self._inner = inner
        self._psk = psk
        self._write_cipher: Any = None
        self._read_cipher: Any = None
        self._buf = b""  # decrypted bytes read from the socket and not yet asked for
        self._pos = 0

    async def write(self, data: bytes) -> None:
        if self._write_cipher is None:
            nonce = os.urandom(NONCE_SIZE)
            self._write_cipher = xsalsa20(self._psk, nonce)
            await self._inner.write(nonce + self._write_cipher.encrypt(bytes(data)))
            return
        await self._inner.write(self._write_cipher.encrypt(bytes(data)))

    async def read(self, n: int | None = None) -> bytes:
        if n == 0:
            return b""
        if self._pos < len(self._buf):
            return self._take(n)
        if self._read_cipher is None:
            nonce = b""
            while len(nonce) < NONCE_SIZE:  # ask for exactly what is missing: nothing is read past it
                more = await self._inner.read(NONCE_SIZE - len(nonce))
                if not more:
                    return b""
                nonce += more
            self._read_cipher = xsalsa20(self._psk, nonce)
        data = await self._inner.read(max(n or 0, READ_SIZE))
        if not data:
            return b""
        self._buf, self._pos = self._read_cipher.decrypt(data), 0
        return self._take(n)

    def _take(self, n: int | None) -> bytes:
        buf, pos = self._buf, self._pos
        end = len(buf) if n is None else min(len(buf), pos + n)
        self._pos = end
        if pos == 0 and end == len(buf):
            self._buf = b""
            return buf
        if end == len(buf):
            self._buf, self._pos = b"", 0
        return buf[pos:end]

    async def close(self) -> None:
        await self._inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
