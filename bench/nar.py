"""NAR manifests: ingest and reassembly speed, peak memory, and dedup between package versions.

- speed: a synthetic NAR (a tree of tiny, small, medium and large files with executables and symlinks) held
  in memory; NAR -> manifest (pure, and into a repo) and repo -> NAR, each against hashlib.sha256 over the
  same bytes in the same run; and, as a second baseline, the same NAR added/read as one archive stream.
- memory: peak RSS (wait4 ru_maxrss of the very process) of ingesting and of streaming back a synthetic NAR
  of 2 GiB (--quick: 256 MiB) and of a small one, generated on the fly so the process never holds it.
- dedup: two consecutive sdists from PyPI (bench/.cache/corpus, see corpus.py), unpacked and
  `nix-store --add`ed to a chroot store (or serialised with our byte-exact dump_path when Nix is absent):
  stored/logical bytes with NAR manifests vs chunking each whole NAR as one stream.

Usage: .venv/bin/python bench/nar.py [--quick]
JSON lines on stdout ({"bench": "nar", "metric", "value", "unit", "better", ...}), a table on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms  # noqa: E402

from p2pcache.content.nar import (  # noqa: E402
    Contents,
    DirectoryEnd,
    DirectoryStart,
    Entry,
    RegularFile,
    Symlink,
    write_nar,
)
from p2pcache.content.narmanifest import NarIngest  # noqa: E402
from p2pcache.store.nixstore import dump_path  # noqa: E402
from rss import run_measured  # noqa: E402
from p2pcache.store.repo import Repo  # noqa: E402

MiB = 1 << 20
CORPUS = Path(__file__).resolve().parent / ".cache" / "corpus"
PAIRS = [("django", "django-6.0.1.tar.gz", "django-6.0.2.tar.gz"),
         ("pygments", "Pygments-2.16.1.tar.gz", "pygments-2.17.0.tar.gz")]


def emit(metric: str, value: float, unit: str, better: str, **extra) -> None:
    print(json.dumps({"bench": "nar", "metric": metric, "value": round(value, 4), "unit": unit, "better": better,
                      **extra}), flush=True)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- a synthetic NAR, generated as a stream -------------------------------------------------------------


def synthetic_events(total: int, seed: int = 1) -> Iterator:
    """Events of a tree of about `total` bytes of file contents: half the files tiny (inlined), a third
    small, some medium, a few large; every byte unique (a ChaCha20 keystream), so nothing dedups."""
    rng = random.Random(seed)
    stream = Cipher(algorithms.ChaCha20(bytes(32), seed.to_bytes(16, "little")), mode=None).encryptor()
    zeros = bytes(MiB)
    left = total
    yield DirectoryStart()
    d = 0
    while left > 0:
        yield Entry(b"d%06d" % d)
        yield DirectoryStart()
        for i in range(100):
            if left <= 0:
                break
            r = rng.random()
            size = (rng.randrange(50, 1024) if r < 0.5 else rng.randrange(1024, 64 << 10) if r < 0.85
                    else rng.randrange(64 << 10, MiB) if r < 0.98 else rng.randrange(MiB, 64 * MiB))
            size = min(size, max(left, 1))
            yield Entry(b"f%03d" % i)
            yield RegularFile(size, executable=i % 10 == 0)
            n = size
            while n:
                k = min(n, MiB)
                yield Contents(stream.update(zeros[:k]))
                n -= k
            left -= size
            if i % 25 == 0:
                yield Entry(b"f%03d-link" % i)
                yield Symlink(b"f%03d" % i)
        yield DirectoryEnd()
        d += 1
    yield DirectoryEnd()


def synthetic_nar(total: int, piece: int = 4 * MiB) -> Iterator[bytes]:
    buf = bytearray()
    for out in write_nar(synthetic_events(total)):
        buf += out
        while len(buf) >= piece:
            yield bytes(buf[:piece])
            del buf[:piece]
    if buf:
        yield bytes(buf)


# -- child processes for peak RSS ------------------------------------------------------------------------


def child(mode: str, size: int, repo_path: str) -> None:
    if mode == "ingest":
        repo = Repo.init(repo_path, durable=False)
        result = repo.add_nar(synthetic_nar(size), store_path="/nix/store/" + "a" * 32 + "-synthetic")
        print(json.dumps({"nar_size": result.nar_size, "blocks": result.new_blocks}))
    else:
        repo = Repo.open(repo_path, writable=False)
        h = hashlib.sha256()
        n = 0
        for piece in repo.stream_nar("a" * 32):
            h.update(piece)
            n += len(piece)
        print(json.dumps({"nar_size": n}))
    repo.close()


def measure_child(mode: str, size: int, repo_path: Path) -> tuple[float, float]:
    result = run_measured([sys.executable, __file__, "--child", mode, "--size", str(size), "--repo", str(repo_path)])
    if result.get("rc") != 0:
        raise SystemExit(f"bench child {mode} failed: {result['stderr'].strip()[-2000:]}")
    return result["maxrss_kib"] / 1024, result["wall"]


# -- speed ------------------------------------------------------------------------------------------------


def best(runs: int, fn) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def speed(size: int, runs: int, tmp: Path) -> None:
    # Repos on tmpfs when there is one: this measures our code, not the disk's writeback (which varied
    # 4x between identical runs on this project's VMs). Peak-RSS runs below use the disk.
    if Path("/dev/shm").is_dir() and shutil.disk_usage("/dev/shm").free > 8 * size:
        tmp = Path(tempfile.mkdtemp(prefix="p2pcache-bench-nar-", dir="/dev/shm"))
    try:
        _speed(size, runs, tmp)
    finally:
        if str(tmp).startswith("/dev/shm/"):
            shutil.rmtree(tmp, ignore_errors=True)


def _speed(size: int, runs: int, tmp: Path) -> None:
    pieces = list(synthetic_nar(size))
    nar_size = sum(map(len, pieces))

    def sha() -> None:
        h = hashlib.sha256()
        for p in pieces:
            h.update(p)

    def pure() -> None:
        ing = NarIngest()
        for p in pieces:
            ing.feed(p)
        ing.finish()

    base = best(runs, sha)
    pure_t = best(runs, pure)
    counter = iter(range(1000))

    def into_repo() -> None:
        with Repo.init(tmp / f"speed-{next(counter)}", durable=False) as repo:
            repo.add_nar(pieces, store_path="/nix/store/" + "b" * 32 + "-speed")

    def as_archive() -> None:
        with Repo.init(tmp / f"speed-{next(counter)}", durable=False) as repo:
            repo.add_stream(io.BytesIO(b"".join(pieces)))

    add_t = best(runs, into_repo)
    arch_t = best(runs, as_archive)
    with Repo.init(tmp / "speed-read", durable=False) as repo:
        root = repo.add_nar(pieces, store_path="/nix/store/" + "b" * 32 + "-speed").root
        aroot = repo.add_stream(io.BytesIO(b"".join(pieces))).root
        read_t = best(runs, lambda: sum(len(p) for p in repo.stream_nar("b" * 32)))
        aread_t = best(runs, lambda: sum(len(p) for p in repo.stream(aroot)))
        assert repo.root_info(root).kind == "nar"
    rows = [("sha256 over the NAR (baseline)", base, None), ("NAR -> manifest, pure", pure_t, "ingest_pure"),
            ("NAR -> repo (add_nar)", add_t, "ingest_repo"), ("NAR -> repo as one archive", arch_t, "ingest_archive"),
            ("repo -> NAR (stream_nar)", read_t, "stream_repo"), ("repo -> archive bytes", aread_t, "stream_archive")]
    log(f"\nspeed: synthetic NAR of {nar_size / MiB:.0f} MiB, best of {runs}, fsync off, repos in {tmp.parent}")
    for label, t, metric in rows:
        rate = nar_size / t / 1e6
        log(f"  {label:34s} {rate:8.0f} MB/s  {t / base:6.2f} x sha256 time")
        if metric:
            emit(f"{metric}_throughput", rate, "MB/s", "higher", nar_bytes=nar_size)
            emit(f"{metric}_vs_sha256", t / base, "x time", "lower", nar_bytes=nar_size)
    emit("sha256_throughput", nar_size / base / 1e6, "MB/s", "higher", nar_bytes=nar_size)


# -- memory -----------------------------------------------------------------------------------------------


def memory(sizes: list[int], tmp: Path) -> None:
    log("\nmemory: peak RSS of one process (wait4 ru_maxrss)")
    for size in sizes:
        repo_path = tmp / f"mem-{size}"
        rss_in, wall_in = measure_child("ingest", size, repo_path)
        rss_out, wall_out = measure_child("stream", size, repo_path)
        log(f"  {size / MiB:6.0f} MiB NAR: ingest {rss_in:6.0f} MiB RSS ({size / wall_in / 1e6:5.0f} MB/s incl. start), "
            f"stream {rss_out:6.0f} MiB RSS ({size / wall_out / 1e6:5.0f} MB/s)")
        emit("ingest_peak_rss", rss_in, "MiB", "lower", nar_bytes=size)
        emit("stream_peak_rss", rss_out, "MiB", "lower", nar_bytes=size)
        shutil.rmtree(repo_path)


# -- dedup ------------------------------------------------------------------------------------------------


def _nix_env(home: Path) -> dict:
    env = dict(os.environ)
    env.update(NIX_CONFIG="experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nsubstituters =\n",
               HOME=str(home), XDG_CACHE_HOME=str(home / "cache"))
    return env


def nar_of_sdist(archive: Path, tmp: Path) -> tuple[bytes, str]:
    dest = tmp / archive.name.replace(".tar.gz", "")
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    (top,) = list(dest.iterdir())
    if shutil.which("nix-store"):
        env = _nix_env(tmp / "home")
        store = tmp / "chroot"
        path = subprocess.run(["nix-store", "--store", str(store), "--add", str(top)], env=env, check=True,
                              capture_output=True, text=True).stdout.strip()
        # `--dump` reads a file system path: the chroot store's copy of the store path.
        nar = subprocess.run(["nix-store", "--dump", str(store / path.lstrip("/"))], env=env, check=True,
                             capture_output=True).stdout
        return nar, path
    return b"".join(dump_path(top)), "/nix/store/" + hashlib.sha256(archive.name.encode()).hexdigest()[:32].translate(
        str.maketrans("eotu", "0123")) + "-" + top.name


def dedup(tmp: Path) -> None:
    log("\ndedup: two consecutive sdists, each unpacked and added to a Nix store")
    for corpus, a, b in PAIRS:
        files = [CORPUS / corpus / a, CORPUS / corpus / b]
        if not all(f.exists() for f in files):
            log(f"  {corpus}: {a} / {b} not in {CORPUS}; run bench/corpus.py --corpus {corpus} (skipped)")
            continue
        nars = [nar_of_sdist(f, tmp / corpus) for f in files]
        logical = sum(len(n) for n, _ in nars)
        sizes = [len(n) for n, _ in nars]
        with Repo.init(tmp / f"{corpus}-nar", durable=False) as r1, Repo.init(tmp / f"{corpus}-arch", durable=False) as r2:
            res = [r1.add_nar([n], store_path=p) for n, p in nars]
            arch = [r2.add_stream(io.BytesIO(n)) for n, _ in nars]
            stored_nar, stored_arch = r1.stored_bytes(), r2.stored_bytes()
            blocks_nar, blocks_arch = r1.index.block_count(), r2.index.block_count()
            for (n, p), r in zip(nars, res):
                assert b"".join(r1.stream_nar(Path(p).name[:32])) == n
        log(f"  {corpus} {a} -> {b}: NARs {sizes[0] / MiB:.1f} + {sizes[1] / MiB:.1f} MiB, "
            f"{res[0].files} files")
        log(f"    NAR manifest:       stored/logical {stored_nar / logical:6.3f}  second version new "
            f"{res[1].new_bytes / sizes[1]:6.3f}  blocks {blocks_nar}")
        log(f"    whole NAR chunked:  stored/logical {stored_arch / logical:6.3f}  second version new "
            f"{arch[1].new_bytes / sizes[1]:6.3f}  blocks {blocks_arch}")
        log(f"    ratio of stored bytes (manifest / whole): {stored_nar / stored_arch:.3f}")
        for label, stored, new, blocks in (("nar_manifest", stored_nar, res[1].new_bytes, blocks_nar),
                                           ("whole_nar", stored_arch, arch[1].new_bytes, blocks_arch)):
            emit(f"dedup_{label}_stored_over_logical", stored / logical, "ratio", "lower", corpus=corpus,
                 versions=[a, b])
            emit(f"dedup_{label}_second_new_fraction", new / sizes[1], "ratio", "lower", corpus=corpus)
            emit(f"dedup_{label}_blocks", blocks, "blocks", "lower", corpus=corpus)
        emit("dedup_manifest_over_whole_stored", stored_nar / stored_arch, "ratio", "lower", corpus=corpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller NARs, one run each")
    ap.add_argument("--child", choices=["ingest", "stream"], help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--repo", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.size, args.repo)
        return
    tmp = Path(tempfile.mkdtemp(prefix="p2pcache-bench-nar-"))
    try:
        if args.quick:
            speed(128 * MiB, 1, tmp)
            memory([32 * MiB, 256 * MiB], tmp)
        else:
            speed(1024 * MiB, 2, tmp)
            memory([64 * MiB, 2048 * MiB], tmp)
        dedup(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
