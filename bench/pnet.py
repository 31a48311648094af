"""The swarm key's XSalsa20 (net/pnet.py): libsodium's, what the daemon uses, against pycryptodome's (the old
implementation, still the fallback) at the call sizes a private-network connection sees: 30 B (a Yamux window
update inside a Noise frame), 1 KiB, 64 KiB + 18 (a full Noise frame) and 256 KiB (a read-ahead).

    .venv/bin/python bench/pnet.py [--rounds N]

CPU seconds (process time, so load on the machine moves it less than wall time), rounds interleaved; per size
MB/s, microseconds per call and the ratio libsodium / pycryptodome (best round of each).
Table on stderr, JSON lines on stdout ({"bench": "pnet", "metric", "value", "unit", "better", ...}).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pcache.net import pnet  # noqa: E402

SIZES = (30, 1024, (64 << 10) + 18, 256 << 10)


def per_call(make, size: int, total: int) -> float:
    data = os.urandom(size)
    cipher = make(os.urandom(32), os.urandom(24))
    calls = max(200, total // size)
    t = time.process_time()
    for _ in range(calls):
        cipher.xor(data)
    return (time.process_time() - t) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mib", type=int, default=64, help="bytes per size and round, MiB")
    args = ap.parse_args()
    if pnet._SODIUM is None:
        raise SystemExit("bench: libsodium is not loadable here (Debian: apt-get install libsodium23)")
    impls = {"libsodium": pnet.SodiumXSalsa20, "pycryptodome": pnet.PycryptodomeXSalsa20}
    best: dict[tuple[str, int], float] = {}
    for _ in range(args.rounds):
        for size in SIZES:
            for name, make in impls.items():
                t = per_call(make, size, args.mib << 20)
                best[name, size] = min(best.get((name, size), t), t)
    print(f"XSalsa20, CPU time, best of {args.rounds} (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
    for size in SIZES:
        cells = []
        for name in impls:
            t = best[name, size]
            cells.append(f"{name} {size / t / 1e6:7.0f} MB/s {t * 1e6:7.2f} us/call")
            print(json.dumps({"bench": "pnet", "metric": f"xsalsa20_{name}_{size}B_MBps", "value": round(size / t / 1e6, 1),
                              "unit": "MB/s", "better": "higher"}))
        ratio = best["pycryptodome", size] / best["libsodium", size]
        print(f"  {size:7d} B  " + "  |  ".join(cells) + f"  |  libsodium {ratio:.2f}x", file=sys.stderr)
        print(json.dumps({"bench": "pnet", "metric": f"xsalsa20_libsodium_vs_pycryptodome_{size}B", "value": round(ratio, 3),
                          "unit": "ratio", "better": "higher"}))


if __name__ == "__main__":
    main()
