"""The DAG transfer protocol between real daemons on loopback, and hostile peers speaking it badly."""

import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest

from .helpers.daemons import start_daemon

BAD_DAG_NODE = str(Path(__file__).parent / "helpers" / "bad_dag_node.py")
MODES = ("corrupt", "order", "endless", "stall", "empty")
MiB = 1 << 20


@pytest.fixture
def daemons():
    started = []
    yield started
    for d in started:
        d.stop()


def _leech_repo(tmp_path: Path, name: str) -> Path:
    repo = tmp_path / name
    repo.mkdir()
    (repo / "config.toml").write_text("[transfer]\nstall_timeout = 2.0\n")  # the stall case waits this long
    return repo


def test_archive_moves_over_one_dag_stream_per_request(tmp_path, rng, daemons):
    data = rng.randbytes(12 * MiB + 777)
    src = tmp_path / "a.tar"
    src.write_bytes(data)
    a = start_daemon(tmp_path / "a")
    daemons.append(a)
    b = start_daemon(tmp_path / "b", bootstrap=[a.addr])
    daemons.append(b)
    a.cli("add", str(src))
    a.wait_announced(3)
    out = tmp_path / "out.tar"
    b.cli("get", "sha256:" + hashlib.sha256(data).hexdigest(), "-o", str(out), timeout=60)
    assert out.read_bytes() == data
    st, sa = b.status(), a.status()
    xfer = st["transfer"]
    assert xfer["bitswap_fallbacks"] == 0 and xfer["peers_dropped"] == 0
    # ~200 chunks in requests of at most 128 CIDs, plus the tree's inner nodes: a handful of streams
    assert 1 <= xfer["streams"] <= 6
    assert len(data) <= xfer["bytes"] < len(data) + 64 * 1024 and xfer["duplicate_bytes"] == 0
    assert sa["transfer"]["served_bytes"] >= len(data)
    assert st["roots_incomplete"] == 0


def test_hostile_dag_peers_are_banned_nothing_unverified_is_kept_honest_peer_completes(tmp_path, rng, daemons):
    leech = start_daemon(_leech_repo(tmp_path, "leech"))
    daemons.append(leech)
    bad, files = {}, {}
    for mode in MODES:
        d = start_daemon(tmp_path / mode, bootstrap=[leech.addr], entry=[BAD_DAG_NODE],
                         env={"P2PCACHE_BAD_DAG": mode})
        daemons.append(d)
        data = rng.randbytes(3 * MiB + len(mode))
        (tmp_path / f"{mode}.bin").write_bytes(data)
        d.cli("add", str(tmp_path / f"{mode}.bin"))
        bad[mode], files[mode] = d, data
    for d in bad.values():
        d.wait_announced(3)

    for mode, data in files.items():  # the only provider is hostile: a clean one-line failure
        proc = leech.cli("get", "sha256:" + hashlib.sha256(data).hexdigest(), "-o", str(tmp_path / "x"),
                         check=False, timeout=60)
        assert proc.returncode != 0, mode
        err = proc.stderr.decode().strip()
        assert len(err.splitlines()) == 1 and "every provider was dropped" in err, (mode, err)
    st = leech.status()
    assert sorted(st["peers_penalised"]) == sorted(d.info["peer_id"] for d in bad.values())
    log = (tmp_path / "leech.log").read_text()
    for mode, d in bad.items():  # one line each, saying what was wrong
        lines = [ln for ln in log.splitlines() if re.search(f"dropping peer {d.info['peer_id']}", ln)]
        assert len(lines) == 1, (mode, lines)
        why = {"corrupt": "does not hash", "order": "out of order", "endless": "after the end",
               "stall": "stalled", "empty": "unsent"}[mode]
        assert why in lines[0], (mode, lines[0])
    assert not (tmp_path / "x").exists()
    # Nothing unverified was kept: every block the leech holds hashes to its CID.
    verify = leech.cli("verify", "--json", check=False)
    assert verify.returncode == 0, verify.stderr.decode()
    report = json.loads(verify.stdout.decode().splitlines()[-1])
    assert report["consistent"] and report["corrupt"] == [] and report["garbage_files"] == 0, report

    honest = start_daemon(tmp_path / "honest", bootstrap=[leech.addr])
    daemons.append(honest)
    for mode in MODES:
        honest.cli("add", str(tmp_path / f"{mode}.bin"))
    honest.wait_announced(3 * len(MODES))
    for mode, data in files.items():
        out = tmp_path / f"{mode}.out"
        leech.cli("get", "sha256:" + hashlib.sha256(data).hexdigest(), "-o", str(out), timeout=60)
        assert out.read_bytes() == data
    assert leech.status()["roots_incomplete"] == 0
