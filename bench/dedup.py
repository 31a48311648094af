"""Dedup benchmark: which FastCDC parameters, and how do we compare with casync?

For each corpus (10 consecutive releases of one project, see bench/corpus.py) and each input form

* ``gz``  -- the files as downloaded (compressed .tar.gz / .whl), added as-is;
* ``tar`` -- the decompressed tar stream of each .tar.gz, stored only if the original .tar.gz can be
  rebuilt bit-for-bit from it plus a small recipe (bench/gzrebuild.py); a file that cannot be rebuilt
  falls back to its compressed bytes, and the number of fallbacks is reported;

we chunk every file with FastCDC (pyfastcdc) for a grid of parameters, dedup the chunks across all
files by SHA-256, and report

* ``stored/logical``: unique chunk bytes (+ recipes) over the bytes added (the .tar.gz/.whl sizes,
  i.e. what a user hands to ``p2pcache add``), and, for ``tar``, also over the tar bytes chunked;
* ``incr``: mean fraction of a later release's size that is new (releases 2..10), i.e. what one more
  CI upload of the next version costs;
* chunk counts: chunk references in all manifests, unique chunks (= files on disk = bitswap blocks
  = rows), mean and max unique chunk size;
* ``disk4k``: unique chunks stored one file each, rounded up to 4 KiB filesystem blocks;
* ``zstd``: unique chunks each compressed with zstd level 3 (to compare with casync's store, which
  compresses every chunk with zstd by default).

Then ``casync make --store=DIR INDEX FILE`` (Debian casync) on the very same inputs, one shared
store per run, reporting its on-disk store bytes (zstd-compressed ``.cacnk`` files) and its
uncompressed unique chunk bytes and chunk counts, read from the ``.caibx`` indexes.

Usage::

    .venv/bin/python bench/dedup.py [--quick] [--corpus pygments,django,pygments-wheel]
                                    [--jsonl PATH|-] [--no-casync] [--gz-survey]

Prints a table; writes one JSON object per result row to ``--jsonl`` (default
bench/.cache/dedup.jsonl; ``-`` for stdout, the table then goes to stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import corpus as corpus_mod  # noqa: E402
import gzrebuild  # noqa: E402

from pyfastcdc import FastCDC  # noqa: E402

try:
    import zstandard
except ImportError:  # pragma: no cover - optional
    zstandard = None

CACHE = HERE / ".cache"
TAR_DIR = CACHE / "tar"
RECIPES = CACHE / "gzrebuild.json"
KiB = 1024
MiB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Parameter grid


@dataclasses.dataclass(frozen=True)
class Params:
    """pyfastcdc parameters. Expected chunk size is about avg + min (cut-point skipping)."""

    min_size: int
    avg_size: int
    max_size: int
    nc: int = 1
    label: str = ""

    @property
    def name(self) -> str:
        def k(n: int) -> str:
            return f"{n // MiB}M" if n >= MiB and n % MiB == 0 else f"{n // KiB}K"
        s = f"{k(self.min_size)}/{k(self.avg_size)}/{k(self.max_size)} nc{self.nc}"
        return f"{s} ({self.label})" if self.label else s


GRID_FULL: List[Params] = [
    Params(2 * KiB, 8 * KiB, 64 * KiB),
    Params(4 * KiB, 16 * KiB, 64 * KiB, label="pyfastcdc default"),
    Params(8 * KiB, 32 * KiB, 128 * KiB),
    Params(16 * KiB, 48 * KiB, 256 * KiB),
    Params(16 * KiB, 64 * KiB, 256 * KiB),
    Params(32 * KiB, 128 * KiB, 512 * KiB),
    Params(64 * KiB, 256 * KiB, 1 * MiB),
    Params(128 * KiB, 512 * KiB, 1 * MiB),
    # normalization level at a mid size
    Params(16 * KiB, 48 * KiB, 256 * KiB, nc=0),
    Params(16 * KiB, 48 * KiB, 256 * KiB, nc=2),
    Params(16 * KiB, 48 * KiB, 256 * KiB, nc=3),
    # same expected size (~64 KiB), different min/avg split
    Params(4 * KiB, 60 * KiB, 256 * KiB),
    Params(32 * KiB, 32 * KiB, 256 * KiB),
    # max size: does a 1 MiB ceiling (vs 256 KiB) change anything at a mid size?
    Params(16 * KiB, 48 * KiB, 1 * MiB),
]

GRID_QUICK: List[Params] = [
    Params(4 * KiB, 16 * KiB, 64 * KiB, label="pyfastcdc default"),
    Params(16 * KiB, 48 * KiB, 256 * KiB),
    Params(64 * KiB, 256 * KiB, 1 * MiB),
]


def project_default() -> Optional[Tuple[Params, Callable]]:
    """p2pcache's own chunker and default params, if the module exists."""
    try:
        from p2pcache.content import chunking  # type: ignore
    except Exception:
        return None
    dp = getattr(chunking, "DEFAULT_PARAMS", None)
    if dp is None and hasattr(chunking, "ChunkerParams"):
        dp = chunking.ChunkerParams()
    if dp is None:
        return None
    nc = getattr(dp, "normalization", getattr(dp, "normalized_chunking", 1))
    p = Params(dp.min_size, dp.avg_size, dp.max_size, nc, label="p2pcache default")
    chunk_buffers = getattr(chunking, "chunk_buffers", None)
    if chunk_buffers is None:
        return p, None

    def cut(path: Path) -> Iterator[memoryview]:
        def reads() -> Iterator[bytes]:
            with open(path, "rb") as f:
                while True:
                    b = f.read(4 * MiB)
                    if not b:
                        return
                    yield b
        return chunk_buffers(reads(), dp)

    return p, cut


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclasses.dataclass
class Input:
    version: str
    added_size: int  # size of the file as downloaded (what `p2pcache add` is given)
    path: Path  # bytes that get chunked
    overhead: int = 0  # recipe bytes stored alongside (tar form)
    fallback: bool = False  # tar form: could not rebuild, chunked the compressed file instead


