"""The deterministic metrics of a fixed set of simnet runs, one JSON line per run: what a refactoring of
simnet or of the production code it drives must leave byte-identical.

    python -m simnet.fingerprint OUT.jsonl      # in one checkout (about 3 min, seed 3), from its top directory
    python -m simnet.fingerprint OTHER.jsonl    # in the other (e.g. an export of `git archive main`)
    cmp OUT.jsonl OTHER.jsonl

`ENGINE_RUNS` are every engine scenario, small (tests/test_simnet.py runs them in two processes with two
hash seeds); `FINGERPRINT_RUNS` add each scenario at a size that takes seconds to a minute. Records a program
marks `deterministic: false` (wall time, node-fetch's timings) are left out. Progress on stderr.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

__all__ = ["ENGINE_RUNS", "FINGERPRINT_RUNS", "fingerprint"]

# (scenario file, overrides). node-fetch runs real trio tasks and marks what can vary.
ENGINE_RUNS: list[tuple[str, dict[str, str]]] = [
    ("fleet-fanout.toml", {"runners": "12", "artifact_size": "8MiB", "retry_after": "0.2s",
                           "leave_fraction": "0.25", "leave_at": "0.05s"}),
    ("partition-heal.toml", {"runners": "8", "artifact_size": "8MiB"}),
    ("bad-peer.toml", {"runners": "8", "artifact_size": "4MiB", "bad_behaviour": "corrupt"}),
    ("bad-peer.toml", {"runners": "8", "artifact_size": "4MiB", "bad_behaviour": "silent"}),
    ("dht-lookup.toml", {"nodes": "60", "lookups": "30", "keys": "10", "lookup_phase": "1min", "churn": "0.1"}),
]

FINGERPRINT_RUNS: list[tuple[str, dict[str, str]]] = ENGINE_RUNS + [
    ("fleet-fanout.toml", {"runners": "40", "artifact_size": "32MiB"}),
    ("partition-heal.toml", {}),
    ("bad-peer.toml", {}),
    ("dht-lookup.toml", {"nodes": "300", "lookups": "100"}),
    ("dht-announce.toml", {"keys": "2000"}),
    ("node-fetch.toml", {}),
]

SCENARIOS = Path(__file__).resolve().parent / "scenarios"


def fingerprint(out_path: str, runs: list[tuple[str, dict[str, str]]] = FINGERPRINT_RUNS, seed: int = 3) -> None:
    from .cli import run_scenario

    with open(out_path, "w") as out:
        for name, over in runs:
            t = time.monotonic()
            results, _ = run_scenario(str(SCENARIOS / name), seed, over)
            records = [r for r in results.records() if r.get("deterministic", True) is not False]
            out.write(json.dumps([name, over, records], sort_keys=True) + "\n")
            out.flush()
            print(f"{name} {over}: {time.monotonic() - t:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m simnet.fingerprint OUT.jsonl")
    fingerprint(sys.argv[1])
