"""Bitswap throughput: p2pcache's driver vs py-libp2p's BitswapClient vs the raw py-libp2p stream ceiling vs
js-libp2p + @helia/bitswap (js -> js), one seeder -> one leecher over loopback TCP + Noise + Yamux; and 4
seeders -> 1 leecher with our driver.

    .venv/bin/python bench/bitswap.py [--quick] [--runs N]

Every seeder is its own process (so a seeder and the leecher do not share one Python thread); the leecher
runs here. Same data everywhere: SIZE bytes in BLOCK-byte raw blocks from a fixed seed. Each figure is the
best of --runs. Table on stderr, JSON lines on stdout ({"bench","metric","value","unit","better",...}).
The js figure needs `npm ci --prefix tests/interop`; without it that row is reported as skipped.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p2pcache.content.cid import CID, RAW  # noqa: E402
from p2pcache.net.bitswap import BitswapExchange  # noqa: E402
from p2pcache.net.host import HostConfig, open_host  # noqa: E402

RAW_PROTOCOL = "/p2pcache-bench/raw/1"
INTEROP = ROOT / "tests" / "interop"


def make_blocks(size: int, block: int, seed: int) -> list[tuple[CID, bytes]]:
    rng = random.Random(seed)
    out = []
    for _ in range(size // block):
        data = rng.randbytes(block)
        out.append((CID.for_block(RAW, data), data))
    return out


class DictSource:
    def __init__(self, blocks):
        self.blocks = dict(blocks)

    def has(self, cid):
        return cid in self.blocks

    def size(self, cid):
        d = self.blocks.get(cid)
        return None if d is None else len(d)

    def get(self, cid):
        return self.blocks.get(cid)


def host_config(tmp: Path, name: str, swarm_key: bytes | None = None, stock: bool = False) -> HostConfig:
    """A loopback host; `stock`: on py-libp2p's own Noise + Yamux (`HostConfig.stock_data_path`)."""
    return HostConfig(identity=tmp / f"{name}.key", listen=("/ip4/127.0.0.1/tcp/0",), swarm_key=swarm_key,
                      stock_data_path=stock)


# -- seeder processes -----------------------------------------------------------------------------


async def serve(kind: str, size: int, block: int, seed: int) -> None:
    blocks = make_blocks(size, block, seed)
    with tempfile.TemporaryDirectory() as tmp:
        async with open_host(host_config(Path(tmp), "seeder")) as host:
            async with trio.open_nursery() as nursery:
                if kind == "ours":
                    ex = BitswapExchange(host, DictSource(blocks))
                    await nursery.start(ex.run)
                elif kind == "pylibp2p":
                    from libp2p.bitswap.client import BitswapClient

                    bs = BitswapClient(host.libp2p)
                    bs.set_nursery(nursery)
                    await bs.start()
                    for cid, data in blocks:
                        await bs.add_block(cid.buffer, data)
                elif kind == "raw":
                    payload = b"".join(d for _, d in blocks)

                    async def send_all(stream):
                        view = memoryview(payload)
                        for off in range(0, len(view), block):
                            await stream.write(bytes(view[off:off + block]))
                        await stream.close()

                    host.set_stream_handler(RAW_PROTOCOL, send_all)
                print(json.dumps({"addr": str(host.addrs()[0])}), flush=True)
                # serve until the parent closes our stdin
                await trio.to_thread.run_sync(sys.stdin.read)
                nursery.cancel_scope.cancel()


class Seeder:
    def __init__(self, kind: str, args: argparse.Namespace) -> None:
        cmd = [sys.executable, __file__, "--serve", kind, "--size", str(args.size), "--block", str(args.block),
               "--seed", str(args.seed)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"bench: the {kind} seeder did not start")
        self.addr = json.loads(line)["addr"]

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# -- leechers (this process) ----------------------------------------------------------------------


async def leech_ours(addrs: list[str], cids: list[CID], tmp: Path) -> float:
    async with open_host(host_config(tmp, "leech")) as host:
        ex = BitswapExchange(host, DictSource([]))
        async with trio.open_nursery() as nursery:
            await nursery.start(ex.run)
            for a in addrs:
                await host.connect(a)
            t0 = time.perf_counter()
            got = await ex.fetch_blocks(cids, addrs)
            elapsed = time.perf_counter() - t0
            assert len(got) == len(cids)
            nursery.cancel_scope.cancel()
    return elapsed


async def leech_pylibp2p(addr: str, cids: list[CID], tmp: Path) -> float:
    from libp2p.bitswap.client import BitswapClient

    async with open_host(host_config(tmp, "leech")) as host:
        async with trio.open_nursery() as nursery:
            bs = BitswapClient(host.libp2p)
            bs.set_nursery(nursery)
            await bs.start()
            peer = await host.connect(addr)
            t0 = time.perf_counter()
            got = await bs.new_session().get_blocks_batch([c.buffer for c in cids], peer_id=peer, timeout=120)
            elapsed = time.perf_counter() - t0
            assert len(got) == len(cids), f"py-libp2p fetched {len(got)} of {len(cids)}"
            nursery.cancel_scope.cancel()
    return elapsed


