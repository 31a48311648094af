#!/usr/bin/env python3
"""The deterministic metrics of a fixed set of simnet runs, one JSON line per run, for checking that a
refactoring leaves simnet's engine scenarios byte-identical.

    python scripts/simnet_fingerprint.py OUT.jsonl          # in one checkout (about 3 min, seed 3)
    python scripts/simnet_fingerprint.py OTHER.jsonl        # in the other (e.g. `git archive main`)
    cmp OUT.jsonl OTHER.jsonl

The runs: the engine runs of tests/test_simnet.py's two-process determinism test, then each scenario at a
size that takes seconds to a minute (fleet-fanout 40 runners, dht-lookup 300 nodes, dht-announce 2000 keys,
the rest at their defaults). Records a program marks `deterministic: false` (wall time, node-fetch's timings)
are left out. Progress on stderr.
"""

import json
import sys
import time
from pathlib import Path

ROOT = Path.cwd()
sys.path.insert(0, str(ROOT))  # the checkout we are in, not an installed copy

from simnet.cli import run_scenario  # noqa: E402

RUNS = [
    ("fleet-fanout.toml", {"runners": "12", "artifact_size": "8MiB", "retry_after": "0.2s",
                           "leave_fraction": "0.25", "leave_at": "0.05s"}),
    ("partition-heal.toml", {"runners": "8", "artifact_size": "8MiB"}),
    ("bad-peer.toml", {"runners": "8", "artifact_size": "4MiB", "bad_behaviour": "corrupt"}),
    ("bad-peer.toml", {"runners": "8", "artifact_size": "4MiB", "bad_behaviour": "silent"}),
    ("dht-lookup.toml", {"nodes": "60", "lookups": "30", "keys": "10", "lookup_phase": "1min", "churn": "0.1"}),
    ("fleet-fanout.toml", {"runners": "40", "artifact_size": "32MiB"}),
    ("partition-heal.toml", {}),
    ("bad-peer.toml", {}),
    ("dht-lookup.toml", {"nodes": "300", "lookups": "100"}),
    ("dht-announce.toml", {"keys": "2000"}),
    ("node-fetch.toml", {}),
]


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/simnet_fingerprint.py OUT.jsonl (run from the checkout's top directory)")
    with open(sys.argv[1], "w") as out:
        for name, over in RUNS:
            t = time.monotonic()
            results, _ = run_scenario(str(ROOT / "simnet" / "scenarios" / name), 3, over)
            records = [r for r in results.records() if r.get("deterministic", True) is not False]
            out.write(json.dumps([name, over, records], sort_keys=True) + "\n")
            out.flush()
            print(f"{name} {over}: {time.monotonic() - t:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
