"""Keys a user can ask for, and the alias strings the index stores for them.

All of these name the same archive:
- its root CID (base32 CIDv1, or any multibase / CIDv0 on input);
- `sha256:<hex>`, `sha512:<hex>` (also bare 64-hex for sha256);
- SRI: `sha256-<base64>`, `sha512-<base64>`;
- Nix forms: `sha256:<nix-base32>` (52 chars, also bare), `sha512:<nix-base32>`, `sha256:<base64>`.

Hash keys are normalised to the alias `<algo>:<lowercase hex>`, which is what the index stores.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from ..errors import InvalidCID, InvalidKey
from . import nixbase32
from .cid import CID

HASH_SIZES = {"sha256": 32, "sha512": 64}


@dataclass(frozen=True, slots=True)
class HashKey:
    algo: str
    digest: bytes

    @property
    def alias(self) -> str:
        return f"{self.algo}:{self.digest.hex()}"

    @property
    def sri(self) -> str:
        return f"{self.algo}-{base64.b64encode(self.digest).decode()}"

    @property
    def nix32(self) -> str:
        return f"{self.algo}:{nixbase32.encode(self.digest)}"

    def __str__(self) -> str:
        return self.alias


@dataclass(frozen=True, slots=True)
class RootKey:
    cid: CID

    def __str__(self) -> str:
        return str(self.cid)


Key = HashKey | RootKey

_HEX = re.compile(r"[0-9a-fA-F]+")


def _digest_from_text(algo: str, text: str, original: str) -> bytes:
    size = HASH_SIZES[algo]
    if len(text) == 2 * size and _HEX.fullmatch(text):
        return bytes.fromhex(text)
    if len(text) == nixbase32.encoded_length(size):
        try:
            return nixbase32.decode(text, size)
        except nixbase32.InvalidNixBase32:
            pass
    try:
        digest = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) == size:
        return digest
    raise InvalidKey(f"{original!r} is not a valid {algo} hash (expected hex, nix-base32 or base64 of {size} bytes)")


def parse_key(text: str) -> Key:
    """Parse any supported key form; raise `InvalidKey` with a one-line reason otherwise."""
    original = text
    text = text.strip()
    if not text:
        raise InvalidKey("empty key")
    for algo in HASH_SIZES:
        for sep in (":", "-"):
            if text.lower().startswith(algo + sep):
                body = text[len(algo) + 1 :]
                if sep == "-":  # SRI is always base64
                    try:
                        digest = base64.b64decode(body, validate=True)
                    except (binascii.Error, ValueError):
                        raise InvalidKey(f"{original!r} is not valid SRI base64") from None
                    if len(digest) != HASH_SIZES[algo]:
                        raise InvalidKey(f"{original!r}: SRI {algo} digest must be {HASH_SIZES[algo]} bytes")
                    return HashKey(algo, digest)
                return HashKey(algo, _digest_from_text(algo, body, original))
    if len(text) == 64 and _HEX.fullmatch(text):
        return HashKey("sha256", bytes.fromhex(text))
    if len(text) == nixbase32.encoded_length(32) and all(c in nixbase32.ALPHABET for c in text):
        try:
            return HashKey("sha256", nixbase32.decode(text, 32))
        except nixbase32.InvalidNixBase32:
            pass
    try:
        return RootKey(CID.parse(text))
    except InvalidCID:
        raise InvalidKey(
            f"{original!r} is not a key: use a root CID, sha256:<hex>, an SRI hash (sha256-… / sha512-…) "
            "or a nix-base32 sha256"
        ) from None
