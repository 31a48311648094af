"""Run every benchmark in one go (`make bench`). Each prints a table on stderr and JSON lines on stdout;
this collects the JSON lines into bench/results.jsonl and prints the ratios at the end.

`--quick` passes --quick to every benchmark (smaller sizes; same ratios, noisier)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXTRA_ARGS = {"dedup.py": ["--jsonl", "-"], "nixcopy.py": ["--timeline"]}
BENCHES = ["ingest.py", "store_layouts.py", "store_random_read.py", "api_add.py", "dedup_repo.py", "dedup.py", "nar.py",
           "bitswap.py", "wire.py", "dagxfer.py", "dht.py", "nix.py", "nixcopy.py", "nixwarm.py", "fuzz_nix.py", "fuzz_wire.py", "stream_threads.py",
           "buildcache.py", "prefetch.py", "peerrecovery.py", "simnet:dht-lookup", "simnet:fleet-fanout", "simnet:dht-announce",
           "simnet:node-fetch@1-provider", "simnet:node-fetch@4-providers", "simnet:node-fetch@4-providers-one-killed", "simnet:node-fetch@fleet-mesh"]
# simnet scenarios: (full-mode --set overrides, quick-mode --set overrides)
SIMNET = {
    "dht-lookup": ([], ["nodes=200", "lookups=200"]),
    "fleet-fanout": (["runners=200", "artifact_size=128MiB"], ["runners=50", "artifact_size=32MiB"]),
    "dht-announce": ([], ["nodes=60", "keys=1000", "baseline_keys=50"]),
    # one fetcher with a 1 Gbit/s link, providers on wan-100m-40ms: DAG transfer from several providers
    "node-fetch@1-provider": (["nodes=2", "seeds=1", "artifact_size=256MiB", "fetcher_link=lan-1g"],
                              ["nodes=2", "seeds=1", "artifact_size=64MiB", "fetcher_link=lan-1g"]),
    "node-fetch@4-providers": (["nodes=5", "seeds=4", "artifact_size=256MiB", "fetcher_link=lan-1g"],
                               ["nodes=5", "seeds=4", "artifact_size=64MiB", "fetcher_link=lan-1g"]),
    "node-fetch@4-providers-one-killed": (
        ["nodes=5", "seeds=4", "artifact_size=256MiB", "fetcher_link=lan-1g", "kill_seed_at=0.3"],
        ["nodes=5", "seeds=4", "artifact_size=64MiB", "fetcher_link=lan-1g", "kill_seed_at=0.3"]),
    # issue 14 with real Nodes and the daemon's defaults: 20 runners x 16 MiB from one seed, lan-1g, the
    # full mesh mDNS makes of a LAN (p99 over one transfer, seed copies; ~1 CPU-min)
    "node-fetch@fleet-mesh": (["nodes=21", "artifact_size=16MiB", "link=lan-1g", "degree=20"],
                              ["nodes=11", "artifact_size=8MiB", "link=lan-1g", "degree=10"]),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", help="bench file names to run (default: all present)")
    args = ap.parse_args()
    out = HERE / "results.jsonl"
    results: list[dict] = []
    failed = []
    for name in args.only or BENCHES:
        if name.startswith("simnet:"):
            scenario = name.split(":", 1)[1]
            sets = SIMNET[scenario][1 if args.quick else 0]
            scenario = scenario.split("@", 1)[0]  # "node-fetch@4-providers": a variant of node-fetch
            cmd = [sys.executable, "-m", "simnet", "run", str(HERE.parent / "simnet" / "scenarios" / f"{scenario}.toml"),
                   "--seed", "1"] + [a for kv in sets for a in ("--set", kv)]
        else:
            path = HERE / name
            if not path.exists():
                print(f"== {name}: not present, skipped", file=sys.stderr)
                continue
            cmd = [sys.executable, str(path)] + (["--quick"] if args.quick else []) + EXTRA_ARGS.get(name, [])
        print(f"== {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=HERE.parent)
        for line in proc.stdout.splitlines():
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                print(line)
                continue
            if "@" in name:
                result["variant"] = name.split("@", 1)[1]
            results.append(result)
        print(f"== {name}: exit {proc.returncode} in {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
        if proc.returncode:
            failed.append(name)
    out.write_text("".join(json.dumps(r) + "\n" for r in results))
    print(f"\n{len(results)} results in {out}", file=sys.stderr)
    for r in results:
        if r.get("unit") == "ratio":
            print(f"  {r.get('bench', '?'):8} {r['metric']:40} {r['value']:8.3f}  (higher is better"
                  + (f", goal {r['goal']}" if "goal" in r else "") + ")", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
