"""Nix substitution through p2pcache vs a static xz binary cache, and narinfo hit/miss latency.

    .venv/bin/python bench/nix.py [--quick] [--runs N] [--profile]

Real Nix (Debian nix-bin 2.8, root, no daemon) and real `p2pcache daemon` processes on loopback:

1. A closure of several store paths with references (random, incompressible blobs; a compressible part of
   log-like text and many small text files; a `mid` and a `top` output built with /bin/sh that refer to
   them) of >= 200 MiB of NAR (--quick: ~32 MiB). Runner A's Nix (the default /nix/store) builds it and
   pushes it to daemon A (`nix copy --to http://A?compression=none`) and to a static binary cache
   (`nix copy --to file://DIR?compression=xz&compression-level=L`) served by python's ThreadingHTTPServer
   in its own process. Then, each into a fresh chroot store with a fresh Nix cache dir, timed:
     - static:        nix copy --from http://<static server> --to STORE TOP
     - p2pcache cold: a fresh daemon B (empty repo, bootstrapped to A) and nix copy --from http://B: every
                      narinfo is a swarm lookup, every NAR comes from A over bitswap
     - p2pcache warm: the same B again (it now holds the closure)
   cold and static runs alternate; the ratio p2pcache/static is min over min (goal <= 1.0).
   The xz level only changes how long the cache takes to write (xz -6 runs at ~1.5 MB/s on random data
   here); the default 0 keeps the bench short, `--xz-level 6` gives Nix's default.
2. Narinfo latency against the last B (--lookup-timeout 2, --negative-ttl 60) and a daemon C with
   --negative-ttl 0, sequential requests on one keep-alive connection: local hits, first hits of paths
   only A holds (swarm lookup + resolve), misses repeating a few hashes (negative cache), misses of fresh
   random hashes (a DHT lookup each), misses repeating a few hashes with the negative cache off.

Table on stderr, JSON lines on stdout ({"bench": "nix", "metric", "value", "unit", "better", ...}).
Everything lives in one temp dir (stores, caches, daemon repos and logs; removed at the end unless --keep);
the closure's paths also land in the default /nix/store (runner A's store), named with a random token.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pstats
import random
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from tests.helpers.daemons import Daemon, start_daemon  # noqa: E402

MiB = 1 << 20
NIX_BASE = "experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nsubstituters =\n"
NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"
LOOKUP_TIMEOUT = 2.0
NEGATIVE_TTL = 60.0

STATIC_SERVER = r"""
import functools, http.server, sys
class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=sys.argv[1]))
print(srv.server_address[1], flush=True)
srv.serve_forever()
"""


def emit(metric: str, value: float, unit: str, better: str, **extra) -> None:
    print(json.dumps({"bench": "nix", "metric": metric, "value": round(value, 4), "unit": unit, "better": better,
                      **extra}), flush=True)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- Nix ------------------------------------------------------------------------------------------------


class Nix:
    """Runs Nix as root without a daemon; `home` holds Nix's narinfo disk cache (fresh = nothing cached)."""

    def __init__(self, home: Path):
        self.home = home
        home.mkdir(parents=True, exist_ok=True)

    def env(self, config: str = "") -> dict:
        return dict(os.environ, NIX_CONFIG=NIX_BASE + config, HOME=str(self.home),
                    XDG_CACHE_HOME=str(self.home / "cache"), XDG_CONFIG_HOME=str(self.home / "config"))

    def run(self, *args: str, config: str = "", timeout: float = 900) -> subprocess.CompletedProcess:
        proc = subprocess.run(args, env=self.env(config), capture_output=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): "
                               f"{proc.stderr.decode(errors='replace')[-3000:]}")
        return proc

    def out(self, *args: str, **kw) -> str:
        return self.run(*args, **kw).stdout.decode().strip()


def rmtree(path: Path) -> None:
    def unlock(func, p, _exc):  # store paths are read-only
        os.chmod(os.path.dirname(p), 0o755)
        if os.path.isdir(p) and not os.path.islink(p):
            os.chmod(p, 0o755)
        func(p)

    if path.exists():
        shutil.rmtree(path, onerror=unlock)


# -- the closure ----------------------------------------------------------------------------------------


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(os.urandom(n))
            left -= n


def text_lines(rng: random.Random, vocab: list[str], size: int) -> bytes:
    """Log-like text: words from a small vocabulary and a random number per line (xz: about 3:1)."""
    out, n = [], 0
    while n < size:
        line = " ".join(rng.choices(vocab, k=10)) + f" {rng.getrandbits(32)}\n"
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


