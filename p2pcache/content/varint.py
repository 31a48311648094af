"""Unsigned LEB128 varints as multiformats use them (CIDs, multihashes, length-prefixed messages).

Pure. Decoding is strict: at most 9 bytes (63 bits, the multiformats limit) and minimal encodings only;
callers turn `ValueError` into their own error type.
"""

from __future__ import annotations

MAX_BYTES = 9


_ONE_BYTE = tuple(bytes((i,)) for i in range(0x80))


def encode(n: int) -> bytes:
    if n < 0:
        raise ValueError(f"uvarint of a negative number: {n}")
    if n < 0x80:
        return _ONE_BYTE[n]
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def decode(buf: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int]:
    """(value, position after it) of the varint at `pos`."""
    if pos < len(buf) and buf[pos] < 0x80:
        return buf[pos], pos + 1  # one byte: most of them (frame fields, codecs, CID lengths)
    value = shift = 0
    for i in range(pos, min(len(buf), pos + MAX_BYTES)):
        b = buf[i]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            if b == 0 and i > pos:
                raise ValueError("non-minimal varint")
            return value, i + 1
        shift += 7
    raise ValueError("truncated or overlong varint")
