"""Artifacts for simulated fetches: real bytes for small runs, deterministic synthetic blocks for big ones.

Owns: building an archive (a real `ArchiveManifest` tree from `p2pcache.content.manifest`, always real
dag-cbor bytes) whose chunks are either
- `real`: bytes derived from the seed, cut by the project's FastCDC chunker, CIDs the SHA-256 of the
  bytes; every received block is re-hashed by the real `message.decode`; or
- `synthetic`: fixed-size chunks represented by a `SyntheticData` descriptor (seed, index, size) that
  *stands for* bytes derivable from it (`materialise()`), with a CID whose digest is the SHA-256 of the
  descriptor. A 1 GiB artifact on 1,000 nodes then costs a few hundred bytes per block held, and a
  received block is "verified" by recomputing its CID from the descriptor, not by hashing bytes.
  Results from this mode are reported with `payload: synthetic`.

It must not move anything; `SimBlockStore` is the `BlockSource` the real `BitswapServer` reads.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from p2pcache.content.chunking import ChunkerParams, chunk_buffers
from p2pcache.content.cid import CID, RAW
from p2pcache.content.manifest import ManifestBuilder

__all__ = ["Artifact", "SimBlockStore", "SyntheticData", "build_artifact", "cid_of"]


@dataclass(frozen=True, slots=True)
class SyntheticData:
    """`size` bytes that exist only as a recipe. `variant != 0` is what a corrupting peer sends."""

    seed: int
    index: int
    size: int
    variant: int = 0

    def __len__(self) -> int:
        return self.size

    def materialise(self) -> bytes:
        return hashlib.shake_256(f"simnet/{self.seed}/{self.index}/{self.variant}".encode()).digest(self.size)

    def corrupted(self) -> "SyntheticData":
        return SyntheticData(self.seed, self.index, self.size, self.variant + 1)


def cid_of(data: bytes | SyntheticData, codec: int = RAW) -> CID:
    """The CID a receiver computes for `data`: SHA-256 of the bytes, or of a synthetic descriptor."""
    if isinstance(data, SyntheticData):
        return CID.from_digest(
            codec, hashlib.sha256(f"synthetic/{data.seed}/{data.index}/{data.size}/{data.variant}".encode()).digest()
        )
    return CID.for_block(codec, data)


@dataclass
class Artifact:
    root: CID
    size: int
    blocks: dict[CID, bytes | SyntheticData]  # every block of the archive: manifest nodes and chunks
    chunks: int
    payload: str  # "real" | "synthetic"

    @property
    def manifest_blocks(self) -> int:
        return len(self.blocks) - self.chunks


def build_artifact(size: int, seed: int, payload: str, block_size: int = 1 << 20) -> Artifact:
    """An archive of `size` bytes. `real`: FastCDC with the project's default parameters over
    seed-derived bytes; `synthetic`: fixed `block_size` chunks that are descriptors."""
    blocks: dict[CID, bytes | SyntheticData] = {}
    if payload == "real":
        params = ChunkerParams()
        rng = random.Random(seed)
        data = rng.randbytes(size)
        builder = ManifestBuilder(params)
        chunks = 0
        for piece in chunk_buffers([data], params):
            chunk = bytes(piece)
            cid = CID.for_block(RAW, chunk)
            if cid not in blocks:
                blocks[cid] = chunk
                chunks += 1
            for c, b in builder.add_chunk(cid, len(chunk)):
                blocks[c] = b
        hashes = {"sha256": hashlib.sha256(data).digest(), "sha512": hashlib.sha512(data).digest()}
    elif payload == "synthetic":
        params = ChunkerParams(min_size=block_size, avg_size=block_size, max_size=block_size)
        builder = ManifestBuilder(params)
        chunks = 0
        left, index = size, 0
        while left > 0:
            n = min(block_size, left)
            d = SyntheticData(seed, index, n)
            cid = cid_of(d)
            blocks[cid] = d
            chunks += 1
            for c, b in builder.add_chunk(cid, n):
                blocks[c] = b
            left -= n
            index += 1
        recipe = f"synthetic-archive/{seed}/{size}/{block_size}".encode()
        hashes = {"sha256": hashlib.sha256(recipe).digest(), "sha512": hashlib.sha512(recipe).digest()}
    else:
        raise ValueError(f"payload must be 'real' or 'synthetic', not {payload!r}")
    root, root_bytes, rest = builder.finish(size, hashes, name=f"simnet-{seed}")
    for c, b in rest:
        blocks[c] = b
    blocks[root] = root_bytes
    return Artifact(root, size, blocks, chunks, payload)


@dataclass
class SimBlockStore:
    """An in-memory store of verified blocks; the real server engine's `BlockSource`."""

    blocks: dict[CID, bytes | SyntheticData] = field(default_factory=dict)

    def has(self, cid: CID) -> bool:
        return cid in self.blocks

    def size(self, cid: CID) -> int | None:
        d = self.blocks.get(cid)
        if d is None:
            return None
        return d.size if type(d) is SyntheticData else len(d)  # (`len` of a descriptor is a Python call)

    def get(self, cid: CID) -> bytes | SyntheticData | None:
        return self.blocks.get(cid)