def make_closure(nix: Nix, work: Path, token: str, quick: bool) -> dict:
    """Random blobs (incompressible), a text path (compressible: one big log + many small files), `mid`
    referring to the blobs, `top` referring to mid and the text path."""
    n_blobs, blob = (3, 8 * MiB) if quick else (5, 32 * MiB)
    big_text, n_small = (6 * MiB, 500) if quick else (48 * MiB, 2000)
    src = work / "src"
    src.mkdir()
    rng = random.Random(token)
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz_", k=rng.randint(2, 12))) for _ in range(5000)]
    trees = []
    for i in range(n_blobs):
        t = src / f"p2pcache-bench-blob{i}-{token}"
        (t / "lib").mkdir(parents=True)
        for j in range(4):
            write_random(t / "lib" / f"part{j}.bin", blob // 4)
        (t / "README").write_text(f"blob {i} {token}\n")
        trees.append(t)
    t = src / f"p2pcache-bench-text-{token}"
    (t / "share" / "doc").mkdir(parents=True)
    (t / "share" / "log.txt").write_bytes(text_lines(rng, vocab, big_text))
    for j in range(n_small):
        d = t / "share" / "doc" / f"d{j % 50:02d}"
        d.mkdir(exist_ok=True)
        (d / f"f{j}.txt").write_bytes(text_lines(rng, vocab, rng.randint(2048, 8192)))
    exe = t / "bin-tool"
    exe.write_text("#!/bin/sh\necho tool\n")
    exe.chmod(0o755)
    os.symlink("share/log.txt", t / "log")
    trees.append(t)
    added = nix.out("nix-store", "--add", *map(str, trees)).split()
    assert len(added) == len(trees), added
    blobs, text = added[:-1], added[-1]

    def build(name: str, script: str, **deps: str) -> str:
        dep_attrs = " ".join(f'{k} = builtins.storePath "{v}";' for k, v in deps.items())
        expr = (f'derivation {{ name = "{name}-{token}"; system = builtins.currentSystem; builder = "/bin/sh"; '
                f'{dep_attrs} args = [ "-c" {json.dumps(script)} ]; }}')
        return nix.out("nix-build", "--no-out-link", "-E", expr)

    blob_deps = {f"b{i}": p for i, p in enumerate(blobs)}
    refs = " ".join(f"${k}" for k in blob_deps)
    mid = build("p2pcache-bench-mid", f"/bin/mkdir -p $out/bin && echo {refs} > $out/refs && "
                "printf '#!/bin/sh\\necho mid\\n' > $out/bin/mid && /bin/chmod +x $out/bin/mid", **blob_deps)
    top = build("p2pcache-bench-top", "/bin/mkdir -p $out && echo $mid $text > $out/refs && "
                "/bin/ln -s $text/share/log.txt $out/log", mid=mid, text=text)
    info = json.loads(nix.out("nix", "path-info", "--json", "--recursive", top))
    paths = {p["path"]: p for p in info}
    assert set(paths) == {*blobs, text, mid, top}, sorted(paths)
    rmtree(src)
    random_bytes = n_blobs * blob
    return {"top": top, "paths": paths, "nar_bytes": sum(p["narSize"] for p in info),
            "random_bytes": random_bytes, "text_bytes": paths[text]["narSize"],
            "nar_hash": {k: v["narHash"] for k, v in paths.items()}}


def make_small_paths(nix: Nix, work: Path, token: str, n: int) -> list[str]:
    """`n` tiny store paths (for first-hit narinfo latency: only A will have them)."""
    src = work / "small"
    src.mkdir()
    trees = []
    for i in range(n):
        t = src / f"p2pcache-bench-small{i}-{token}"
        t.mkdir()
        (t / "x").write_text(f"{i} {token}\n")
        trees.append(str(t))
    added = nix.out("nix-store", "--add", *trees).split()
    rmtree(src)
    return added


def clean_up(bench, made: list[str], work: Path, keep: bool) -> None:
    """The end of a Nix bench: daemons and servers stopped, the store paths it made deleted from the
    default store and its temp dir removed (or kept, with `--keep`, for the logs)."""
    bench.close()
    if made and not keep:
        delete_paths(bench.nix, made)
    if keep:
        log(f"kept {work}")
    else:
        rmtree(work)


def delete_paths(nix: Nix, paths: list[str]) -> None:
    """Delete `paths` from the default store with what refers to them (the .drv files of mid and top)."""
    env = nix.env()
    q = subprocess.run(["nix-store", "--query", "--referrers-closure", *paths], env=env, capture_output=True,
                       timeout=300)
    victims = sorted(set(q.stdout.decode().split()) | set(paths))
    d = subprocess.run(["nix-store", "--delete", *victims], env=env, capture_output=True, timeout=300)
    if d.returncode != 0:
        log(f"could not delete this run's store paths: {d.stderr.decode(errors='replace')[-500:]}")


# -- processes ------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (and its reaped children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return sum(int(x) for x in fields[11:15]) / tick


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def metric(d: Daemon, name: str, **labels) -> float:
    text = httpx.get(d.api + "/metrics", timeout=10).text
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(want + " "))


