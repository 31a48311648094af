"""Build-directory cache save only: `p2pcache cache save` through a daemon (a fresh repo each time, files as
descriptors) against `tar | zstd -T0` to local disk, in rounds, optionally paired with another checkout's code
(`--old DIR`: the same save with PYTHONPATH=DIR, daemon and CLI), the order alternating from round to round.

Why beside bench/buildcache.py: that one runs every figure once (6-7 min at full size); on a 2-core machine
shared with other work one save's wall time swings with the load, so a change to the save is judged on
several paired rounds, each printing its seconds, its CPU seconds (CLI + daemon), tar|zstd's of the same round
and the load average. The build dir is bench/buildcache.py's (same sizes, same contents, same seed).

Prints a table on stderr and JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.buildcache import MiB, START_TIMEOUT, children_cpu, make_tree, process_cpu, timed  # noqa: E402
from tests.helpers.daemons import start_daemon  # noqa: E402


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def save_once(work: Path, build: Path, name: str, code: Path | None, env: dict) -> dict:
    """One save into a fresh daemon running `code` (None: this checkout)."""
    repo = work / f"repo-{name}"
    shutil.rmtree(repo, ignore_errors=True)
    extra = dict(env)
    if code is not None:
        extra["PYTHONPATH"] = str(code)
    # `python -m p2pcache` puts its working directory first on sys.path, ahead of PYTHONPATH: each variant
    # runs in its own checkout, or both would run the code of the directory the bench was started in.
    here = os.getcwd()
    os.chdir(code if code is not None else ROOT)
    try:
        d = start_daemon(repo, timeout=START_TIMEOUT, env=extra)
    finally:
        os.chdir(here)
    try:
        cenv = dict(os.environ, **extra, P2PCACHE_REPO=str(repo))
        c, c_daemon = children_cpu(), process_cpu(d.proc.pid)
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "p2pcache", "--json", "cache", "save", "main/bench-1",
                              str(build)], env=cenv, capture_output=True, timeout=1800, cwd=code or ROOT)
        wall = time.perf_counter() - t
        cpu_cli, cpu_daemon = children_cpu() - c, process_cpu(d.proc.pid) - c_daemon
        if res.returncode != 0:
            raise SystemExit(f"save ({name}) failed: {res.stderr.decode()}")
        got = json.loads(res.stdout)
        assert got["saved"], got
        return {"wall": wall, "cpu_cli": cpu_cli, "cpu_daemon": cpu_daemon, "root": got["root"]}
    finally:
        d.stop()
        shutil.rmtree(repo, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--old", type=Path, help="another checkout (say, main's) to pair against")
    ap.add_argument("--quick", action="store_true", help="2,000 files, 100 MiB")
    args = ap.parse_args()
    if args.quick:
        args.files, args.size_mib = 2000, 100
    work = Path(tempfile.mkdtemp(prefix="bench-bcsave-"))
    env = {"P2PCACHE_FSYNC": os.environ.get("P2PCACHE_FSYNC", "1"),  # the daemon's default, as bench/buildcache.py
           "PYTHONPYCACHEPREFIX": str(work / "pycache")}
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # as bench/buildcache.py: no recompiling per CLI call
    os.environ.update(env)
    variants: list[tuple[str, Path | None]] = [("new", None)] + ([("old", args.old)] if args.old else [])
    rows = []
    try:
        build = work / "build"
        make_tree(build, args.files, args.size_mib * MiB)
        archive = work / "build.tar.zst"
        for name, code in variants:  # warm-up: bytecode compiled, page cache warm
            save_once(work, build, name, code, env)
        for r in range(args.rounds):
            c = children_cpu()
            l0 = load()
            t_tar = timed(f"tar -C {build} -cf - . | zstd -q -f -T0 -o {archive}", shell=True)
            cpu_tar = children_cpu() - c
            order = variants if r % 2 == 0 else variants[::-1]
            for name, code in order:
                got = save_once(work, build, name, code, env)
                cpu = got["cpu_cli"] + got["cpu_daemon"]
                row = {"round": r, "variant": name, "save_s": round(got["wall"], 3), "tar_s": round(t_tar, 3),
                       "ratio": round(t_tar / got["wall"], 3), "cpu_s": round(cpu, 3),
                       "cpu_cli": round(got["cpu_cli"], 3), "cpu_daemon": round(got["cpu_daemon"], 3),
                       "tar_cpu_s": round(cpu_tar, 3), "load": f"{l0}/{load()}"}
                print(json.dumps({"bench": "buildcache_save", **row}), flush=True)
                rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nbuild-cache save, {args.files} files, {args.size_mib} MiB (P2PCACHE_FSYNC={env['P2PCACHE_FSYNC']}; "
          "2 cores shared with other work)", file=sys.stderr)
    for row in rows:
        print(f"  round {row['round']} {row['variant']:4} save {row['save_s']:6.2f} s  tar|zstd {row['tar_s']:5.2f} s  "
              f"{row['ratio']:.2f}x  CPU {row['cpu_s']:.2f} (CLI {row['cpu_cli']:.2f}, daemon {row['cpu_daemon']:.2f}) "
              f"vs {row['tar_cpu_s']:.2f}  load {row['load']}", file=sys.stderr)
    for name, _ in variants:
        mine = [r for r in rows if r["variant"] == name]
        if mine:
            best = min(mine, key=lambda r: r["save_s"])
            print(f"  {name}: best save {best['save_s']:.2f} s; median ratio "
                  f"{sorted(r['ratio'] for r in mine)[len(mine) // 2]:.2f}x", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
