"""Peak RSS of one command, measured right.

ru_maxrss survives execve, so a child forked from a big benchmark process would report the parent's peak.
A tiny launcher process forks and execs the measured command and reports that process's own ru_maxrss
(wait4), its exit code and its wall time.
"""

from __future__ import annotations

import json
import subprocess
import sys

_LAUNCHER = """
import os, sys, json, time
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss,
                  "wall": time.perf_counter() - t}))
"""


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd` (cmd[0] an executable path); {"rc", "maxrss_kib", "wall", "stderr"}."""
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], env=env, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines else {"rc": proc.returncode, "maxrss_kib": 0, "wall": 0.0}
    result["stderr"] = proc.stderr
    return result