def wait_peers(d: Daemon, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while d.status()["peers"] < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{d.repo.name}: fewer than {n} peers after {timeout}s")
        time.sleep(0.05)


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path):
        self.args = args
        self.work = work
        self.daemons: list[Daemon] = []
        self.procs: list[subprocess.Popen] = []
        self.nix = Nix(work / "home-a")
        self.key = work / "swarm.key"
        self.key.write_text("/key/swarm/psk/1.0.0/\n/base16/\n" + os.urandom(32).hex() + "\n")
        self.serial = 0
        self.profiles: list[Path] = []

    def daemon(self, name: str, *, bootstrap: list[str] = (), extra: list[str] = (), profile: bool = False) -> Daemon:
        entry = ("-m", "p2pcache")
        if profile:
            out = self.work / f"{name}.prof"
            entry = ("-m", "cProfile", "-o", str(out), "-m", "p2pcache")
            self.profiles.append(out)
        d = start_daemon(self.work / name, swarm_key=self.key, bootstrap=list(bootstrap), entry=entry,
                         extra=["--lookup-timeout", str(LOOKUP_TIMEOUT), *extra], timeout=60)
        self.daemons.append(d)
        return d

    def stop(self, d: Daemon) -> None:
        d.stop()
        if d in self.daemons:
            self.daemons.remove(d)

    def close(self) -> None:
        for d in list(self.daemons):
            d.stop()
        for p in self.procs:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def static_server(self, directory: Path) -> str:
        proc = subprocess.Popen([sys.executable, "-c", STATIC_SERVER, str(directory)], stdout=subprocess.PIPE)
        self.procs.append(proc)
        port = int(proc.stdout.readline())
        return f"http://127.0.0.1:{port}", proc

    def copy(self, src: str, closure: dict, watch: dict[str, int]) -> dict:
        """nix copy --from SRC into a fresh chroot store with a fresh Nix cache; wall time, CPU of Nix and of
        the watched processes; the store is checked (NarHashes) and removed."""
        self.serial += 1
        store = self.work / f"store-{self.serial}"
        nix = Nix(self.work / f"home-{self.serial}")
        before = {k: cpu_seconds(pid) for k, pid in watch.items()}
        c0 = children_cpu()
        t = time.perf_counter()
        nix.run("nix", "copy", "--from", src, "--to", str(store), closure["top"], config="require-sigs = false\n")
        wall = time.perf_counter() - t
        cpu = {"nix": children_cpu() - c0, **{k: cpu_seconds(pid) - before[k] for k, pid in watch.items()}}
        got = json.loads(nix.out("nix", "path-info", "--json", "--recursive", "--store", str(store), closure["top"]))
        if {p["path"]: p["narHash"] for p in got} != closure["nar_hash"]:
            raise RuntimeError(f"copy from {src}: the store does not hold the closure")
        rmtree(store)
        rmtree(nix.home)
        return {"wall": wall, "cpu": cpu}


# -- narinfo latency ------------------------------------------------------------------------------------


def start_bench(args: argparse.Namespace, name: str) -> tuple[Bench, str] | None:
    """The start every Nix bench shares: None (after one line) when nix is not on PATH, else a `Bench` in a
    fresh temp dir (`bench.work`) and a random token for the names of the store paths it makes."""
    if shutil.which("nix") is None:
        log("nix is not on PATH: apt-get install -y nix-bin")
        return None
    if not hasattr(args, "profile"):
        args.profile = False
    work = Path(tempfile.mkdtemp(prefix=f"p2pcache-bench-{name}-"))
    return Bench(args, work), secrets.token_hex(5)