def _load_recipes() -> dict:
    if RECIPES.exists():
        return json.loads(RECIPES.read_text())
    return {}


def _save_recipes(d: dict) -> None:
    tmp = RECIPES.with_suffix(".tmp")
    tmp.write_text(json.dumps(d, indent=1, sort_keys=True))
    os.replace(tmp, RECIPES)


def tar_inputs(files: Sequence[corpus_mod.CorpusFile], log) -> Tuple[List[Input], List[dict]]:
    """Decompressed-stream inputs, with a verified rebuild recipe for each (cached by sha256)."""
    recipes = _load_recipes()
    inputs, findings = [], []
    TAR_DIR.mkdir(parents=True, exist_ok=True)
    for f in files:
        key = f"{f.sha256}:{zlib.ZLIB_RUNTIME_VERSION}"
        tar = TAR_DIR / (f.sha256 + ".tar")
        rec = recipes.get(key)
        if rec is None or (rec["ok"] and not tar.exists()):
            t = time.perf_counter()
            data = f.path.read_bytes()
            finding, raw = gzrebuild.find_recipe(data)
            if finding.ok:
                # find_recipe compared the whole deflate stream; the header is kept verbatim and
                # split_gzip checked the CRC32/ISIZE trailer against raw, so rebuild(raw) == data.
                tmp = tar.with_suffix(".tmp")
                tmp.write_bytes(raw)
                os.replace(tmp, tar)
            h = finding.header
            rec = {
                "ok": finding.ok,
                "reason": finding.reason,
                "recipe": finding.recipe.to_json() if finding.recipe else None,
                "describe": finding.recipe.describe() if finding.recipe else None,
                "tried": finding.tried,
                "header": None if h is None else {
                    "flags": h.flags, "mtime": h.mtime, "xfl": h.xfl, "os": h.os,
                    "fname": h.fname.decode("latin-1") if h.fname is not None else None,
                    "len": len(h.raw)},
                "raw_size": len(raw) if raw is not None else None,
                "seconds": round(time.perf_counter() - t, 2),
            }
            recipes[key] = rec
            _save_recipes(recipes)
            log(f"  gzip rebuild {f.filename}: {'OK ' + rec['describe'] if rec['ok'] else 'FAIL ' + rec['reason']}"
                f" ({rec['seconds']}s)")
        findings.append({"file": f.filename, **rec})
        if rec["ok"]:
            # recipe = verbatim header + impl/level/memLevel/wbits/strategy (~8 bytes encoded)
            inputs.append(Input(f.version, f.size, tar, rec["header"]["len"] + 8))
        else:
            inputs.append(Input(f.version, f.size, f.path, 0, fallback=True))
    return inputs, findings


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclasses.dataclass
class Result:
    corpus: str
    form: str
    chunker: str
    params: Optional[dict]
    files: int
    added_bytes: int
    chunked_bytes: int
    stored_bytes: int
    chunks_total: int
    chunks_unique: int
    mean_unique_chunk: float
    max_chunk: int
    first_stored: int
    incr_frac: float  # mean over releases 2..n of new bytes / that release's added size
    disk4k: Optional[int]
    zstd_bytes: Optional[int]
    fallbacks: int
    seconds: float
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.added_bytes

    @property
    def ratio_chunked(self) -> float:
        return self.stored_bytes / self.chunked_bytes


