"""Crash consistency: a real `p2pcache add` / `gc` process killed with SIGKILL at many instants must leave
a repo that `verify` finds consistent, and that keeps working."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

from .conftest import run_cli, write_file


def _spawn(*args, repo):
    env = dict(os.environ, P2PCACHE_REPO=str(repo))
    return subprocess.Popen([sys.executable, "-m", "p2pcache", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _assert_consistent(repo):
    proc = run_cli("verify", "--json", repo=repo)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["consistent"], (report, proc.stderr)
    return report


def test_kill_9_mid_add_and_mid_gc_leaves_a_consistent_repo(tmp_path, rng):
    repo = tmp_path / "repo"
    keep = write_file(tmp_path / "keep", rng.randbytes(3 << 20))
    kept = json.loads(run_cli("add", "--json", str(keep), repo=repo, check=True).stdout)
    run_cli("pin", kept["root"], repo=repo, check=True)
    big = write_file(tmp_path / "big", keep.read_bytes()[: 1 << 20] + rng.randbytes(80 << 20))

    # Time one full add so the kills land at spread-out instants inside it.
    t0 = time.monotonic()
    done = json.loads(run_cli("add", "--json", str(big), repo=repo, check=True).stdout)
    full = time.monotonic() - t0
    run_cli("gc", "--max-size", "4M", repo=repo, check=True)  # evicts `big`, keeps pinned `keep` and its shared chunks

    kills = 0
    garbage_seen = 0
    for i in range(10):
        proc = _spawn("add", str(big), repo=repo)
        time.sleep(full * (0.15 + 0.08 * i) * rng.uniform(0.8, 1.2))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        report = _assert_consistent(repo)
        garbage_seen += report["garbage_files"]
        listed = [json.loads(x) for x in run_cli("ls", "--json", repo=repo, check=True).stdout.splitlines()]
        # the killed add either committed whole or not at all
        assert all(x["complete"] for x in listed)
        assert {x["root"] for x in listed} <= {kept["root"], done["root"]}
        if len(listed) == 2:
            run_cli("gc", "--max-size", "4M", repo=repo, check=True)
    assert kills >= 5, f"only {kills} adds were still running when killed (one add takes {full:.2f}s)"
    assert garbage_seen > 0, "no kill landed while blocks were being written"

    # Kill gc while it deletes.
    run_cli("add", str(big), repo=repo, check=True)
    proc = _spawn("gc", "--max-size", "4M", repo=repo)
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    _assert_consistent(repo)

    # The repo keeps working: garbage is collected, both archives come back byte-exact.
    run_cli("gc", repo=repo, check=True)
    assert _assert_consistent(repo)["garbage_files"] == 0
    run_cli("add", str(big), repo=repo, check=True)
    for src, info in ((keep, kept), (big, done)):
        out = tmp_path / "out"
        run_cli("get", info["root"], "-o", str(out), repo=repo, check=True)
        assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(src.read_bytes()).hexdigest()