def random_hash(rng: random.Random) -> str:
    return "".join(rng.choice(NIX32) for _ in range(32))


def timed_gets(client: httpx.Client, base: str, hashes: list[str], expect: int) -> list[float]:
    out = []
    for h in hashes:
        t = time.perf_counter()
        r = client.get(f"{base}/{h}.narinfo")
        out.append(time.perf_counter() - t)
        if r.status_code != expect:
            raise RuntimeError(f"GET {base}/{h}.narinfo: {r.status_code} (expected {expect}): {r.text[:200]}")
    return out


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


# -- main -----------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="~32 MiB closure, fewer requests")
    ap.add_argument("--runs", type=int, default=2, help="copies of each kind (fresh stores), at least 2")
    ap.add_argument("--xz-level", type=int, default=0, help="xz level of the static cache (Nix's default is 6)")
    ap.add_argument("--profile", action="store_true", help="run the first cold B under cProfile, print its top")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (daemon logs, profiles)")
    args = ap.parse_args()
    started = start_bench(args, "nix")
    if started is None:
        return 2
    bench, token = started
    work = bench.work
    runs = max(2, args.runs)
    n_req = 50 if args.quick else 200
    n_first = 20 if args.quick else 50
    t_start = time.perf_counter()
    rows: list[tuple[str, str]] = []

    def row(label: str, text: str) -> None:
        rows.append((label, text))
        log(f"  {label:46} {text}")

    made: list[str] = []  # store paths this run put into the default /nix/store
    try:
        log(f"bench/nix.py: temp dir {work}, token {token}")
        nix = bench.nix
        t = time.perf_counter()
        closure = make_closure(nix, work, token, args.quick)
        made += closure["paths"]
        small = make_small_paths(nix, work, token, n_first)
        made += small
        nar_mib = closure["nar_bytes"] / MiB
        log(f"closure: {len(closure['paths'])} paths, {nar_mib:.1f} MiB of NAR "
            f"({closure['random_bytes'] / MiB:.0f} MiB random, {closure['text_bytes'] / MiB:.1f} MiB text) "
            f"built in {time.perf_counter() - t:.1f}s")

        # daemon A holds the closure (pushed by runner A's Nix), the static cache holds it as xz
        a = bench.daemon("a")
        # C is a third runner (it takes provider records, and later serves the no-negative-cache figures)
        c = bench.daemon("c", bootstrap=[a.addr], extra=["--negative-ttl", "0"])
        wait_peers(a, 1)
        t = time.perf_counter()
        cpu_a = cpu_seconds(a.proc.pid)
        push_auth = f"netrc-file = {a.netrc}\n"  # uploads need the daemon's API token
        nix.run("nix", "copy", "--to", f"{a.api}?compression=none", closure["top"], config=push_auth)
        push_a = time.perf_counter() - t
        cpu_a = cpu_seconds(a.proc.pid) - cpu_a
        nix.run("nix", "copy", "--to", f"{a.api}?compression=none", *small, config=push_auth)
        a.wait_announced(2 * (len(closure["paths"]) + len(small)), timeout=60)
        static_dir = work / "static-cache"
        t = time.perf_counter()
        nix.run("nix", "copy", "--to", f"file://{static_dir}?compression=xz&compression-level={args.xz_level}"
                "&parallel-compression=true", closure["top"])
        push_static = time.perf_counter() - t
        xz_bytes = sum(f.stat().st_size for f in (static_dir / "nar").iterdir())
        static_url, static_proc = bench.static_server(static_dir)
        log(f"pushed: to A (compression=none) {push_a:.1f}s (A used {cpu_a:.1f}s CPU); "
            f"to file:// xz level {args.xz_level} {push_static:.1f}s, {xz_bytes / MiB:.1f} MiB of .nar.xz")

        # the copies: static and cold p2pcache alternate, then warm p2pcache
        static_runs, cold_runs, warm_runs = [], [], []
        b = None
        for i in range(runs):
            r = bench.copy(static_url, closure, {"server": static_proc.pid})
            static_runs.append(r)
            log(f"  static #{i + 1}: {r['wall']:.2f}s  cpu {r['cpu']}")
            if b is not None:
                bench.stop(b)
            b = bench.daemon(f"b{i}", bootstrap=[a.addr], extra=["--negative-ttl", str(NEGATIVE_TTL)],
                             profile=args.profile and i == 0)
            wait_peers(b, 2)
            r = bench.copy(b.api, closure, {"A": a.proc.pid, "B": b.proc.pid})
            r["fetched_peer"] = metric(b, "p2pcache_bytes_fetched_total", source="peer")
            r["lookup_hit_sum"] = metric(b, "p2pcache_lookup_seconds_sum", result="hit")
            r["lookup_hit_count"] = metric(b, "p2pcache_lookup_seconds_count", result="hit")
            cold_runs.append(r)
            log(f"  p2pcache cold #{i + 1}: {r['wall']:.2f}s  cpu {r['cpu']}  "
                f"fetched from peer {r['fetched_peer'] / MiB:.1f} MiB, "
                f"{r['lookup_hit_count']:.0f} narinfo lookups took {r['lookup_hit_sum']:.2f}s in all")
        assert b is not None
        for i in range(runs):
            r = bench.copy(b.api, closure, {"A": a.proc.pid, "B": b.proc.pid})
            warm_runs.append(r)
            log(f"  p2pcache warm #{i + 1}: {r['wall']:.2f}s  cpu {r['cpu']}")

        # raw NAR reads over HTTP without Nix: what the servers can deliver
        raw = {}
        with httpx.Client(timeout=120) as client:
            for label, base in (("B", b.api), ("static", static_url)):
                t = time.perf_counter()
                n = 0
                for p in closure["paths"]:
                    info = client.get(f"{base}/{p.split('/')[-1][:32]}.narinfo").text
                    url = next(line.split(": ", 1)[1] for line in info.splitlines() if line.startswith("URL: "))
                    with client.stream("GET", f"{base}/{url}") as resp:
                        for piece in resp.iter_raw(1 << 20):
                            n += len(piece)
                raw[label] = (n, time.perf_counter() - t)

        # narinfo latency
        lat = {}
        rng = random.Random(token)
        local_hashes = [p.split("/")[-1][:32] for p in closure["paths"]]
        with httpx.Client(timeout=60) as client:
            lat["hit, local (B holds the path)"] = timed_gets(
                client, b.api, [local_hashes[i % len(local_hashes)] for i in range(n_req)], 200)
            small_hashes = [p.split("/")[-1][:32] for p in small]
            lat["hit, first ask (only A has it: swarm)"] = timed_gets(client, b.api, small_hashes, 200)
            few = [random_hash(rng) for _ in range(5)]
            lat["miss, first ask of 5 new hashes"] = timed_gets(client, b.api, few, 404)
            lat["miss, negative cache (5 hashes repeated)"] = timed_gets(
                client, b.api, [few[i % len(few)] for i in range(n_req)], 404)
            lat["miss, fresh random hash each time"] = timed_gets(
                client, b.api, [random_hash(rng) for _ in range(n_req)], 404)
            few_c = [random_hash(rng) for _ in range(5)]
            lat["miss, --negative-ttl 0 (5 hashes repeated)"] = timed_gets(
                client, c.api, [few_c[i % len(few_c)] for i in range(n_req)], 404)
        neg_hits_b = metric(b, "p2pcache_narinfo_negative_cache_hits_total")
        status_b = b.status()
        bench.close()

        # report
        log("")
        log(f"== nix copy of a {len(closure['paths'])}-path closure, {nar_mib:.1f} MiB NAR "
            f"({closure['random_bytes'] / MiB:.0f} MiB random + {closure['text_bytes'] / MiB:.1f} MiB text), "
            "into fresh chroot stores")
        smin = min(r["wall"] for r in static_runs)
        cmin = min(r["wall"] for r in cold_runs)
        wmin = min(r["wall"] for r in warm_runs)

        def runs_text(rs: list[dict]) -> str:
            return ", ".join(f"{r['wall']:.2f}" for r in rs)

        def cpu_text(rs: list[dict]) -> str:
            best = min(rs, key=lambda r: r["wall"])
            return " ".join(f"{k} {v:.1f}s" for k, v in best["cpu"].items())

        row("static xz cache (http.server)", f"min {smin:6.2f}s  ({nar_mib / smin:5.1f} MiB/s)  runs [{runs_text(static_runs)}]  cpu: {cpu_text(static_runs)}")
        row("p2pcache B cold (NARs from A over swarm)", f"min {cmin:6.2f}s  ({nar_mib / cmin:5.1f} MiB/s)  runs [{runs_text(cold_runs)}]  cpu: {cpu_text(cold_runs)}")
        row("p2pcache B warm (B holds the closure)", f"min {wmin:6.2f}s  ({nar_mib / wmin:5.1f} MiB/s)  runs [{runs_text(warm_runs)}]  cpu: {cpu_text(warm_runs)}")
        row("ratio p2pcache cold / static (goal <= 1.0)", f"{cmin / smin:.2f}")
        row("ratio p2pcache warm / static", f"{wmin / smin:.2f}")
        for label, (n, secs) in raw.items():
            row(f"raw NAR GETs from {label} (no Nix)", f"{secs:6.2f}s  ({n / MiB / secs:6.1f} MiB/s of body, {n / MiB:.1f} MiB)")
        row("push: nix copy --to http://A (none)", f"{push_a:6.2f}s  (A CPU {cpu_a:.1f}s)")
        row(f"push: nix copy --to file:// (xz {args.xz_level})", f"{push_static:6.2f}s  ({xz_bytes / MiB:.1f} MiB .nar.xz)")
        log("")
        log(f"== narinfo latency, sequential GETs on one connection (--lookup-timeout {LOOKUP_TIMEOUT:g}, "
            f"B --negative-ttl {NEGATIVE_TTL:g}, C --negative-ttl 0)")
        for label, xs in lat.items():
            row(label, f"p50 {pct(xs, 50) * 1000:8.2f} ms  p99 {pct(xs, 99) * 1000:8.2f} ms  "
                       f"max {max(xs) * 1000:8.2f} ms  (n={len(xs)})")
        log(f"  B: negative cache hits {neg_hits_b:.0f}, lookups {status_b.get('lookups')}")

        common = {"paths": len(closure["paths"]), "nar_mib": round(nar_mib, 1), "quick": args.quick}
        emit("copy_static_seconds", smin, "s", "lower", runs=[round(r["wall"], 3) for r in static_runs],
             xz_level=args.xz_level, **common)
        emit("copy_p2pcache_cold_seconds", cmin, "s", "lower", runs=[round(r["wall"], 3) for r in cold_runs],
             **common)
        emit("copy_p2pcache_warm_seconds", wmin, "s", "lower", runs=[round(r["wall"], 3) for r in warm_runs],
             **common)
        emit("copy_p2pcache_cold_over_static", cmin / smin, "ratio", "lower", goal="<= 1.0", **common)
        emit("copy_p2pcache_warm_over_static", wmin / smin, "ratio", "lower", **common)
        emit("copy_static_mib_per_s", nar_mib / smin, "MiB/s", "higher", **common)
        emit("copy_p2pcache_cold_mib_per_s", nar_mib / cmin, "MiB/s", "higher", **common)
        emit("push_http_a_seconds", push_a, "s", "lower", **common)
        emit("push_file_xz_seconds", push_static, "s", "lower", xz_level=args.xz_level, **common)
        for label, (n, secs) in raw.items():
            emit(f"raw_nar_get_{label.lower()}_mib_per_s", n / MiB / secs, "MiB/s", "higher", **common)
        names = {"hit, local (B holds the path)": "narinfo_hit_local",
                 "hit, first ask (only A has it: swarm)": "narinfo_hit_swarm_first",
                 "miss, first ask of 5 new hashes": "narinfo_miss_first",
                 "miss, negative cache (5 hashes repeated)": "narinfo_miss_negative_cache",
                 "miss, fresh random hash each time": "narinfo_miss_fresh",
                 "miss, --negative-ttl 0 (5 hashes repeated)": "narinfo_miss_no_negative_cache"}
        for label, xs in lat.items():
            for p in (50, 99):
                emit(f"{names[label]}_p{p}_ms", pct(xs, p) * 1000, "ms", "lower", n=len(xs),
                     lookup_timeout=LOOKUP_TIMEOUT)
        if bench.profiles:
            for prof in bench.profiles:
                if prof.exists():
                    log(f"\n== cProfile of {prof.stem} (main thread; worker threads not included), top by tottime")
                    s = io.StringIO()
                    pstats.Stats(str(prof), stream=s).sort_stats("tottime").print_stats(25)
                    log(s.getvalue())
        log(f"\nbench/nix.py done in {time.perf_counter() - t_start:.0f}s")
        return 0
    finally:
        bench.close()
        if made and not args.keep:  # nothing roots them (nix-build --no-out-link): give the space back
            delete_paths(bench.nix, made)
        if args.keep:
            log(f"kept {work}")
        else:
            rmtree(work)


if __name__ == "__main__":
    sys.exit(main())
