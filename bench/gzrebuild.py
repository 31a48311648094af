"""Can a .gz file be rebuilt bit-for-bit from its decompressed bytes plus a tiny recipe?

Storing the *decompressed* stream of a .tar.gz dedups far better (compression smears every change
over the rest of the stream), but a cache must hand back exactly the bytes it was given.  This
module finds, for one gzip file, a recipe such that::

    gzip_header_bytes + deflate(raw, recipe) + crc32(raw) + len(raw) == original

The recipe is the verbatim gzip header (10 bytes plus the optional FNAME/FEXTRA/FCOMMENT/FHCRC
fields; ~10-40 bytes) and the deflate parameters.  Candidates tried:

* CPython's zlib (``zlib.compressobj(level, DEFLATED, -15, memLevel, strategy)``), levels 9..1,
  memLevel 8 (``DEF_MEM_LEVEL``, what CPython's ``gzip`` and ``tarfile`` use -- this covers
  setuptools/distutils ``make_tarball``, hatchling, flit, ``python -m build``) and memLevel 9
  (zlib's maximum; ``MAX_MEM_LEVEL``), default strategy, raw deflate with a 32 KiB window.
  The level suggested by the header's XFL byte (2 = best, 4 = fastest) is tried first.
* GNU gzip (the ``gzip`` binary, its own deflate implementation, not zlib), levels 9..1, if
  installed.  GNU gzip writes OS=3; CPython writes OS=255.

Only single-member gzip files without trailing bytes are handled; anything else is reported as
unsupported.  Probing compresses only the first ``PROBE`` bytes per candidate: zlib emits finished
deflate blocks as it goes, so the output of ``compress()`` before ``flush()`` is a prefix of the
final stream and a mismatch there rules the candidate out cheaply.  Only a matching candidate is
run over the whole input and compared byte-for-byte.

Note the result depends on the zlib build: a different zlib (e.g. zlib-ng, as some distributions
ship) can produce different, equally valid deflate streams.  The recipe therefore records
``zlib.ZLIB_RUNTIME_VERSION``.
"""

from __future__ import annotations

import dataclasses
import shutil
import struct
import subprocess
import zlib
from typing import Iterable, List, Optional, Tuple

PROBE = 1 << 20

FTEXT, FHCRC, FEXTRA, FNAME, FCOMMENT = 1, 2, 4, 8, 16


@dataclasses.dataclass(frozen=True)
class GzipHeader:
    raw: bytes  # verbatim header bytes
    flags: int
    mtime: int
    xfl: int
    os: int
    fname: Optional[bytes]


@dataclasses.dataclass(frozen=True)
class Recipe:
    header: bytes
    impl: str  # "zlib" or "gnu-gzip"
    level: int
    mem_level: int = 8
    wbits: int = -15
    strategy: int = 0
    zlib_version: str = zlib.ZLIB_RUNTIME_VERSION

    def describe(self) -> str:
        if self.impl == "zlib":
            return (f"zlib {self.zlib_version} level={self.level} memLevel={self.mem_level} "
                    f"wbits={self.wbits} strategy={self.strategy}")
        return f"GNU gzip -{self.level}"

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["header"] = self.header.hex()
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Recipe":
        d = dict(d)
        d["header"] = bytes.fromhex(d["header"])
        return cls(**d)


def parse_header(data: bytes) -> GzipHeader:
    if len(data) < 18 or data[:3] != b"\x1f\x8b\x08":
        raise ValueError("not a gzip (deflate) file")
    flags, mtime, xfl, os_ = struct.unpack_from("<BIBB", data, 3)
    if flags & 0xE0:
        raise ValueError("reserved gzip flag bits set")
    pos = 10
    if flags & FEXTRA:
        (xlen,) = struct.unpack_from("<H", data, pos)
        pos += 2 + xlen
    fname = None
    if flags & FNAME:
        end = data.index(b"\0", pos)
        fname = data[pos:end]
        pos = end + 1
    if flags & FCOMMENT:
        pos = data.index(b"\0", pos) + 1
    if flags & FHCRC:
        pos += 2
    return GzipHeader(data[:pos], flags, mtime, xfl, os_, fname)


def split_gzip(data: bytes) -> Tuple[GzipHeader, bytes, bytes]:
    """Return (header, deflate body, raw data) of a single-member gzip file.

    Raises ValueError for multi-member files, trailing bytes, or a bad CRC/ISIZE.
    """
    hdr = parse_header(data)
    d = zlib.decompressobj(-15)
    raw = d.decompress(data[len(hdr.raw):])
    if not d.eof:
        raise ValueError("truncated deflate stream")
    tail = d.unused_data
    if len(tail) < 8:
        raise ValueError("truncated gzip trailer")
    crc, isize = struct.unpack_from("<II", tail)
    if crc != zlib.crc32(raw) or isize != (len(raw) & 0xFFFFFFFF):
        raise ValueError("gzip trailer does not match data")
    if len(tail) > 8:
        if tail[8:10] == b"\x1f\x8b":
            raise ValueError("multi-member gzip")
        raise ValueError(f"{len(tail) - 8} trailing bytes after gzip member")
    body = data[len(hdr.raw):len(data) - len(tail)]
    return hdr, body, raw


