"""DHT content keys for the aliases a node announces: `dht_key(alias) -> bytes`. Pure, no I/O.

A node announces *store hashes*, one provider record per alias of each root it holds (never per block).
The bytes below are the Kademlia key of the provider record (the `key` field of ADD_PROVIDER and
GET_PROVIDERS). Another implementation interoperates by computing the same bytes:

| alias                                   | DHT key                                                    |
|-----------------------------------------|------------------------------------------------------------|
| root CID (any text form `CID.parse` takes) | the CID's multihash (as IPFS keys provider records)     |
| `sha256:<64 hex>` (and every other form `parse_key` normalises to it: SRI, nix-base32, bare hex) | multihash sha2-256: `12 20 <digest>` |
| `sha512:<128 hex>` (and SRI / nix-base32 forms) | multihash sha2-512: `13 40 <digest>`               |
| `nix:<32 nix-base32 chars>` (a store path's hash part) | multihash sha2-256 of `NIX_NAMESPACE + <the 32 ASCII chars>`, i.e. `12 20 sha256(b"/p2pcache/nix-store-path/" + hash)` |
| `sha1:<40 hex>`, `sha384:<96 hex>` (lock-file hashes, recorded once verified) | multihash sha1 `11 14 <digest>` / sha2-384 `20 30 <digest>` |
| `h1:<base64>` (go.sum's dirhash of a module zip's files) | multihash sha2-256 of `GO_H1_NAMESPACE + <the alias text>` |
| `cache-ns:<namespace>` (a build-cache key namespace, UTF-8) | `12 20 sha256(b"/p2pcache/cache-namespace/" + namespace)`: providers are the nodes holding signed key records of that namespace |

Consequences worth knowing:
- `sha256:<hex>` of an archive is the same DHT key as a raw CID (codec 0x55) of the archive's bytes, since
  both are that sha2-256 multihash; a Nix NarHash (`sha256:…`) is handled the same way, so a NAR is found
  by its NarHash exactly like an archive by its sha256.
- A store path hash is a truncated 160-bit hash, not the digest of anything a peer could verify, so it is
  hashed under its own namespace: it can never collide with a content multihash.
- Keys are at most 66 bytes, well under the 128-byte key limit DHT servers enforce.

A DHT key only says "ask this peer"; nothing found through it is trusted until the exchange verifies the
blocks against the root CID (see `resolve`).
"""

from __future__ import annotations

import hashlib

from ..content import nixbase32
from ..content.keys import HashKey, RootKey, parse_key
from ..errors import InvalidKey

__all__ = ["CACHE_NS_ALIAS_PREFIX", "NIX_ALIAS_PREFIX", "NIX_NAMESPACE", "cache_ns_alias", "dht_key", "nix_alias"]

NIX_ALIAS_PREFIX = "nix:"
NIX_NAMESPACE = b"/p2pcache/nix-store-path/"
_NIX_HASH_LEN = 32
_NIX_CHARS = frozenset(nixbase32.ALPHABET)
_MULTIHASH_CODES = {"sha256": 0x12, "sha512": 0x13}
# Lock-file hashes the repo records beside sha256/sha512 (see content/lockfiles/hashes.py).
_EXTRA_HEX = {"sha1:": (0x11, 20), "sha384:": (0x20, 48)}
GO_H1_NAMESPACE = b"/p2pcache/go-h1/"
CACHE_NS_ALIAS_PREFIX = "cache-ns:"
CACHE_NAMESPACE = b"/p2pcache/cache-namespace/"


def cache_ns_alias(namespace: str) -> str:
    """The alias under which holders of a build-cache namespace's key records are announced."""
    return CACHE_NS_ALIAS_PREFIX + namespace


def nix_alias(store_path_hash: str) -> str:
    """The alias of a store path's 32-character hash part; raise InvalidKey if it is not one."""
    if len(store_path_hash) != _NIX_HASH_LEN or not set(store_path_hash) <= _NIX_CHARS:
        raise InvalidKey(
            f"{store_path_hash[:80]!r} is not a store path hash (32 characters of Nix's base32 alphabet)"
        )
    return NIX_ALIAS_PREFIX + store_path_hash


def _multihash(code: int, digest: bytes) -> bytes:
    return bytes((code, len(digest))) + digest  # both codes and lengths fit in one varint byte


def dht_key(alias: str) -> bytes:
    """The Kademlia key under which providers of `alias` are announced and looked up.

    Raises InvalidKey (one line) for anything that is not a root CID, a sha256/sha512 key or `nix:<hash>`."""
    if alias.startswith(CACHE_NS_ALIAS_PREFIX):
        digest = hashlib.sha256(CACHE_NAMESPACE + alias[len(CACHE_NS_ALIAS_PREFIX):].encode("utf-8")).digest()
        return _multihash(0x12, digest)
    if alias.startswith(NIX_ALIAS_PREFIX):
        nix_alias(alias[len(NIX_ALIAS_PREFIX):])  # validates
        digest = hashlib.sha256(NIX_NAMESPACE + alias[len(NIX_ALIAS_PREFIX):].encode("ascii")).digest()
        return _multihash(0x12, digest)
    for prefix, (code, size) in _EXTRA_HEX.items():
        if alias.startswith(prefix):
            body = alias[len(prefix):]
            if len(body) != 2 * size or not all(c in "0123456789abcdef" for c in body):
                raise InvalidKey(f"{alias[:120]!r} is not {prefix}<{2 * size} lowercase hex digits>")
            return _multihash(code, bytes.fromhex(body))
    if alias.startswith("h1:"):
        # a dirhash is not the digest of any bytes a peer sends, so it gets its own namespace
        if len(alias) != 47 or not alias.endswith("="):
            raise InvalidKey(f"{alias[:120]!r} is not h1:<base64 of 32 bytes>")
        return _multihash(0x12, hashlib.sha256(GO_H1_NAMESPACE + alias.encode("ascii")).digest())
    key = parse_key(alias)
    if isinstance(key, RootKey):
        return key.cid.multihash
    assert isinstance(key, HashKey)
    return _multihash(_MULTIHASH_CODES[key.algo], key.digest)
