"""NAR streaming bridge: `aio.drain_thread` (pieces made in pool threads, ~1 MiB per hop, no thread held
while the reader stalls) against the bridge it replaced (one worker thread per stream for the whole stream,
kept here as the baseline), in the same run.

Measures (1) throughput of one stream, 1 GiB in 256 KiB pieces with a sha256 per piece in the thread, and
(2) worker threads held by 45 streams whose reader never reads (trio's default pool has 40).
Prints JSON lines and a table on stderr.

    .venv/bin/python bench/stream_threads.py [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import threading
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pcache.aio import drain_thread  # noqa: E402


async def one_thread_per_stream(make_iter, deliver) -> None:
    """The previous bridge: a worker thread runs the whole iterator, handing each piece over."""
    send_ch, recv_ch = trio.open_memory_channel(4)

    def worker() -> None:
        try:
            for piece in make_iter():
                trio.from_thread.run(send_ch.send, piece)
        except trio.BrokenResourceError:
            pass
        finally:
            trio.from_thread.run_sync(send_ch.close)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, worker)
        async with recv_ch:
            async for piece in recv_ch:
                await deliver(piece)


def pieces(n: int, piece: bytes):
    def make():
        h = hashlib.sha256()
        for _ in range(n):
            h.update(piece)
            yield piece
    return make


async def throughput(bridge, n: int) -> float:
    piece = bytes(256 << 10)
    got = 0

    async def deliver(p: bytes) -> None:
        nonlocal got
        got += len(p)
        await trio.sleep(0)

    t = time.perf_counter()
    await bridge(pieces(n, piece), deliver)
    return got / (time.perf_counter() - t) / 1e6


async def threads_held(bridge, streams: int) -> int:
    limiter = trio.CapacityLimiter(1000)

    async def stalled(p: bytes) -> None:
        await trio.sleep_forever()  # a reader that never reads

    async with trio.open_nursery() as nursery:
        for _ in range(streams):
            if bridge is drain_thread:
                nursery.start_soon(lambda: drain_thread(pieces(1000, b"x" * 65536), stalled, limiter=limiter))
            else:
                nursery.start_soon(bridge, pieces(1000, b"x" * 65536), stalled)
        await trio.sleep(1.0)
        held = sum(1 for t in threading.enumerate() if _busy(t))  # idle cached trio threads do not count
        nursery.cancel_scope.cancel()
    return held


def _busy(t: threading.Thread) -> bool:
    """Is this thread inside a bridge's work (the old worker loop, or a drain_thread batch)?"""
    frame = sys._current_frames().get(t.ident)
    while frame is not None:
        if frame.f_code.co_name in ("worker", "batch", "start"):
            return True
        frame = frame.f_back
    return False


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 1024 if args.quick else 4096
    rounds = 2 if args.quick else 3
    old = [trio.run(throughput, one_thread_per_stream, n) for _ in range(rounds)]
    new = [trio.run(throughput, drain_thread, n) for _ in range(rounds)]
    best_old, best_new = max(old), max(new)
    held_old = trio.run(threads_held, one_thread_per_stream, 45)
    held_new = trio.run(threads_held, drain_thread, 45)
    results = [
        {"bench": "stream", "metric": "drain_thread throughput / one thread per stream", "value": best_new / best_old,
         "unit": "ratio", "new_mb_s": round(best_new), "old_mb_s": round(best_old)},
        {"bench": "stream", "metric": "threads held by 45 stalled readers", "new": held_new, "old": held_old},
    ]
    for r in results:
        print(json.dumps(r))
    print(f"one stream: {best_new:.0f} MB/s vs {best_old:.0f} MB/s (best of {rounds}) = {best_new / best_old:.2f}x; "
          f"threads held by 45 stalled readers: {held_new} vs {held_old}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
