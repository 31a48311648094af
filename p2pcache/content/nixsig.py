"""Nix binary-cache signatures: ed25519 keys and signatures in Nix's `name:base64` text forms.

Owns:
- secret keys as written by `nix-store --generate-binary-cache-key` (`name:base64(seed || public key)`, the
  64-byte libsodium layout) and public keys (`name:base64(32-byte key)`);
- signatures as in a narinfo `Sig:` line (`name:base64(64-byte ed25519 signature)`);
- the fingerprint Nix signs: `1;<store path>;<nar hash as sha256:nix32>;<nar size>;<refs>`, refs being the
  full store paths of the references, sorted and comma-separated.

Pure apart from key generation drawing randomness. A malformed key or signature line raises
`InvalidSignature`; a well-formed signature that does not verify is a `False` from `verify`, never an error.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from ..errors import InvalidInput
from .nixhash import NixHash
from .nixhash import parse as parse_hash

__all__ = [
    "InvalidSignature",
    "PublicKey",
    "SecretKey",
    "Signature",
    "fingerprint",
    "generate_key_pair",
    "verify_any",
]


class InvalidSignature(InvalidInput):
    """A key or signature line that is not in Nix's `name:base64` form."""


def _show(text: str) -> str:
    return repr(text if len(text) <= 120 else text[:120] + "...")


def _check_key_name(name: str, what: str, line: str, *, secret: bool = False) -> None:
    # Nix splits at the first ':'; names with whitespace could never appear in `trusted-public-keys`.
    if not name or any(c.isspace() or ord(c) < 0x20 for c in name):
        shown = "" if secret else f" {_show(line)}"
        raise InvalidSignature(f"{what}{shown} has an empty or malformed key name; expected 'name:base64'")


def _split(line: str, what: str, size: int, *, secret: bool = False) -> tuple[str, bytes]:
    if not isinstance(line, str):
        raise InvalidSignature(f"{what} must be a string, got {type(line).__name__}")
    line = line.strip()  # key files may end with a newline
    shown = "" if secret else f" {_show(line)}"
    name, colon, payload = line.partition(":")
    if not colon:
        raise InvalidSignature(f"{what}{shown} has no ':'; expected 'name:base64'")
    _check_key_name(name, what, line, secret=secret)
    try:
        raw = base64.b64decode(payload.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise InvalidSignature(f"{what}{shown} is not valid base64 after the key name") from None
    if len(raw) != size:
        raise InvalidSignature(f"{what}{shown} holds {len(raw)} bytes, expected {size}")
    return name, raw


@dataclass(frozen=True, slots=True)
class Signature:
    """A detached ed25519 signature and the name of the key that made it."""

    key_name: str
    sig: bytes

    @classmethod
    def parse(cls, line: str) -> Signature:
        return cls(*_split(line, "signature", 64))

    def __str__(self) -> str:
        return f"{self.key_name}:{base64.b64encode(self.sig).decode('ascii')}"


@dataclass(frozen=True, slots=True)
class PublicKey:
    name: str
    key: bytes
    _verifier: Ed25519PublicKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_key_name(self.name, "public key", self.name)
        if len(self.key) != 32:
            raise InvalidSignature(f"public key {self.name!r} must be 32 bytes, got {len(self.key)}")
        object.__setattr__(self, "_verifier", Ed25519PublicKey.from_public_bytes(self.key))

    @classmethod
    def parse(cls, line: str) -> PublicKey:
        """Parse `name:base64` as found in `trusted-public-keys` or a `.pub` file."""
        return cls(*_split(line, "public key", 32))

    def verify(self, message: str | bytes, signature: Signature | str) -> bool:
        """True iff `signature` is by this key (same name) over `message`."""
        if isinstance(signature, str):
            signature = Signature.parse(signature)
        if signature.key_name != self.name:
            return False
        data = message.encode() if isinstance(message, str) else message
        try:
            self._verifier.verify(signature.sig, data)
        except _CryptoInvalidSignature:
            return False
        return True

    def __str__(self) -> str:
        return f"{self.name}:{base64.b64encode(self.key).decode('ascii')}"


@dataclass(frozen=True, slots=True)
class SecretKey:
    name: str
    seed: bytes = field(repr=False)
    _signer: Ed25519PrivateKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_key_name(self.name, "secret key", self.name)
        if len(self.seed) != 32:
            raise InvalidSignature(f"secret key {self.name!r} seed must be 32 bytes, got {len(self.seed)}")
        object.__setattr__(self, "_signer", Ed25519PrivateKey.from_private_bytes(self.seed))

    @classmethod
    def parse(cls, line: str) -> SecretKey:
        """Parse a secret key file's content: `name:base64(seed || public key)` (64 bytes, libsodium layout)."""
        name, raw = _split(line, "secret key", 64, secret=True)
        key = cls(name, raw[:32])
        if key.public_key().key != raw[32:]:
            raise InvalidSignature(f"secret key {name!r} is corrupt: its public half does not match its seed")
        return key

    @classmethod
    def generate(cls, name: str) -> SecretKey:
        signer = Ed25519PrivateKey.generate()
        return cls(name, signer.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))

    def public_key(self) -> PublicKey:
        return PublicKey(self.name, self._signer.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    def sign(self, message: str | bytes) -> Signature:
        data = message.encode() if isinstance(message, str) else message
        return Signature(self.name, self._signer.sign(data))

    def __str__(self) -> str:
        """The secret key file's content (no trailing newline, as Nix writes it)."""
        raw = self.seed + self.public_key().key
        return f"{self.name}:{base64.b64encode(raw).decode('ascii')}"


def generate_key_pair(name: str) -> tuple[SecretKey, PublicKey]:
    key = SecretKey.generate(name)
    return key, key.public_key()


def fingerprint(store_path: str, nar_hash: NixHash | str, nar_size: int, references: Iterable[str]) -> str:
    """The string Nix signs for a store path: references are full store paths; they are sorted and
    de-duplicated here as Nix's path sets are. The NAR hash is printed as `<algo>:<nix32>` whatever form it
    was given in."""
    if isinstance(nar_hash, str):
        nar_hash = parse_hash(nar_hash)
    if isinstance(nar_size, bool) or not isinstance(nar_size, int) or nar_size <= 0:
        raise InvalidInput(f"cannot make the fingerprint of {store_path!r}: NAR size {nar_size!r} is not positive")
    refs = sorted(set(references))
    return f"1;{store_path};{nar_hash.nix32()};{nar_size};{','.join(refs)}"


def verify_any(message: str | bytes, signatures: Iterable[Signature | str], keys: Iterable[PublicKey]) -> bool:
    """True iff some signature verifies under the public key of the same name (as Nix's checkSignatures)."""
    by_name = {k.name: k for k in keys}
    for sig in signatures:
        if isinstance(sig, str):
            sig = Signature.parse(sig)
        key = by_name.get(sig.key_name)
        if key is not None and key.verify(message, sig):
            return True
    return False