async def leech_raw(addr: str, total: int, tmp: Path, swarm_key: bytes | None = None, stock: bool = False) -> float:
    """Seconds from opening one raw stream to its `total`-th byte, on our data path or (`stock`) py-libp2p's."""
    async with open_host(host_config(tmp, f"leech-raw-{time.monotonic_ns()}", swarm_key, stock)) as host:
        peer = await host.connect(addr)
        t0 = time.perf_counter()
        stream = await host.new_stream(peer, [RAW_PROTOCOL])
        n = 0
        while n < total:
            data = await stream.read(1 << 20)
            if not data:
                break
            n += len(data)
        elapsed = time.perf_counter() - t0
        assert n == total, f"raw stream delivered {n} of {total} bytes"
    return elapsed


def js_to_js(args: argparse.Namespace) -> float | None:
    node = shutil.which("node")
    if node is None or not (INTEROP / "node_modules" / "@helia" / "bitswap").is_dir():
        return None
    cmd = [node, "--import", str(INTEROP / "polyfill.mjs"), str(INTEROP / "peer.mjs")]
    seeder = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    leecher = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        def call(p, **req):
            p.stdin.write(json.dumps({"id": 1, **req}) + "\n")
            p.stdin.flush()
            while True:
                msg = json.loads(p.stdout.readline())
                if msg.get("id") == 1:
                    if "error" in msg:
                        raise SystemExit(f"bench: js peer: {msg['error']}")
                    return msg

        s_ready = json.loads(seeder.stdout.readline())
        json.loads(leecher.stdout.readline())
        cids = call(seeder, cmd="gen", count=args.size // args.block, size=args.block, seed=args.seed)["cids"]
        call(leecher, cmd="dial", addr=s_ready["addrs"][0])
        reply = call(leecher, cmd="want", cids=cids, timeout=300000, **{"return": False})
        assert all(b["ok"] for b in reply["blocks"])
        return reply["seconds"]
    finally:
        for p in (seeder, leecher):
            p.kill()
            p.wait()


# -- orchestration --------------------------------------------------------------------------------


def best_of(runs: int, fn) -> float:
    return min(fn() for _ in range(runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 MiB instead of 64 MiB, one run each")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--block", type=int, default=256 * 1024)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--serve", choices=("ours", "pylibp2p", "raw"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.size is None:
        args.size = (16 if args.quick else 64) << 20
    runs = args.runs or (1 if args.quick else 2)
    if args.serve:
        trio.run(serve, args.serve, args.size, args.block, args.seed)
        return

    cids = [c for c, _ in make_blocks(args.size, args.block, args.seed)]
    mb = args.size / 1e6
    results: dict[str, float] = {}

    def one(kind: str, leech) -> float:
        seeders = [Seeder(kind, args)] if kind != "ours4" else [Seeder("ours", args) for _ in range(4)]
        try:
            with tempfile.TemporaryDirectory() as tmp:
                return trio.run(leech, [s.addr for s in seeders], Path(tmp))
        finally:
            for s in seeders:
                s.close()

    plan = {
        "raw_stream": ("raw", lambda addrs, tmp: leech_raw(addrs[0], args.size, tmp)),
        "p2pcache": ("ours", lambda addrs, tmp: leech_ours(addrs, cids, tmp)),
        "py_libp2p_bitswap": ("pylibp2p", lambda addrs, tmp: leech_pylibp2p(addrs[0], cids, tmp)),
        "p2pcache_4_seeders": ("ours4", lambda addrs, tmp: leech_ours(addrs, cids, tmp)),
    }
    for name, (kind, leech) in plan.items():
        results[name] = best_of(runs, functools.partial(one, kind, leech))
        print(f"  {name:<22} {mb / results[name]:8.1f} MB/s  ({results[name]:.2f} s)", file=sys.stderr)
    js = [t for t in (js_to_js(args) for _ in range(runs)) if t is not None]
    if js:
        results["js_helia_bitswap"] = min(js)
        print(f"  {'js_helia_bitswap':<22} {mb / results['js_helia_bitswap']:8.1f} MB/s", file=sys.stderr)

    common = {"size_bytes": args.size, "block_bytes": args.block, "runs": runs, "cpus": os.cpu_count()}

    def emit(metric: str, value: float, unit: str, better: str, **extra) -> None:
        print(json.dumps({"bench": "bitswap", "metric": metric, "value": round(value, 3), "unit": unit,
                          "better": better, **common, **extra}))

    rows = []
    for name, t in results.items():
        emit(f"{name}_throughput", mb / t, "MB/s", "higher")
    ours = results["p2pcache"]
    ratios = {
        "vs_py_libp2p_bitswap": results["py_libp2p_bitswap"] / ours,
        "vs_raw_stream_ceiling": results["raw_stream"] / ours,
        "4_seeders_speedup": ours / results["p2pcache_4_seeders"],
    }
    if "js_helia_bitswap" in results:
        ratios["vs_js_helia_bitswap"] = results["js_helia_bitswap"] / ours
    else:
        print("  js_helia_bitswap       skipped: run `npm ci --prefix tests/interop`", file=sys.stderr)
    for name, r in ratios.items():
        emit(name, r, "ratio", "higher")
        rows.append((name, r))
    print("\nbitswap, {:.0f} MiB in {} KiB blocks, best of {}:".format(args.size / 2**20, args.block // 1024, runs),
          file=sys.stderr)
    for name, r in rows:
        print(f"  p2pcache {name:<24} {r:6.2f}x", file=sys.stderr)


if __name__ == "__main__":
    main()
