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
    reps = 1 if args.quick else 2
    work = Path(tempfile.mkdtemp(prefix="p2pcache-bench-api-add-"))
    cli = " ".join([sys.executable, "-m", "p2pcache"])
    env = dict(os.environ)
    walls: dict[str, list[float]] = {"offline FILE": [], "daemon FILE": [], "offline -": [], "daemon -": []}
    cli_rss: dict[str, int] = {}
    try:
        # two daemons (one per form), so the stdin add of a file is never deduplicated against its FILE add
        d_file = start_daemon(work / "d-file", timeout=60)
        d_pipe = start_daemon(work / "d-pipe", timeout=60)
        try:
            before = vm_hwm_kib(d_file.proc.pid), vm_hwm_kib(d_pipe.proc.pid)
            for rep in range(reps):  # each repetition adds new bytes (fresh offline repos, new file)
                data = work / f"artifact-{rep}.bin"
                make_file(data, size)
                warm(data)
                runs = {
                    "offline FILE": f"{cli} --repo {work / f'offline-{rep}'} add {data}",
                    "daemon FILE": f"{cli} --repo {d_file.repo} add {data}",
                    "offline -": f"{cli} --repo {work / f'offline-stdin-{rep}'} add - < {data}",
                    "daemon -": f"{cli} --repo {d_pipe.repo} add - < {data}",
                }
                for label, cmd in runs.items():
                    r = run_measured(["/bin/sh", "-c", "exec " + cmd], env=env)
                    assert r["rc"] == 0, (label, r["stderr"])
                    walls[label].append(r["wall"])
                    cli_rss[label] = max(cli_rss.get(label, 0), r["maxrss_kib"])
                for repo in (f"offline-{rep}", f"offline-stdin-{rep}"):
                    shutil.rmtree(work / repo, ignore_errors=True)
                data.unlink()
            after = vm_hwm_kib(d_file.proc.pid), vm_hwm_kib(d_pipe.proc.pid)
        finally:
            d_file.stop()
            d_pipe.stop()
        best = {k: min(v) for k, v in walls.items()}
        rows = [
            ("add FILE: offline / through the daemon (wall)", best["offline FILE"] / best["daemon FILE"], "ratio", "higher"),
            ("add -: offline / through the daemon (wall)", best["offline -"] / best["daemon -"], "ratio", "higher"),
            *[(f"add {k} wall (best of {reps})", v, "s", "lower") for k, v in best.items()],
            ("daemon peak RSS before, add FILE daemon", before[0] / 1024, "MiB", "lower"),
            ("daemon peak RSS after, add FILE daemon", after[0] / 1024, "MiB", "lower"),
            ("daemon peak RSS before, add - daemon", before[1] / 1024, "MiB", "lower"),
            ("daemon peak RSS after, add - daemon", after[1] / 1024, "MiB", "lower"),
            *[(f"CLI peak RSS, add {k}", v / 1024, "MiB", "lower") for k, v in cli_rss.items()],
        ]
        print(f"api_add: {size / (1 << 30):.2f} GiB file, best of {reps}, machine load {os.getloadavg()[0]:.1f}",
              file=sys.stderr)
        for metric, value, unit, better in rows:
            print(f"  {metric:48} {value:9.3f} {unit}", file=sys.stderr)
            emit(metric, value, unit, better, size=size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
