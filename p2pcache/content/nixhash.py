"""Hashes as Nix prints and accepts them: `algo:<nix32>`, `algo:<base16>`, `algo:<base64>` and SRI `algo-<base64>`.

Owns parsing such strings to `NixHash(algo, digest)` and printing a `NixHash` in each form. Pure: no I/O, no
hashing of data beyond `NixHash.of(bytes)`, which is a convenience for tests and small inputs.

Which encoding a prefixed string uses is told apart by its length, as Nix does: for a given algorithm the
base16, nix-base32 and base64 lengths all differ. Parsing is strict: base64 must be canonical (padding present,
unused bits zero) and nix-base32 must have zero padding bits, so that every digest has exactly one spelling per
form. Base16 accepts upper case on input and is printed in lower case, like Nix.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from ..errors import InvalidInput
from . import nixbase32

__all__ = ["ALGORITHMS", "InvalidNixHash", "NixHash", "parse"]


class InvalidNixHash(InvalidInput):
    pass


# Algorithm name -> digest size in bytes: the algorithms Nix's `Hash` knows.
ALGORITHMS: dict[str, int] = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}

_HEX = frozenset("0123456789abcdefABCDEF")


def _b64_len(n: int) -> int:
    return (n + 2) // 3 * 4


@dataclass(frozen=True, slots=True)
class NixHash:
    """A digest and the name of the algorithm that made it."""

    algo: str
    digest: bytes

    def __post_init__(self) -> None:
        size = ALGORITHMS.get(self.algo)
        if size is None:
            raise InvalidNixHash(f"unknown hash algorithm {self.algo!r}; expected one of {', '.join(ALGORITHMS)}")
        if len(self.digest) != size:
            raise InvalidNixHash(f"{self.algo} digest must be {size} bytes, got {len(self.digest)}")

    @classmethod
    def of(cls, data: bytes, algo: str = "sha256") -> NixHash:
        if algo not in ALGORITHMS:
            raise InvalidNixHash(f"unknown hash algorithm {algo!r}; expected one of {', '.join(ALGORITHMS)}")
        return cls(algo, hashlib.new(algo, data).digest())

    @classmethod
    def parse(cls, text: str, algo: str | None = None) -> NixHash:
        return parse(text, algo)

    def nix32(self, prefixed: bool = True) -> str:
        """`sha256:<nix-base32>`, the form Nix writes in narinfo files and signature fingerprints."""
        body = nixbase32.encode(self.digest)
        return f"{self.algo}:{body}" if prefixed else body

    def base16(self, prefixed: bool = True) -> str:
        body = self.digest.hex()
        return f"{self.algo}:{body}" if prefixed else body

    def base64(self, prefixed: bool = True) -> str:
        body = base64.b64encode(self.digest).decode("ascii")
        return f"{self.algo}:{body}" if prefixed else body

    def sri(self) -> str:
        """Subresource-integrity form `sha256-<base64>`."""
        return f"{self.algo}-{base64.b64encode(self.digest).decode('ascii')}"

    def __str__(self) -> str:
        return self.nix32()


def _decode_body(algo: str, body: str, whole: str, *, sri: bool) -> bytes:
    size = ALGORITHMS[algo]
    n = len(body)
    if not sri and n == size * 2:
        if not _HEX.issuperset(body):
            raise InvalidNixHash(f"hash {whole!r} is not valid base16")
        return bytes.fromhex(body)
    if not sri and n == nixbase32.encoded_length(size):
        try:
            return nixbase32.decode(body, size)
        except nixbase32.InvalidNixBase32 as e:
            raise InvalidNixHash(f"hash {whole!r} is not valid nix-base32: {e}") from None
    if n == _b64_len(size):
        try:
            digest = base64.b64decode(body.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise InvalidNixHash(f"hash {whole!r} is not valid base64") from None
        # b64decode ignores non-zero unused bits; insist on the one canonical spelling.
        if len(digest) != size or base64.b64encode(digest).decode("ascii") != body:
            raise InvalidNixHash(f"hash {whole!r} is not canonical base64 of a {algo} digest")
        return digest
    forms = "base64" if sri else "base16, nix-base32 or base64"
    raise InvalidNixHash(f"hash {whole!r} has length {n}, which is not {forms} of a {size}-byte {algo} digest")


def parse(text: str, algo: str | None = None) -> NixHash:
    """Parse `algo:<body>` (body in base16, nix-base32 or base64) or SRI `algo-<base64>`.

    A bare body (no prefix) is accepted only when `algo` is given; when both are present they must agree.
    """
    if not isinstance(text, str):
        raise InvalidNixHash(f"hash must be a string, got {type(text).__name__}")
    shown = text if len(text) <= 200 else text[:200] + "..."
    colon = text.find(":")
    dash = text.find("-")
    if colon != -1 and (dash == -1 or colon < dash):
        name, body, sri = text[:colon], text[colon + 1 :], False
    elif dash != -1:
        name, body, sri = text[:dash], text[dash + 1 :], True
    elif algo is not None:
        name, body, sri = algo, text, False
    else:
        raise InvalidNixHash(f"hash {shown!r} has no algorithm prefix; write it as 'sha256:...' or 'sha256-...'")
    if name not in ALGORITHMS:
        raise InvalidNixHash(f"hash {shown!r} names unknown algorithm {name[:20]!r}; expected one of {', '.join(ALGORITHMS)}")
    if algo is not None and name != algo:
        raise InvalidNixHash(f"hash {shown!r} is {name}, expected {algo}")
    return NixHash(name, _decode_body(name, body, shown, sri=sri))