def _zlib_candidates(hdr: GzipHeader) -> List[Recipe]:
    levels = list(range(9, 0, -1))
    hint = {2: 9, 4: 1}.get(hdr.xfl)
    if hint:
        levels.remove(hint)
        levels.insert(0, hint)
    return [Recipe(hdr.raw, "zlib", lvl, mem) for mem in (8, 9) for lvl in levels]


def _gnu_candidates(hdr: GzipHeader) -> List[Recipe]:
    if not shutil.which("gzip"):
        return []
    levels = list(range(9, 0, -1))
    if hdr.xfl == 4:
        levels.remove(1)
        levels.insert(0, 1)
    elif hdr.os == 3:  # GNU gzip's default level is 6
        levels.remove(6)
        levels.insert(0, 6)
    return [Recipe(hdr.raw, "gnu-gzip", lvl, 0, 0, 0, "") for lvl in levels]


def _gnu_deflate(raw: bytes, level: int) -> bytes:
    out = subprocess.run(["gzip", "-c", "-n", f"-{level}"], input=raw,
                         stdout=subprocess.PIPE, check=True).stdout
    hdr = parse_header(out)
    return out[len(hdr.raw):-8]


def deflate(raw: bytes, recipe: Recipe) -> bytes:
    if recipe.impl == "zlib":
        if recipe.zlib_version != zlib.ZLIB_RUNTIME_VERSION:
            raise RuntimeError(f"recipe made with zlib {recipe.zlib_version}, "
                               f"running {zlib.ZLIB_RUNTIME_VERSION}")
        co = zlib.compressobj(recipe.level, zlib.DEFLATED, recipe.wbits, recipe.mem_level,
                              recipe.strategy)
        return co.compress(raw) + co.flush()
    if recipe.impl == "gnu-gzip":
        return _gnu_deflate(raw, recipe.level)
    raise ValueError(recipe.impl)


def rebuild(raw: bytes, recipe: Recipe) -> bytes:
    """The original .gz bytes from the decompressed bytes and a recipe."""
    return (recipe.header + deflate(raw, recipe)
            + struct.pack("<II", zlib.crc32(raw), len(raw) & 0xFFFFFFFF))


@dataclasses.dataclass
class Finding:
    ok: bool
    recipe: Optional[Recipe]
    reason: str  # why not, or "" when ok
    header: Optional[GzipHeader]
    tried: int  # candidates tried


def find_recipe(data: bytes, *, try_gnu: bool = True) -> Tuple[Finding, Optional[bytes]]:
    """Look for a recipe that rebuilds `data` exactly.  Returns (finding, raw bytes or None)."""
    try:
        hdr, body, raw = split_gzip(data)
    except ValueError as e:
        return Finding(False, None, str(e), None, 0), None
    tried = 0
    probe = raw[:PROBE]
    for rec in _zlib_candidates(hdr):
        tried += 1
        co = zlib.compressobj(rec.level, zlib.DEFLATED, rec.wbits, rec.mem_level, rec.strategy)
        head = co.compress(probe)
        if not body.startswith(head):
            continue
        rest = co.compress(raw[PROBE:]) + co.flush()
        if len(head) + len(rest) == len(body) and body[len(head):] == rest:
            return Finding(True, rec, "", hdr, tried), raw
    if try_gnu:
        # GNU gzip can't be probed incrementally through a pipe as cheaply; probe on a prefix and
        # compare all but the last 64 KiB of its (truncated-input) output, then confirm fully.
        for rec in _gnu_candidates(hdr):
            tried += 1
            head = _gnu_deflate(probe, rec.level)
            cmp = max(0, len(head) - 65536)
            if len(raw) > PROBE and head[:cmp] != body[:cmp]:
                continue
            if _gnu_deflate(raw, rec.level) == body:
                return Finding(True, rec, "", hdr, tried), raw
    return Finding(False, None, "no candidate deflate parameters reproduce the stream", hdr,
                   tried), raw


def verify(data: bytes, raw: bytes, recipe: Recipe) -> bool:
    return rebuild(raw, recipe) == data


if __name__ == "__main__":
    import sys
    import time

    for p in sys.argv[1:]:
        data = open(p, "rb").read()
        t = time.perf_counter()
        f, raw = find_recipe(data)
        dt = time.perf_counter() - t
        what = f.recipe.describe() if f.ok else f.reason
        h = f.header
        hs = (f"flags={h.flags:#x} mtime={h.mtime} xfl={h.xfl} os={h.os} fname={h.fname!r}"
              if h else "-")
        print(f"{p}: {'OK' if f.ok else 'FAIL'} {what} [{hs}] tried={f.tried} {dt:.1f}s")
