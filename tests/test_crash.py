"""Crash consistency: real `p2pcache add` / `gc` processes and a real daemon fetching from a peer, killed with
SIGKILL at spread-out instants, must leave a repo that `verify` finds consistent, and that keeps working."""

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

from .conftest import run_cli, write_file
from .helpers.daemons import start_daemon

MiB = 1 << 20


def _spawn(*args, repo):
    env = dict(os.environ, P2PCACHE_REPO=str(repo))
    return subprocess.Popen([sys.executable, "-m", "p2pcache", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _assert_consistent(repo):
    proc = run_cli("verify", "--json", repo=repo)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["consistent"], (report, proc.stderr)
    return report


def _kill_at(args, repo, delay):
    """Run `p2pcache ARGS`, SIGKILL it after `delay` seconds; True if it was still running."""
    proc = _spawn(*args, repo=repo)
    time.sleep(delay)
    alive = proc.poll() is None
    if alive:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return alive


def _same_bytes(repo, root, src, tmp_path):
    out = tmp_path / "out"
    run_cli("get", root, "-o", str(out), repo=repo, check=True)
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()


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
    dead_seen = 0
    for i in range(8):
        kills += _kill_at(["add", str(big)], repo, full * (0.15 + 0.1 * i) * rng.uniform(0.8, 1.2))
        report = _assert_consistent(repo)
        dead_seen += report["dead_bytes"] + report["garbage_files"]
        listed = [json.loads(x) for x in run_cli("ls", "--json", repo=repo, check=True).stdout.splitlines()]
        # the killed add either committed whole or not at all
        assert all(x["complete"] for x in listed)
        assert {x["root"] for x in listed} <= {kept["root"], done["root"]}
        if len(listed) == 2:
            run_cli("gc", "--max-size", "4M", repo=repo, check=True)
    assert kills >= 4, f"only {kills} adds were still running when killed (one add takes {full:.2f}s)"
    assert dead_seen > 0, "no kill landed while blocks were being written"

    # The repo keeps working: dead space is reclaimed, both archives come back byte-exact.
    gc = json.loads(run_cli("gc", "--json", repo=repo, check=True).stdout)
    after = _assert_consistent(repo)
    assert after["garbage_files"] == 0 and gc["disk_bytes_after"] < 2 * (3 << 20), (gc, after)
    run_cli("add", str(big), repo=repo, check=True)
    _same_bytes(repo, kept["root"], keep, tmp_path)
    _same_bytes(repo, done["root"], big, tmp_path)


def test_kill_9_mid_gc_compaction_keeps_every_block_a_kept_root_needs(tmp_path, rng):
    """`gc --max-size` evicts an archive and compacts the pack it shared with a pinned one: killed at spread-out
    instants of that, the pinned archive stays whole and the dead space is given back in the end."""
    repo = tmp_path / "repo"
    keep = write_file(tmp_path / "keep", rng.randbytes(24 << 20))
    kept = json.loads(run_cli("add", "--json", str(keep), repo=repo, check=True).stdout)
    run_cli("pin", kept["root"], repo=repo, check=True)
    big = write_file(tmp_path / "big", keep.read_bytes()[: 4 << 20] + rng.randbytes(40 << 20))
    run_cli("add", str(big), repo=repo, check=True)
    t0 = time.monotonic()
    gc = json.loads(run_cli("gc", "--json", "--max-size", "30M", repo=repo, check=True).stdout)
    full = time.monotonic() - t0
    assert gc["packs_compacted"] >= 1 and gc["disk_bytes_after"] < 30 << 20, gc
    kills = 0
    for i in range(6):
        run_cli("add", str(big), repo=repo, check=True)
        kills += _kill_at(["gc", "--max-size", "30M"], repo, full * (0.2 + 0.13 * i))
        _assert_consistent(repo)
        _same_bytes(repo, kept["root"], keep, tmp_path)
    assert kills >= 2, f"only {kills} gc runs were still running when killed (one takes {full:.2f}s)"
    gc = json.loads(run_cli("gc", "--json", "--max-size", "30M", repo=repo, check=True).stdout)
    assert gc["disk_bytes_after"] < 30 << 20, gc
    assert _assert_consistent(repo)["garbage_files"] == 0
    _same_bytes(repo, kept["root"], keep, tmp_path)


def _pack_bytes(repo):
    return sum(p.stat().st_size for p in (repo / "packs").glob("*.pack"))


def _wait_for_peer(daemon, timeout=20):
    deadline = time.monotonic() + timeout
    while daemon.status()["peers"] < 1:
        assert time.monotonic() < deadline, "the restarted daemon did not reconnect to its peer"
        time.sleep(0.1)


def test_kill_9_mid_peer_fetch_leaves_a_consistent_repo(tmp_path, rng):
    """A daemon fetching an archive from a peer (bitswap, writing blocks as they arrive) is SIGKILLed at
    spread-out instants; its repo verifies consistent each time and a restarted daemon finishes the fetch."""
    src = write_file(tmp_path / "a.bin", rng.randbytes(48 * MiB))
    sri = "sha256-" + base64.b64encode(hashlib.sha256(src.read_bytes()).digest()).decode()
    a = start_daemon(tmp_path / "a")
    daemons = [a]
    try:
        b_repo = tmp_path / "b"
        fetch = ["fetch", "http://127.0.0.1:1/a.bin", "--hash", sri]  # a closed port: only the peer has it
        b = start_daemon(b_repo, bootstrap=[a.addr])
        daemons.append(b)
        added = json.loads(a.cli("add", "--json", str(src)).stdout)
        a.wait_announced(3)
        t0 = time.monotonic()
        b.cli(*fetch)
        full = time.monotonic() - t0
        b.stop()
        run_cli("gc", "--max-size", "0", repo=b_repo, check=True)
        base = _pack_bytes(b_repo)
        kills = 0
        for i in range(3):  # killed once the repo grew by 20, 45 and 70 % of the archive: early, mid and late
            b = start_daemon(b_repo, bootstrap=[a.addr])
            daemons.append(b)
            _wait_for_peer(b)
            client = _spawn(*fetch, repo=b_repo)
            deadline = time.monotonic() + 10 * full + 30
            while _pack_bytes(b_repo) < base + (0.2 + 0.25 * i) * 48 * MiB and client.poll() is None:
                assert time.monotonic() < deadline, "the fetch made no progress"
                time.sleep(0.01)
            kills += b.proc.poll() is None and client.poll() is None
            b.kill()
            client.kill()
            client.wait()
            _assert_consistent(b_repo)
        assert kills >= 2, f"only {kills} fetches were still running when killed (one takes {full:.2f}s)"
        b = start_daemon(b_repo, bootstrap=[a.addr])
        daemons.append(b)
        _wait_for_peer(b)
        res = json.loads(b.cli(*fetch, "--json").stdout)
        assert res["root"] == added["root"]
        b.stop()
        _assert_consistent(b_repo)
        _same_bytes(b_repo, added["root"], src, tmp_path)
    finally:
        for d in daemons:
            d.stop()


def test_kill_9_mid_cache_save_restores_nothing_or_the_whole_save(tmp_path, rng):
    """`cache save` through a daemon (files as descriptors into the connection's held ingest, one commit before
    the root is claimed): the daemon or the saving CLI is SIGKILLed once the repo grew by 20-80 % of the build
    dir. Each time the repo verifies consistent, and a restore of that key finds nothing or the whole tree."""
    build = tmp_path / "build"
    for i in range(300):
        d = build / f"mod{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"unit{i}.o").write_bytes(rng.randbytes(rng.randint(2_000, 250_000)))
    size = sum(p.stat().st_size for p in build.rglob("*.o"))
    repo = tmp_path / "repo"
    daemons = []
    try:
        kills = 0
        for i in range(4):
            d = start_daemon(repo)
            daemons.append(d)
            base = _pack_bytes(repo)
            saver = _spawn("cache", "save", f"main/k{i}", str(build), repo=repo)
            deadline = time.monotonic() + 120
            while _pack_bytes(repo) < base + (0.2 + 0.2 * i) * size and saver.poll() is None:
                assert time.monotonic() < deadline, "the save made no progress"
                time.sleep(0.005)
            kills += saver.poll() is None
            if i % 2 == 0:  # the daemon dies: what it held (appended, not recorded) is dead bytes at restart
                d.kill()
                saver.wait()
                _assert_consistent(repo)
                d = start_daemon(repo)
                daemons.append(d)
            else:  # the saver dies: its connections end without their commit, the daemon takes the blocks back
                saver.kill()
                saver.wait()
            got = json.loads(d.cli("--json", "cache", "restore", f"main/k{i}", str(tmp_path / f"out{i}")).stdout)
            if got["match"] != "none":
                assert got["match"] == "exact"
                assert subprocess.run(["diff", "-r", str(build), str(tmp_path / f"out{i}")]).returncode == 0
            d.stop()
            _assert_consistent(repo)
        assert kills >= 3, f"only {kills} saves were still running when killed"
        d = start_daemon(repo)
        daemons.append(d)
        saved = json.loads(d.cli("--json", "cache", "save", "main/whole", str(build)).stdout)
        assert saved["saved"]
        d.cli("cache", "restore", "main/whole", str(tmp_path / "whole"))
        assert subprocess.run(["diff", "-r", str(build), str(tmp_path / "whole")]).returncode == 0
        d.stop()
        _assert_consistent(repo)
    finally:
        for d in daemons:
            d.stop()
