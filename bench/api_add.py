"""`p2pcache add` through a running daemon (the CLI streams the file's bytes in the request body, issue 15)
against the offline `p2pcache add` of the same file into a repo of its own, measured in the same run.

- speed: wall time of the offline add (baseline) over wall time of the add through the daemon (ratio; 1.0
  means streaming over the authenticated loopback API costs nothing), for `add FILE` and `add -`.
- memory: the daemon's peak RSS (VmHWM) after the add minus before, and the CLI's own peak RSS (wait4).

Prints a table on stderr and JSON lines on stdout: {"metric", "value", "unit", "better", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import make_file, warm  # noqa: E402
from rss import run_measured  # noqa: E402
from tests.helpers.daemons import start_daemon  # noqa: E402

MiB = 1 << 20


def emit(metric: str, value: float, unit: str, better: str, **extra) -> None:
    print(json.dumps({"bench": "api_add", "metric": metric, "value": round(value, 4), "unit": unit,
                      "better": better, **extra}), flush=True)


def vm_hwm_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size-mib", type=int)
    args = ap.parse_args()
    size = (args.size_mib or (256 if args.quick else 1024)) * MiB
    work = Path(tempfile.mkdtemp(prefix="p2pcache-bench-api-add-"))
    cli = [sys.executable, "-m", "p2pcache"]
    try:
        data = work / "artifact.bin"
        make_file(data, size)
        warm(data)
        env = dict(os.environ, P2PCACHE_FSYNC=os.environ.get("P2PCACHE_FSYNC", "1"))

        offline = run_measured([*cli, "--repo", str(work / "offline"), "add", str(data)], env=env)
        assert offline["rc"] == 0, offline["stderr"]
        node = start_daemon(work / "node", timeout=60)
        try:
            before = vm_hwm_kib(node.proc.pid)
            through = run_measured([*cli, "--repo", str(node.repo), "add", str(data)], env=env)
            assert through["rc"] == 0, through["stderr"]
            after = vm_hwm_kib(node.proc.pid)
            # stdin: a second file of other bytes, so this add is not deduplicated against the first
            other = work / "other.bin"
            make_file(other, size)
            warm(other)
            offline3 = run_measured(["/bin/sh", "-c", f"{' '.join(cli)} --repo {work / 'offline-stdin'} add - < {other}"],
                                    env=env)
            assert offline3["rc"] == 0, offline3["stderr"]
            piped = run_measured(["/bin/sh", "-c", f"{' '.join(cli)} --repo {node.repo} add - < {other}"], env=env)
            assert piped["rc"] == 0, piped["stderr"]
            after_pipe = vm_hwm_kib(node.proc.pid)
        finally:
            node.stop()
        gib = size / (1 << 30)
        rows = [
            ("add FILE: offline / through the daemon (wall)", offline["wall"] / through["wall"], "ratio", "higher"),
            ("add -: offline / through the daemon (wall)", offline3["wall"] / piped["wall"], "ratio", "higher"),
            ("add FILE offline wall", offline["wall"], "s", "lower"),
            ("add FILE through the daemon wall", through["wall"], "s", "lower"),
            ("add - offline wall", offline3["wall"], "s", "lower"),
            ("add - through the daemon wall", piped["wall"], "s", "lower"),
            ("daemon peak RSS before the adds", before / 1024, "MiB", "lower"),
            ("daemon peak RSS after add FILE", after / 1024, "MiB", "lower"),
            ("daemon peak RSS after add -", after_pipe / 1024, "MiB", "lower"),
            ("CLI peak RSS, add FILE through the daemon", through["maxrss_kib"] / 1024, "MiB", "lower"),
            ("CLI peak RSS, offline add FILE", offline["maxrss_kib"] / 1024, "MiB", "lower"),
        ]
        print(f"api_add: {gib:.2f} GiB file, machine load {os.getloadavg()[0]:.1f}", file=sys.stderr)
        for metric, value, unit, better in rows:
            print(f"  {metric:48} {value:9.3f} {unit}", file=sys.stderr)
            emit(metric, value, unit, better, size=size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