def _fastcdc_cutter(p: Params) -> Callable[[Path], Iterable]:
    cdc = FastCDC(p.avg_size, min_size=p.min_size, max_size=p.max_size,
                  normalized_chunking=p.nc)

    def cut(path: Path) -> Iterator[memoryview]:
        if path.stat().st_size == 0:
            return iter(())
        return (c.data for c in cdc.cut_file(str(path)))

    return cut


def measure(corpus: str, form: str, inputs: Sequence[Input], label: str, params: Optional[Params],
            cut: Callable[[Path], Iterable], with_zstd: bool) -> Result:
    t = time.perf_counter()
    seen: Dict[bytes, int] = {}
    zc = zstandard.ZstdCompressor(level=3) if (with_zstd and zstandard) else None
    zbytes = 0
    total = uniq = 0
    stored = first = 0
    max_chunk = 0
    disk = 0
    incr: List[float] = []
    chunked = 0
    for i, inp in enumerate(inputs):
        new = inp.overhead
        for data in cut(inp.path):
            n = len(data)
            total += 1
            chunked += n
            if n > max_chunk:
                max_chunk = n
            d = hashlib.sha256(data).digest()
            if d not in seen:
                seen[d] = n
                new += n
                disk += -(-n // 4096) * 4096
                if zc is not None:
                    zbytes += min(n, len(zc.compress(data)))
        stored += new
        if i == 0:
            first = new
        else:
            incr.append(new / inp.added_size)
    uniq = len(seen)
    return Result(
        corpus=corpus, form=form, chunker=label,
        params=None if params is None else {"min": params.min_size, "avg": params.avg_size,
                                            "max": params.max_size, "nc": params.nc},
        files=len(inputs), added_bytes=sum(i.added_size for i in inputs), chunked_bytes=chunked,
        stored_bytes=stored, chunks_total=total, chunks_unique=uniq,
        mean_unique_chunk=(sum(seen.values()) / uniq) if uniq else 0.0, max_chunk=max_chunk,
        first_stored=first, incr_frac=(sum(incr) / len(incr)) if incr else 0.0, disk4k=disk,
        zstd_bytes=zbytes if zc is not None else None,
        fallbacks=sum(1 for i in inputs if i.fallback), seconds=time.perf_counter() - t)


def whole_file(corpus: str, form: str, inputs: Sequence[Input]) -> Result:
    """Baseline: whole-file dedup only (one block per file)."""
    def cut(path: Path) -> Iterator[bytes]:
        yield path.read_bytes()
    return measure(corpus, form, inputs, "whole file (no chunking)", None, cut, False)


def member_oracle(corpus: str, inputs: Sequence[Input]) -> Result:
    """Reference, not a chunker: dedup whole tar *member contents* by hash, and store every
    other byte of each tar (headers, padding, end blocks) without any dedup.  Tar headers carry the
    versioned top-level directory name (``pkg-1.2.3/...``), so no header ever repeats across
    releases; this is what a tar-aware chunker (cut at member boundaries, headers apart) could get.
    """
    import tarfile
    t = time.perf_counter()
    seen: Dict[bytes, int] = {}
    stored = first = total = chunked = max_chunk = 0
    zc = zstandard.ZstdCompressor(level=3) if zstandard else None
    zbytes = 0
    incr: List[float] = []
    for i, inp in enumerate(inputs):
        size = inp.path.stat().st_size
        headers: List[bytes] = []
        chunked += size
        content = 0
        new = inp.overhead
        with tarfile.open(inp.path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                data = tf.extractfile(m).read()
                if zc is not None:
                    tf.fileobj.seek(m.offset)
                    headers.append(tf.fileobj.read(m.offset_data - m.offset))
                content += len(data)
                total += 1
                max_chunk = max(max_chunk, len(data))
                d = hashlib.sha256(data).digest()
                if d not in seen:
                    seen[d] = len(data)
                    new += len(data)
                    if zc is not None:
                        zbytes += min(len(data), len(zc.compress(data)))
        if zc is not None:  # the header blob of this tar, compressed as one block
            zbytes += len(zc.compress(b"".join(headers)))
        new += size - content  # headers + padding, never deduped
        total += 1
        stored += new
        if i == 0:
            first = new
        else:
            incr.append(new / inp.added_size)
    uniq = len(seen) + len(inputs)
    return Result(
        corpus=corpus, form="tar", chunker="oracle: per-member dedup", params=None,
        files=len(inputs), added_bytes=sum(i.added_size for i in inputs), chunked_bytes=chunked,
        stored_bytes=stored, chunks_total=total, chunks_unique=uniq,
        mean_unique_chunk=stored / uniq, max_chunk=max_chunk, first_stored=first,
        incr_frac=sum(incr) / len(incr) if incr else 0.0, disk4k=None,
        zstd_bytes=zbytes if zc is not None else None,
        fallbacks=0, seconds=time.perf_counter() - t,
        note="unique member contents + all non-content tar bytes; blocks = unique contents + "
             "one header blob per file; zstd = each unique member and each header blob "
             "compressed on its own; disk4k not computed")


# ---------------------------------------------------------------------------------------------
# casync


def parse_caibx(path: Path) -> List[Tuple[int, bytes]]:
    """(length, chunk id) per chunk of a casync blob index (.caibx).

    Layout (casync's caformat.h): CaFormatIndex (48 bytes: size, type, feature flags, chunk size
    min/avg/max, each le64), a table header (16 bytes, size = UINT64_MAX), items of
    {le64 end offset, 32-byte chunk id}, and a 40-byte table tail.
    """
    data = path.read_bytes()
    body = data[48 + 16:len(data) - 40]
    if len(body) % 40:
        raise ValueError(f"{path}: unexpected caibx layout")
    out, prev = [], 0
    for off in range(0, len(body), 40):
        end, = struct.unpack_from("<Q", body, off)
        out.append((end - prev, body[off + 8:off + 40]))
        prev = end
    return out


def run_casync(corpus: str, form: str, inputs: Sequence[Input], chunk_size: Optional[str],
               workdir: Path, directory: bool = False) -> Result:
    """casync over each input file (blob index), or, with `directory`, over the tree extracted
    from each tar (casync's own catar format, .caidx; names are relative to the top-level
    ``pkg-x.y.z/`` directory, so the version string is not in the archive)."""
    t = time.perf_counter()
    store = workdir / "store"
    if store.exists():
        shutil.rmtree(store)
    store.mkdir(parents=True)
    seen: Dict[bytes, int] = {}
    total = 0
    first = 0
    incr: List[float] = []
    max_chunk = 0
    chunked = 0
    for i, inp in enumerate(inputs):
        idx = workdir / (f"{i}.caidx" if directory else f"{i}.caibx")
        cmd = ["casync", "make", f"--store={store}"]
        if chunk_size:
            cmd.append(f"--chunk-size={chunk_size}")
        src = inp.path
        if directory:
            import tarfile
            tree = workdir / "tree"
            if tree.exists():
                shutil.rmtree(tree)
            tree.mkdir()
            with tarfile.open(inp.path, "r:") as tf:
                tf.extractall(tree, filter="tar")
            (top,) = list(tree.iterdir())
            src = top
        cmd += [str(idx), str(src)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        items = parse_caibx(idx)
        size = sum(n for n, _ in items)
        if directory:
            pass  # a catar stream: no input file size to check against
        elif size != inp.path.stat().st_size:
            raise RuntimeError(f"caibx of {inp.path} covers {size} bytes, file has "
                               f"{inp.path.stat().st_size}")
        new = 0 if directory else inp.overhead
        for n, cid in items:
            total += 1
            chunked += n
            max_chunk = max(max_chunk, n)
            if cid not in seen:
                seen[cid] = n
                new += n
        if i == 0:
            first = new
        else:
            incr.append(new / inp.added_size)
        idx.unlink()
    files = [p for p in store.rglob("*.cacnk")]
    on_disk = sum(p.stat().st_size for p in files)
    if len(files) != len(seen):
        raise RuntimeError(f"casync store has {len(files)} chunks, indexes name {len(seen)}")
    disk = sum(-(-p.stat().st_size // 4096) * 4096 for p in files)
    uniq_bytes = sum(seen.values())
    res = Result(
        corpus=corpus, form=form,
        chunker=("casync dir " if directory else "casync ") + (chunk_size or "default 16K:64K:256K"),
        params=None, files=len(inputs), added_bytes=sum(i.added_size for i in inputs),
        chunked_bytes=chunked,
        stored_bytes=uniq_bytes + (0 if directory else sum(i.overhead for i in inputs)),
        chunks_total=total, chunks_unique=len(seen),
        mean_unique_chunk=uniq_bytes / len(seen) if seen else 0.0, max_chunk=max_chunk,
        first_stored=first, incr_frac=sum(incr) / len(incr) if incr else 0.0, disk4k=disk,
        zstd_bytes=on_disk, fallbacks=sum(1 for i in inputs if i.fallback),
        seconds=time.perf_counter() - t,
        note=("stored = uncompressed unique chunk bytes from the index; zstd = casync store on disk"
              + ("; input = extracted tree (catar), not the tar: cannot rebuild the .tar.gz"
                 if directory else "")))
    shutil.rmtree(store)
    return res


# ---------------------------------------------------------------------------------------------
# Output


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    return f"{n / MiB:8.2f}M"


HEADER = (f"{'corpus/form':20} {'chunker':36} {'stored':>9} {'st/added':>8} {'st/chunked':>10} "
          f"{'incr':>6} {'chunks':>7} {'unique':>7} {'mean':>7} {'max':>6} {'disk4k':>9} "
          f"{'zstd':>9} {'secs':>5}")


def row(r: Result) -> str:
    fb = f" fallback={r.fallbacks}" if r.fallbacks else ""
    return (f"{r.corpus + '/' + r.form:20} {r.chunker[:36]:36} {fmt_bytes(r.stored_bytes)} "
            f"{r.ratio:8.3f} {r.ratio_chunked:10.3f} {r.incr_frac:6.3f} {r.chunks_total:7d} "
            f"{r.chunks_unique:7d} {r.mean_unique_chunk / KiB:6.1f}K {r.max_chunk // KiB:5d}K "
            f"{fmt_bytes(r.disk4k)} {fmt_bytes(r.zstd_bytes)} {r.seconds:5.1f}{fb}")


def to_json(r: Result) -> dict:
    d = dataclasses.asdict(r)
    d["ratio_stored_over_added"] = round(r.ratio, 5)
    d["ratio_stored_over_chunked"] = round(r.ratio_chunked, 5)
    d["seconds"] = round(r.seconds, 3)
    d["mean_unique_chunk"] = round(r.mean_unique_chunk, 1)
    d["incr_frac"] = round(r.incr_frac, 5)
    d["kind"] = "dedup"
    return d


# ---------------------------------------------------------------------------------------------
# Optional: how often can a real-world .tar.gz be rebuilt? (a wider sample than the corpus)

SURVEY = [
    # Popular projects built by different backends; the newest release with a .tar.gz sdist is
    # used (the per-version JSON endpoint is not always served, e.g. behind a mirror).
    "requests",          # setuptools
    "attrs",             # hatchling
    "packaging",         # flit_core
    "poetry-core",       # poetry-core
    "pydantic-core",     # maturin (Rust)
    "orjson",            # maturin (Rust)
    "numpy",             # meson-python
    "six",               # setuptools
    "pdm-backend",       # pdm-backend
    "scikit-build-core", # hatchling
    "simplejson",        # setuptools
    "cryptography",      # maturin
]


def gz_survey(log) -> List[dict]:
    import urllib.parse
    out = []
    d = CACHE / "survey"
    d.mkdir(parents=True, exist_ok=True)
    from packaging.version import InvalidVersion, Version

    def vkey(v: str):
        try:
            return (1, Version(v))
        except InvalidVersion:
            return (0, Version("0"))

    for name in SURVEY:
        ver = None
        try:
            doc = json.loads(corpus_mod._http_get(f"https://pypi.org/pypi/{name}/json"))
            sd = []
            for ver in sorted(doc["releases"], key=vkey, reverse=True):
                if vkey(ver)[0] and Version(ver).is_prerelease:
                    continue
                sd = [u for u in doc["releases"][ver] if u["packagetype"] == "sdist"
                      and u["filename"].endswith(".tar.gz") and not u.get("yanked")]
                if sd:
                    break
            if not sd:
                out.append({"kind": "gz-survey", "project": name, "version": None,
                            "ok": None, "reason": "no .tar.gz sdist"})
                continue
            u = sd[0]
            path = d / u["filename"]
            if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != u["digests"]["sha256"]:
                url = urllib.parse.urljoin(f"https://pypi.org/pypi/{name}/json", u["url"])
                data = corpus_mod._http_get(url)
                if hashlib.sha256(data).hexdigest() != u["digests"]["sha256"]:
                    raise RuntimeError("sha256 mismatch")
                path.write_bytes(data)
            data = path.read_bytes()
            f, raw = gzrebuild.find_recipe(data)
            h = f.header
            rec = {"kind": "gz-survey", "project": name, "version": ver, "file": u["filename"],
                   "size": len(data), "ok": f.ok,
                   "recipe": f.recipe.describe() if f.recipe else None, "reason": f.reason,
                   "xfl": h.xfl if h else None, "os": h.os if h else None,
                   "fname": (h.fname or b"").decode("latin-1") if h else None,
                   "mtime": h.mtime if h else None}
        except Exception as e:  # network or format trouble: report, don't die
            rec = {"kind": "gz-survey", "project": name, "version": ver, "ok": None,
                   "reason": f"{type(e).__name__}: {e}"}
        log(f"  {name}=={rec.get('version')}: {'OK ' + str(rec.get('recipe')) if rec['ok'] else 'FAIL ' + str(rec.get('reason'))}"
            f" xfl={rec.get('xfl')} os={rec.get('os')}")
        out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="p2pcache dedup benchmark")
    ap.add_argument("--quick", action="store_true",
                    help="small grid, default corpus only, casync default chunk size only")
    ap.add_argument("--corpus", default=None,
                    help="comma-separated corpora (default: pygments,pygments-wheel,django; "
                         "--quick: pygments)")
    ap.add_argument("--jsonl", default=str(CACHE / "dedup.jsonl"),
                    help="where to write JSON lines ('-' = stdout)")
    ap.add_argument("--no-casync", action="store_true")
    ap.add_argument("--no-zstd", action="store_true", help="skip per-chunk zstd sizing")
    ap.add_argument("--gz-survey", action="store_true",
                    help="also test gzip rebuild on a dozen other real sdists (network)")
    ap.add_argument("--offline", action="store_true", help="use only the cached corpus")
    ap.add_argument("--casync-dir", action="store_true",
                    help="also run casync on each extracted tree (.caidx; slow: ~2 min for django)")
    args = ap.parse_args(argv)

    if args.jsonl == "-":
        jout, tout = sys.stdout, sys.stderr
    else:
        Path(args.jsonl).parent.mkdir(parents=True, exist_ok=True)
        jout, tout = open(args.jsonl, "w"), sys.stdout

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def emit(obj: dict) -> None:
        jout.write(json.dumps(obj, sort_keys=True) + "\n")
        jout.flush()

    corpora = (args.corpus.split(",") if args.corpus
               else (["pygments"] if args.quick else ["pygments", "pygments-wheel", "django"]))
    grid = list(GRID_QUICK if args.quick else GRID_FULL)
    proj = project_default()
    casync_ok = not args.no_casync and shutil.which("casync") is not None
    if not args.no_casync and not casync_ok:
        log("casync not found (apt-get install -y casync); skipping casync rows")
    with_zstd = not args.no_zstd and zstandard is not None

    emit({"kind": "env", "zlib": zlib.ZLIB_RUNTIME_VERSION, "python": sys.version.split()[0],
          "casync": casync_ok, "p2pcache_chunker": proj[0].name if proj else None,
          "quick": args.quick})
    t0 = time.perf_counter()
    results: List[Result] = []
    for key in corpora:
        files = corpus_mod.fetch_corpus(key, offline=args.offline, log=log)
        for f in files:
            emit({"kind": "corpus-file", "corpus": key, "project": f.project,
                  "version": f.version, "file": f.filename, "size": f.size,
                  "sha256": f.sha256, "sha256_verified": True})
        forms: List[Tuple[str, List[Input]]] = [
            ("gz" if key != "pygments-wheel" else "zip",
             [Input(f.version, f.size, f.path) for f in files])]
        if all(f.filename.endswith(".tar.gz") for f in files):
            log(f"{key}: decompressing and checking exact gzip rebuild ...")
            tins, findings = tar_inputs(files, log)
            for fd in findings:
                emit({"kind": "gzip-rebuild", "corpus": key, **fd})
            ok = sum(1 for fd in findings if fd["ok"])
            print(f"# {key}: gzip rebuild exact for {ok}/{len(findings)} files"
                  + "".join(f"\n#   {fd['file']}: {fd['describe'] or fd['reason']}; "
                            f"header {fd['header']}" for fd in findings), file=tout)
            forms.append(("tar", tins))
        for form, inputs in forms:
            log(f"{key}/{form}: chunking ...")
            rs = [whole_file(key, form, inputs)]
            if proj:
                p, cut = proj
                rs.append(measure(key, form, inputs, p.name, p,
                                  cut or _fastcdc_cutter(p), with_zstd))
            for p in grid:
                rs.append(measure(key, form, inputs, p.name, p, _fastcdc_cutter(p), with_zstd))
            if form == "tar" and not args.quick:
                rs.append(member_oracle(key, inputs))
            if casync_ok:
                with tempfile.TemporaryDirectory(prefix="casync-", dir=CACHE) as td:
                    sizes = [None] if args.quick else [None, "16384:49152:262144"]
                    for cs in sizes:
                        log(f"{key}/{form}: casync {cs or 'default'} ...")
                        rs.append(run_casync(key, form, inputs, cs, Path(td)))
                    if form == "tar" and args.casync_dir:
                        log(f"{key}/{form}: casync on the extracted tree ...")
                        rs.append(run_casync(key, form, inputs, None, Path(td), directory=True))
            for r in rs:
                emit(to_json(r))
            results.extend(rs)
            print(f"\n## {key}/{form}: {len(inputs)} files, added {fmt_bytes(rs[0].added_bytes)}, "
                  f"chunked {fmt_bytes(rs[0].chunked_bytes)}", file=tout)
            print(HEADER, file=tout)
            for r in rs:
                print(row(r), file=tout)
            tout.flush()

    if args.gz_survey:
        log("gzip rebuild survey ...")
        sv = gz_survey(log)
        for s in sv:
            emit(s)
        tested = [s for s in sv if s["ok"] is not None]
        print(f"\n# gzip rebuild survey: exact for {sum(1 for s in tested if s['ok'])}/{len(tested)}"
              f" other real sdists", file=tout)
        for s in sv:
            print(f"#   {s['project']}=={s['version']}: "
                  f"{s.get('recipe') if s['ok'] else 'FAIL: ' + str(s.get('reason'))}"
                  f" (xfl={s.get('xfl')} os={s.get('os')})", file=tout)

    print(f"\nLegend: stored = unique chunk bytes (+ gzip recipes for tar); st/added = stored / "
          f"bytes of the files as downloaded; st/chunked = stored / bytes fed to the chunker; "
          f"incr = mean new bytes per later release / its download size; chunks = chunk "
          f"references over all files; unique = distinct chunks (= stored files = bitswap "
          f"blocks); mean/max = unique chunk size; disk4k = unique chunks as files rounded to 4 KiB; "
          f"zstd = unique chunks each zstd-3 compressed (casync rows: its on-disk store). "
          f"FastCDC params are pyfastcdc's min/avg/max (expected size ~ avg+min).", file=tout)
    print(f"total {time.perf_counter() - t0:.1f}s; JSON lines: {args.jsonl}", file=tout)
    if jout is not sys.stdout:
        jout.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
