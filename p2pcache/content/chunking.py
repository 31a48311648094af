"""Content-defined chunking with FastCDC (pyfastcdc's Cython FastCDC 2020).

Pure: the caller hands in an iterable of byte buffers (file reads, a decompressor's output, a network
stream) and gets chunks back; nothing here opens files. Cut points depend only on the bytes, so the same
content cuts the same way however it is split into buffers — which is what lets versions share chunks.

`ChunkerParams` are pyfastcdc's own parameters, recorded verbatim in every manifest, so a later change of
defaults leaves old manifests readable and re-chunkable with the parameters they name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal, cast

from pyfastcdc import FastCDC

from ..errors import InvalidInput

MAX_BLOCK_SIZE = 1 << 20  # our own ceiling; bitswap's hard limit is 2 MiB


@dataclass(frozen=True, slots=True)
class ChunkerParams:
    """FastCDC 2020 parameters as pyfastcdc takes them.

    Note pyfastcdc's convention: the expected chunk size is roughly ``avg_size + min_size`` because of
    cut-point skipping (FastCDC paper, section 3.4).
    """

    min_size: int = 16 * 1024
    avg_size: int = 48 * 1024
    max_size: int = 256 * 1024
    normalization: int = 1
    seed: int = 0
    algorithm: str = "fastcdc-2020"

    def validate(self) -> "ChunkerParams":
        if self.algorithm != "fastcdc-2020":
            raise InvalidInput(f"unknown chunking algorithm {self.algorithm!r}")
        if not 64 <= self.min_size <= self.avg_size <= self.max_size <= MAX_BLOCK_SIZE:
            raise InvalidInput(
                f"chunk sizes must satisfy 64 <= min <= avg <= max <= {MAX_BLOCK_SIZE}: {self}"
            )
        if self.normalization not in (0, 1, 2, 3):
            raise InvalidInput(f"normalization level must be 0..3, got {self.normalization}")
        return self

    def to_ipld(self) -> dict[str, Any]:
        return {
            "alg": self.algorithm,
            "min": self.min_size,
            "avg": self.avg_size,
            "max": self.max_size,
            "nc": self.normalization,
            "seed": self.seed,
        }

    @classmethod
    def from_ipld(cls, node: object) -> "ChunkerParams":
        if not isinstance(node, dict):
            raise InvalidInput("chunker parameters must be a map")
        try:
            return cls(
                algorithm=node["alg"],
                min_size=node["min"],
                avg_size=node["avg"],
                max_size=node["max"],
                normalization=node["nc"],
                seed=node["seed"],
            ).validate()
        except (KeyError, TypeError) as e:
            raise InvalidInput(f"chunker parameters incomplete: {e}") from None


DEFAULT_PARAMS = ChunkerParams()


class Chunker:
    """Streaming FastCDC: feed buffers, get chunks.

    Chunks yielded by `feed` and `finish` are memoryviews: into the buffer fed (bytes or a memoryview, whose
    memory the caller must leave alone while it uses them) or into a copy the chunker made.
    """

    def __init__(self, params: ChunkerParams = DEFAULT_PARAMS):
        self.params = params.validate()
        self._cdc = FastCDC(
            params.avg_size,
            min_size=params.min_size,
            max_size=params.max_size,
            normalized_chunking=cast(Literal[0, 1, 2, 3], params.normalization),  # validate() checked 0..3
            seed=params.seed,
        )
        # Pieces not cut yet. Cutting waits until several max-size chunks are pending, so tiny writes
        # never make us rescan or recopy the same bytes over and over.
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._scan_threshold = 4 * params.max_size

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[memoryview]:
        """Chunk `data` appended to what is pending. The last (possibly cut short) chunk stays pending.

        Large buffers are cut in place (chunks are views into them, no copy); only the pending tail of
        the previous buffer and the first `2 × max_size` bytes of this one are joined to find the chunk
        that straddles the boundary.
        """
        n = len(data)
        if not n:
            return
        if self._pending_len + n < self._scan_threshold:
            self._pending.append(bytes(data))
            self._pending_len += n
            return
        buf: bytes | memoryview
        if n < self._scan_threshold:
            buf, carry = b"".join(self._pending + [bytes(data)]), b""
        else:
            # bytes and memoryviews are cut in place (a caller's reused read buffer: chunks stay valid until it
            # refills it); a bytearray is copied, since it may grow under the views
            buf = data if isinstance(data, (bytes, memoryview)) else bytes(data)
            carry = b"".join(self._pending)
        self._pending, self._pending_len = [], 0
        start = 0
        if carry:
            # The chunk that crosses from `carry` into `buf` ends at most max_size past the carry, so
            # it is final: `head` holds 2 × max_size bytes of `buf` beyond the carry.
            head = carry + buf[: 2 * self.params.max_size]
            hv = memoryview(head)
            for chunk in self._cdc.cut_buf(head):
                end = chunk.offset + chunk.length
                yield hv[chunk.offset : end]
                if end >= len(carry):
                    start = end - len(carry)
                    break
        view = memoryview(buf)
        # A cut found before the end of the buffer is final: FastCDC scans forward from a chunk's start
        # and stops at the first qualifying position, so more data later cannot move it. Only the last
        # chunk may have been cut by the end of the buffer, so it stays pending.
        prev = None
        for chunk in self._cdc.cut_buf(view[start:]):
            if prev is not None:
                yield view[start + prev.offset : start + prev.offset + prev.length]
            prev = chunk
        if prev is not None:
            rest = bytes(view[start + prev.offset :])
            self._pending, self._pending_len = [rest], len(rest)

    def whole(self, data: bytes | memoryview) -> Iterator[memoryview]:
        """The chunks of `data` as one whole input of its own (nothing pending before or after it): what
        `feed(data)` then `finish()` of a new Chunker cut, without making one or copying `data` (views into
        it). For many small inputs in a row, such as the files of a build directory."""
        if self._pending:
            raise ValueError("Chunker.whole: input is pending; finish() it first")
        view = memoryview(data)
        if 0 < len(view) <= self.params.min_size:
            # FastCDC never cuts before min_size: one chunk, without a pass through the cutter (most files
            # of a build directory are this small; the cutter's setup is a good part of their cost)
            yield view
            return
        for chunk in self._cdc.cut_buf(view):
            yield view[chunk.offset : chunk.offset + chunk.length]

    def finish(self) -> Iterator[memoryview]:
        """Chunk what is pending at end of input."""
        buf = b"".join(self._pending)
        self._pending, self._pending_len = [], 0
        if buf:
            view = memoryview(buf)
            for chunk in self._cdc.cut_buf(buf):
                yield view[chunk.offset : chunk.offset + chunk.length]


def chunk_buffers(buffers: Iterable[bytes], params: ChunkerParams = DEFAULT_PARAMS) -> Iterator[memoryview]:
    chunker = Chunker(params)
    for buf in buffers:
        yield from chunker.feed(buf)
    yield from chunker.finish()
