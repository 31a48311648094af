"""One raw stream between two host processes: our data path (`p2pcache.net.wire`: Noise transport messages
and Yamux of our own) against py-libp2p's stock Noise + Yamux (`HostConfig(stock_data_path=True)`).

    .venv/bin/python bench/wire.py [--quick] [--size MiB] [--runs N] [--pnet] [--stock | --ours]   (STOCK=1: --stock)

A server process per data path sends SIZE bytes (256 MiB) in 256 KiB writes on every stream of
/p2pcache-bench/raw/1; this process, a fresh host each run on the same data path, reads them. Runs alternate
ours / stock so load on the shared machine hits both alike; each prints MB/s, the CPU seconds (user +
system) of the reader (this process) and of the writer (the server process, from /proc) and the load average.
Summary: best MB/s and least CPU-s per side, and ours / stock. JSON lines on stdout, the table on stderr.
BENCH_WIRE_PROFILE=PATH: each server writes a cProfile (process time) to PATH.ours / PATH.stock.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p2pcache.net.host import open_host  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from bitswap import RAW_PROTOCOL as PROTOCOL, host_config, leech_raw  # noqa: E402  (the raw stream's both ends)

MiB = 1 << 20
WRITE = 256 << 10


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def emit(metric: str, value: float, unit: str, better: str, **extra) -> None:
    print(json.dumps({"bench": "wire", "metric": metric, "value": round(value, 4), "unit": unit, "better": better,
                      **extra}), flush=True)


async def serve(stock: bool, size: int, key: bytes | None) -> None:
    piece = os.urandom(WRITE)
    with tempfile.TemporaryDirectory(prefix="p2pcache-bench-wire-") as tmp:
        async with open_host(host_config(Path(tmp), "server", key, stock)) as host:

            async def send_all(stream) -> None:
                left = size
                while left:
                    n = min(left, WRITE)
                    await stream.write(piece if n == WRITE else piece[:n])
                    left -= n
                await stream.close()

            host.set_stream_handler(PROTOCOL, send_all)
            print(json.dumps({"addr": str(host.addrs()[0])}), flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)  # until the parent closes our stdin


class Server:
    def __init__(self, stock: bool, size: int, key: bytes | None) -> None:
        env = {**os.environ, "BENCH_WIRE_KEY": key.hex() if key else ""}
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", "stock" if stock else "ours",
                                      "--size", str(size // MiB)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("bench: a server did not start")
        self.addr = json.loads(line)["addr"]

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=None, help="MiB per stream (default 256; --quick 64)")
    ap.add_argument("--runs", type=int, default=None, help="runs of each data path, alternating (default 3; --quick 2)")
    ap.add_argument("--quick", action="store_true", help="64 MiB, 2 runs each")
    ap.add_argument("--pnet", action="store_true", help="both hosts in a private network (a swarm key)")
    ap.add_argument("--stock", action="store_true", help="only py-libp2p's Noise + Yamux (also: STOCK=1)")
    ap.add_argument("--ours", action="store_true", help="only our data path")
    ap.add_argument("--serve", choices=("ours", "stock"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.size = args.size or (64 if args.quick else 256)
    args.runs = args.runs or (2 if args.quick else 3)
    size = args.size * MiB
    if args.serve:
        key = bytes.fromhex(os.environ["BENCH_WIRE_KEY"]) if os.environ.get("BENCH_WIRE_KEY") else None
        if os.environ.get("BENCH_WIRE_PROFILE"):  # the writer's CPU profile (process time), written at exit
            import cProfile

            prof = cProfile.Profile(time.process_time)
            prof.runcall(trio.run, serve, args.serve == "stock", size, key)
            prof.dump_stats(os.environ["BENCH_WIRE_PROFILE"] + "." + args.serve)
            return
        trio.run(serve, args.serve == "stock", size, key)
        return
    key = os.urandom(32) if args.pnet else None
    kinds = ["ours", "stock"]
    if args.stock or os.environ.get("STOCK") == "1":
        kinds = ["stock"]
    elif args.ours:
        kinds = ["ours"]
    servers = {k: Server(k == "stock", size, key) for k in kinds}
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in kinds}
    log(f"== one raw stream, {args.size} MiB in 256 KiB writes{' (swarm key)' if key else ''}, "
        f"{args.runs} runs each, alternating")
    try:
        with tempfile.TemporaryDirectory(prefix="p2pcache-bench-wire-") as tmp:
            for i in range(args.runs):
                for k in kinds:
                    load = os.getloadavg()[0]
                    c0, s0 = time.process_time(), servers[k].cpu()
                    t = trio.run(leech_raw, servers[k].addr, size, Path(tmp), key, k == "stock")
                    reader, writer = time.process_time() - c0, servers[k].cpu() - s0
                    results[k].append((t, reader, writer))
                    log(f"  run {i + 1} {k:5}  {size / 1e6 / t:7.1f} MB/s  {t:6.2f} s   CPU-s reader {reader:5.2f}  "
                        f"writer {writer:5.2f}   load {load:.1f}")
                    emit("run", size / 1e6 / t, "MB/s", "higher", path=k, run=i + 1, reader_cpu_s=round(reader, 3),
                         writer_cpu_s=round(writer, 3), load=round(load, 2), pnet=bool(key))
    finally:
        for s in servers.values():
            s.close()
    best = {k: (size / 1e6 / min(r[0] for r in v), min(r[1] for r in v), min(r[2] for r in v))
            for k, v in results.items()}
    for k, (mbps, reader, writer) in best.items():
        log(f"  {k:5} best {mbps:7.1f} MB/s   least CPU-s reader {reader:5.2f}  writer {writer:5.2f}")
        emit(f"{k}_MBps", mbps, "MB/s", "higher", size=size, pnet=bool(key))
        emit(f"{k}_reader_cpu_seconds", reader, "s", "lower", size=size, pnet=bool(key))
        emit(f"{k}_writer_cpu_seconds", writer, "s", "lower", size=size, pnet=bool(key))
    if len(best) == 2:
        o, s = best["ours"], best["stock"]
        log(f"  ours / stock: {o[0] / s[0]:.2f}x MB/s; CPU stock / ours: reader {s[1] / o[1]:.2f}x, "
            f"writer {s[2] / o[2]:.2f}x")
        emit("ours_vs_stock_MBps", o[0] / s[0], "ratio", "higher", size=size, pnet=bool(key))
        emit("stock_vs_ours_reader_cpu", s[1] / o[1], "ratio", "higher", size=size, pnet=bool(key))
        emit("stock_vs_ours_writer_cpu", s[2] / o[2], "ratio", "higher", size=size, pnet=bool(key))


if __name__ == "__main__":
    main()
