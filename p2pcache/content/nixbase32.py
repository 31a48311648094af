"""Nix's base32: its own alphabet (no e, o, u, t) and its own byte order (least significant bits first,
printed from the last character backwards), as in Nix's `printHash32` / `parseHash32`.
"""

from __future__ import annotations

from ..errors import InvalidInput

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_INDEX = {c: i for i, c in enumerate(ALPHABET)}


class InvalidNixBase32(InvalidInput):
    pass


def encoded_length(nbytes: int) -> int:
    return (nbytes * 8 - 1) // 5 + 1 if nbytes else 0


def encode(data: bytes) -> str:
    n = encoded_length(len(data))
    value = int.from_bytes(data, "little")
    # Character i (counting from the end of the string) holds bits 5*i .. 5*i+4 of the little-endian value.
    return "".join(ALPHABET[(value >> (5 * i)) & 0x1F] for i in range(n - 1, -1, -1))


def decode(text: str, nbytes: int | None = None) -> bytes:
    """Decode `text`; `nbytes` defaults to the largest byte count whose encoding has this length."""
    if nbytes is None:
        nbytes = len(text) * 5 // 8
    if encoded_length(nbytes) != len(text):
        raise InvalidNixBase32(f"nix-base32 string of length {len(text)} cannot hold {nbytes} bytes")
    value = 0
    for ch in text:
        try:
            value = (value << 5) | _INDEX[ch]
        except KeyError:
            raise InvalidNixBase32(f"invalid character {ch!r} in nix-base32 string {text!r}") from None
    if value >> (8 * nbytes):
        raise InvalidNixBase32(f"nix-base32 string {text!r} has non-zero padding bits")
    return value.to_bytes(nbytes, "little")
