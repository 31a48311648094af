"""Lock-file prefetch: a lock file of N dependencies fetched by a runner's daemon from one peer that has
them all, against the same files from a loopback HTTP origin with the same parallelism; then the same lock
file again with everything local; and lock-file parsing speed.

    .venv/bin/python bench/prefetch.py [--quick] [--deps N] [--size BYTES] [-j N]

Full: 2,000 dependencies × 512 KiB (1 GiB); --quick: 400 × 256 KiB (100 MiB). Same run, same files:
- origin: daemon A runs `p2pcache prefetch` of an npm package-lock.json whose URLs point at a static
  loopback HTTP server (its own process): download, verify the sha512, add, announce;
- plain download: the same URLs fetched with httpx at the same parallelism into memory, nothing stored or
  verified (what a cache-less CI job pays);
- peer: daemon B (bootstrapped to A) runs the same prefetch with the origin stopped: every dependency
  from A over the swarm, each archive verified against the lock file's sha512 and its manifest's hashes;
- local: B runs it again (everything local), at once (B still announcing what it fetched) and once B's
  announcer is idle;
- parsing: 10,000-entry package-lock.json and Cargo.lock texts, entries/s.
Ratios: peer bytes/s ÷ origin bytes/s (goal ≥ 0.8) and ÷ plain download. Table on stderr, JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from p2pcache.content.lockfiles import Registries, parse_lockfile  # noqa: E402
from tests.helpers.daemons import start_daemon  # noqa: E402

MiB = 1 << 20
STATIC_SERVER = r"""
import functools, http.server, sys
class Quiet(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=sys.argv[1]))
srv.daemon_threads = True
print(srv.server_address[1], flush=True)
srv.serve_forever()
"""


def emit(metric: str, value: float, unit: str, better: str, **extra) -> None:
    print(json.dumps({"bench": "prefetch", "metric": metric, "value": round(value, 4), "unit": unit,
                      "better": better, **extra}), flush=True)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def sri512(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def package_lock(entries: list[tuple[str, str, str, str]]) -> str:
    packages = {"": {"name": "bench"}}
    for name, version, url, integrity in entries:
        packages[f"node_modules/{name}"] = {"version": version, "resolved": url, "integrity": integrity}
    return json.dumps({"name": "bench", "lockfileVersion": 3, "requires": True, "packages": packages}, indent=2)


def bench_parsing(n: int) -> None:
    rng = random.Random(7)
    digests = [rng.randbytes(64) for _ in range(n)]
    npm = package_lock([(f"pkg-{i}", "1.0.0", f"http://127.0.0.1:1/pkg-{i}/-/pkg-{i}-1.0.0.tgz",
                         "sha512-" + base64.b64encode(d).decode()) for i, d in enumerate(digests)])
    cargo = "version = 4\n\n" + "".join(
        f'[[package]]\nname = "crate-{i}"\nversion = "1.0.{i % 50}"\nsource = "registry+http://127.0.0.1:1/index"\n'
        f'checksum = "{d[:32].hex()}"\n\n' for i, d in enumerate(digests))
    reg = Registries(cargo="http://127.0.0.1:1/dl")
    for fmt, name, text in (("npm", "package-lock.json", npm), ("cargo", "Cargo.lock", cargo)):
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            lock = parse_lockfile(name, text, reg)
            best = min(best, time.perf_counter() - t)
        assert len(lock.dependencies) == n
        log(f"  parse {name:18} {n} entries, {len(text) / MiB:5.1f} MiB: {best * 1000:7.1f} ms = {n / best:10.0f} entries/s")
        emit(f"parse_{fmt}_entries_per_s", n / best, "entries/s", "higher", entries=n)


def prefetch(daemon, lockfile: Path, jobs: int) -> tuple[float, dict]:
    t = time.perf_counter()
    proc = daemon.cli("prefetch", str(lockfile), "-j", str(jobs), "--json", check=False, timeout=3600)
    elapsed = time.perf_counter() - t
    lines = [json.loads(x) for x in proc.stdout.decode().splitlines() if x.strip()]
    summaries = [x for x in lines if x.get("event") == "summary"]
    if not summaries:
        raise SystemExit(f"prefetch exited {proc.returncode} without a summary: {proc.stderr.decode()[-2000:]}")
    summary = summaries[-1]
    if summary["failed"]:
        raise SystemExit(f"prefetch failed: {proc.stderr.decode()[-2000:]}")
    return elapsed, summary


def plain_download(urls: list[str], jobs: int) -> float:
    import trio

    async def main() -> None:
        limiter = trio.CapacityLimiter(jobs)
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=jobs)) as client:
            async def one(url: str) -> None:
                async with limiter:
                    async with client.stream("GET", url) as r:
                        assert r.status_code == 200
                        async for _ in r.aiter_bytes(1 << 20):
                            pass
            async with trio.open_nursery() as nursery:
                for u in urls:
                    nursery.start_soon(one, u)

    t = time.perf_counter()
    trio.run(main)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--deps", type=int)
    ap.add_argument("--size", type=int)
    ap.add_argument("-j", "--jobs", type=int, default=8)
    args = ap.parse_args()
    n = args.deps or (400 if args.quick else 2000)
    size = args.size or ((256 << 10) if args.quick else (512 << 10))
    work = Path(tempfile.mkdtemp(prefix="p2pcache-bench-prefetch-"))
    daemons = []
    server = None
    try:
        log(f"prefetch bench: {n} dependencies × {size >> 10} KiB = {n * size / MiB:.0f} MiB, -j {args.jobs} "
            f"(2-core machine shared with other work: compare the ratios, not the absolute figures)")
        bench_parsing(10_000)
        origin = work / "origin"
        origin.mkdir()
        rng = random.Random(1)
        entries = []
        for i in range(n):
            data = rng.randbytes(size)
            (origin / f"pkg-{i}-1.0.0.tgz").write_bytes(data)
            entries.append((f"pkg-{i}", "1.0.0", f"/pkg-{i}-1.0.0.tgz", sri512(data)))
        server = subprocess.Popen([sys.executable, "-c", STATIC_SERVER, str(origin)], stdout=subprocess.PIPE, text=True)
        base = f"http://127.0.0.1:{server.stdout.readline().strip()}"
        lockfile = work / "package-lock.json"
        lockfile.write_text(package_lock([(a, b, base + c, d) for a, b, c, d in entries]))
        total = n * size

        t_plain = min(plain_download([base + e[2] for e in entries], args.jobs) for _ in range(2))
        key = work / "swarm.key"
        key.write_text("/key/swarm/psk/1.0.0/\n/base16/\n" + os.urandom(32).hex() + "\n")
        a = start_daemon(work / "a", swarm_key=key)
        daemons.append(a)
        b = start_daemon(work / "b", swarm_key=key, bootstrap=[a.addr])
        daemons.append(b)
        t_origin, s = prefetch(a, lockfile, args.jobs)
        assert s["origin"] == n, s
        t = time.perf_counter()
        while True:  # every key tried (py-libp2p fails a few ADD_PROVIDERs under load; B still finds
            st = a.status()["announce"]  # those by asking A, which holds its own provider records)
            if st["pending"] == 0 and st["provided"] + st["failed"] >= n * 3:
                break
            time.sleep(0.5)
        log(f"  A announced {st['provided']} of {n * 3} keys ({st['failed']} failed) in "
            f"{time.perf_counter() - t:.1f} s (not timed below)")
        server.terminate()
        server.wait()
        server = None
        t_peer, s = prefetch(b, lockfile, args.jobs)
        assert s["peer"] == n, s
        t_local, s = prefetch(b, lockfile, args.jobs)  # B is still announcing what it just fetched
        assert s["local"] == n, s
        t = time.perf_counter()
        while b.status()["announce"]["pending"] and time.perf_counter() - t < 900:
            time.sleep(0.5)
        t_idle, s = prefetch(b, lockfile, args.jobs)  # B idle again
        assert s["local"] == n, s

        rows = [("plain download (no cache, not stored)", t_plain), ("origin → A (verify, add, announce)", t_origin),
                ("peer A → B (verify, add, announce)", t_peer), ("all local on B, B still announcing", t_local),
                ("all local on B, B idle", t_idle)]
        for label, t in rows:
            log(f"  {label:40} {t:7.2f} s  {total / t / MiB:8.1f} MiB/s")
        ratio = t_origin / t_peer
        log(f"  peer ÷ origin bytes/s: {ratio:.2f}× (goal ≥ 0.8)   peer ÷ plain download: {t_plain / t_peer:.2f}×"
            f"   all local: {t_local:.2f} s while announcing, {t_idle:.2f} s idle (goal ≤ 2 s)")
        common = {"deps": n, "bytes": total, "jobs": args.jobs}
        emit("peer_vs_origin_bytes_per_s", ratio, "ratio", "higher", goal=0.8, **common)
        emit("peer_vs_plain_download_bytes_per_s", t_plain / t_peer, "ratio", "higher", **common)
        emit("peer_mib_per_s", total / t_peer / MiB, "MiB/s", "higher", **common)
        emit("origin_mib_per_s", total / t_origin / MiB, "MiB/s", "higher", **common)
        emit("plain_download_mib_per_s", total / t_plain / MiB, "MiB/s", "higher", **common)
        emit("all_local_seconds", t_idle, "s", "lower", goal=2.0, **common)
        emit("all_local_while_announcing_seconds", t_local, "s", "lower", goal=2.0, **common)
        return 0
    finally:
        for d in daemons:
            d.stop()
        if server is not None:
            server.terminate()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
