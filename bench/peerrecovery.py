"""Dead and restarted peers, with real daemons on loopback, each figure against a baseline in the same run.

1. Announcing at start: a fresh node B whose first bootstrap address accepts TCP and never answers (a host
   that vanished behind a firewall looks so) against one bootstrapped to the live peer A only. Measured:
   seconds from B's start to its ready line, and from its `add` to its first ADD_PROVIDER a peer took
   (`status` -> `announce.add_providers_sent`).
2. A provider that restarted: A is killed, B's fetch fails meanwhile, A starts again on its old address,
   alone (nobody hears of it: only B's own dial can find it). Measured: seconds of B's next `get` from A,
   against B's `get` of another archive from a provider that never went away.

Prints a table on stderr and JSON lines on stdout: {"bench", "metric", "value", "unit", "better", ...}.
    .venv/bin/python bench/peerrecovery.py [--runs 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pcache.net.host import HostConfig, NodeHost  # noqa: E402
from tests.helpers.daemons import Daemon, free_port, start_daemon  # noqa: E402


def emit(metric: str, value: float, unit: str, better: str, **extra) -> None:
    print(json.dumps({"bench": "peerrecovery", "metric": metric, "value": round(value, 4), "unit": unit,
                      "better": better, **extra}), flush=True)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def first_announce(tmp: Path, a: Daemon, bootstrap: list[str], name: str) -> tuple[float, float]:
    """(seconds to B's ready line, seconds from B's add to its first ADD_PROVIDER taken)."""
    start = time.monotonic()
    b = start_daemon(tmp / name, bootstrap=bootstrap)
    try:
        ready = time.monotonic() - start
        src = tmp / f"{name}.bin"
        src.write_bytes(os.urandom(4096))
        added = time.monotonic()
        b.cli("add", str(src))
        while b.status()["announce"]["add_providers_sent"] < 1:
            if time.monotonic() - added > 120:
                raise RuntimeError(f"{name}: no ADD_PROVIDER within 120 s")
            time.sleep(0.02)
        return ready, time.monotonic() - added
    finally:
        b.stop()


def restart_fetch(tmp: Path, run: int) -> tuple[float, float]:
    """(seconds of B's get from a provider that never went away, of B's get from A just restarted)."""
    hub = start_daemon(tmp / f"hub{run}")
    listen = f"/ip4/127.0.0.1/tcp/{free_port()}"
    a = start_daemon(tmp / f"a{run}", bootstrap=[hub.addr], listen=listen)
    b = start_daemon(tmp / f"b{run}", bootstrap=[hub.addr])
    started = [hub, a, b]
    try:
        steady, gone = (os.urandom(1 << 20) for _ in range(2))
        for data, holder in ((steady, hub), (gone, a)):
            (tmp / "x.bin").write_bytes(data)
            holder.cli("add", str(tmp / "x.bin"))
            holder.wait_announced(3)
        t = time.monotonic()
        b.cli("get", "sha256:" + hashlib.sha256(steady).hexdigest(), "-o", str(tmp / "steady.out"))
        baseline = time.monotonic() - t
        a.kill()
        sha = "sha256:" + hashlib.sha256(gone).hexdigest()
        if b.cli("get", sha, "-o", str(tmp / "o1"), check=False).returncode == 0:
            raise RuntimeError("the fetch from a killed provider succeeded")
        a = start_daemon(tmp / f"a{run}", listen=listen)
        started.append(a)
        t = time.monotonic()
        while b.cli("get", sha, "-o", str(tmp / "o2"), check=False).returncode != 0:  # old code: about 60 s
            if time.monotonic() - t > 120:
                raise RuntimeError("no fetch from the restarted provider within 120 s")
            time.sleep(0.5)
        return baseline, time.monotonic() - t
    finally:
        for d in started:
            d.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one run of each")
    args = ap.parse_args()
    runs = 1 if args.quick else args.runs
    tmp = Path(tempfile.mkdtemp(prefix="p2pcache-bench-peerrecovery-"))
    log(f"bench/peerrecovery.py: temp dir {tmp} (2 cores shared with other work: compare same-run ratios)")
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)  # completes TCP handshakes into its backlog, never answers
    dead_id = NodeHost(HostConfig(identity=tmp / "dead.key")).peer_id.to_base58()
    blackhole = f"/ip4/127.0.0.1/tcp/{hole.getsockname()[1]}/p2p/{dead_id}"
    a = start_daemon(tmp / "a")
    res: dict[str, list[float]] = {k: [] for k in ("ready live", "ready dead-first", "announce live",
                                                    "announce dead-first", "fetch steady", "fetch restarted")}
    try:
        for i in range(runs):
            for label, boot in (("live", [a.addr]), ("dead-first", [blackhole, a.addr])):
                ready, announce = first_announce(tmp, a, boot, f"b-{label}-{i}")
                res[f"ready {label}"].append(ready)
                res[f"announce {label}"].append(announce)
            steady, restarted = restart_fetch(tmp, i)
            res["fetch steady"].append(steady)
            res["fetch restarted"].append(restarted)
            log(f"  run {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in res.items()))
    finally:
        a.stop()
        hole.close()
    med = {k: statistics.median(v) for k, v in res.items()}
    log(f"\n== medians of {runs} run(s)")
    for k, v in med.items():
        log(f"  {k:22} {v:6.2f}s   runs [{', '.join(f'{x:.2f}' for x in res[k])}]")
        emit(k.replace(" ", "_") + "_seconds", v, "s", "lower", runs=[round(x, 3) for x in res[k]])
    for what, new, base in (("ready", "ready dead-first", "ready live"),
                            ("first ADD_PROVIDER after add", "announce dead-first", "announce live"),
                            ("fetch", "fetch restarted", "fetch steady")):
        ratio = med[new] / med[base]
        log(f"  {what}: {new} / {base}: {ratio:.2f}x")
        emit(f"{new.replace(' ', '_')}_over_{base.replace(' ', '_')}", ratio, "ratio", "lower")
    return 0


if __name__ == "__main__":
    sys.exit(main())
