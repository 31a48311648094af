"""Hashes as lock files write them, normalised to `DepHash(algo, digest)`. Pure: no I/O.

Lock files spell hashes many ways: SRI (`sha512-<base64>`, npm, yarn, pnpm; several separated by
spaces), `sha256:<hex>` (uv, poetry), `sha256=<hex>` (Bundler), bare hex (Cargo), `h1:<base64>` (go.sum).
`h1` is Go's dirhash: the sha256 of a summary of the files inside a module zip, not a hash of the zip's
bytes (see `content/gomod.py`).

Every `DepHash` has an `alias`, the string the repo's index stores it under: `sha256:<hex>` and
`sha512:<hex>` are the repo's own aliases of every archive; `sha1:<hex>`, `sha384:<hex>` and `h1:<base64>`
are recorded beside them once an archive has been verified against such a hash.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import NamedTuple

from ...errors import InvalidInput

# Algorithm -> digest size. h1 is a sha256 digest over a file summary (Go's dirhash "h1").
SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64, "h1": 32}
# Strongest first: which of several SRI hashes in one `integrity` field is kept.
_STRENGTH = ("sha512", "sha384", "sha256", "sha1")
# Algorithms Nix's fetchurl accepts (and its hashed mirrors serve under /<algo>/<hex>).
NIX_ALGOS = ("sha1", "sha256", "sha512")

_HEX = re.compile(r"[0-9a-fA-F]+")


class UnknownHash(InvalidInput):
    """A hash in an algorithm or encoding this node cannot verify: that dependency fails, the rest go on."""


class DepHash(NamedTuple):
    algo: str
    digest: bytes

    @property
    def alias(self) -> str:
        if self.algo == "h1":
            return "h1:" + base64.b64encode(self.digest).decode()
        return f"{self.algo}:{self.digest.hex()}"

    @property
    def sri(self) -> str:
        return f"{self.algo}-{base64.b64encode(self.digest).decode()}"

    def __str__(self) -> str:
        return self.sri if self.algo != "h1" else self.alias


def _check(algo: str, digest: bytes, text: str) -> DepHash:
    if len(digest) != SIZES[algo]:
        raise UnknownHash(f"{text[:100]!r}: a {algo} digest has {SIZES[algo]} bytes, this one {len(digest)}")
    return DepHash(algo, digest)


def _b64(body: str, text: str) -> bytes:
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise UnknownHash(f"{text[:100]!r} is not valid base64") from None


def from_hex(algo: str, body: str) -> DepHash:
    if algo not in SIZES or algo == "h1":
        raise UnknownHash(f"unknown hash algorithm {algo[:20]!r} (known: sha1, sha256, sha384, sha512)")
    if not _HEX.fullmatch(body or ""):
        raise UnknownHash(f"{algo} hash {body[:100]!r} is not hex")
    return _check(algo, bytes.fromhex(body), body)


def parse_sri(text: str) -> DepHash:
    """One SRI integrity string; several space-separated hashes → the strongest known one."""
    found: dict[str, DepHash] = {}
    unknown = []
    for item in text.split():
        algo, sep, body = item.partition("-")
        body = body.split("?", 1)[0]  # SRI options (`?opt`) are not part of the digest
        if not sep or algo not in SIZES or algo == "h1":
            unknown.append(item)
            continue
        found[algo] = _check(algo, _b64(body, item), item)
    for algo in _STRENGTH:
        if algo in found:
            return found[algo]
    shown = unknown[0][:60] if unknown else text[:60]
    raise UnknownHash(f"integrity {shown!r}: unknown hash algorithm (known: sha1, sha256, sha384, sha512)")


def parse_prefixed(text: str, sep: str = ":") -> DepHash:
    """`sha256:<hex>` (uv, poetry), `sha256=<hex>` (Bundler, with sep='='), `h1:<base64>` (go.sum)."""
    algo, found, body = text.partition(sep)
    if not found:
        raise UnknownHash(f"hash {text[:100]!r} has no algorithm prefix")
    if algo == "h1" and sep == ":":
        return _check("h1", _b64(body, text), text)
    return from_hex(algo.lower(), body)
