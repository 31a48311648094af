"""Real daemons as subprocesses on loopback: a private team swarm of five nodes."""

import base64
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers.daemons import start_daemon

EVIL_NODE = str(Path(__file__).parent / "helpers" / "evil_node.py")
GARBAGE_PEER = str(Path(__file__).parent / "helpers" / "garbage_peer.py")

MiB = 1 << 20


@pytest.fixture
def swarm_key(tmp_path):
    path = tmp_path / "swarm.key"
    subprocess.run([sys.executable, "-m", "p2pcache", "swarm-key", "new", "-o", str(path)], check=True)
    return path


def test_five_node_private_swarm_fetch_across_hops(tmp_path, rng, swarm_key, daemons):
    nodes = []
    for i in range(5):  # a chain: each node only knows the previous one
        boot = [nodes[-1].addr] if nodes else []
        nodes.append(start_daemon(tmp_path / f"n{i}", bootstrap=boot, swarm_key=swarm_key))
        daemons.append(nodes[-1])
    data = rng.randbytes(3 * MiB + 12345)
    src = tmp_path / "artifact.tar"
    src.write_bytes(data)

    added = json.loads(nodes[0].cli("add", "--json", str(src)).stdout)  # through n0's daemon
    assert added["announced"] is True
    assert added["sha512_known"] is False  # the add returned before the daemon hashed it in the background
    nodes[0].wait_announced(3)  # root CID, sha256, and sha512 once the background hash is done

    out = tmp_path / "out.tar"
    nodes[4].cli("get", f"sha256:{hashlib.sha256(data).hexdigest()}", "-o", str(out), timeout=60)
    assert out.read_bytes() == data
    st4 = nodes[4].status()
    # everything came from peers: the chunks plus the (small) manifest blocks
    assert len(data) < st4["bytes_fetched"] < len(data) + 64 * 1024
    assert st4["fetches"] == 1 and st4["roots"] == 1
    assert nodes[0].status()["bytes_served"] >= len(data)

    # n4 now holds it and announces it too; n3 can get it by SRI, n2 by root CID
    nodes[4].wait_announced(3)
    sri512 = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    cat = nodes[3].cli("cat", sri512, timeout=60)
    assert cat.stdout == data
    nodes[2].cli("get", added["root"], "-o", str(out), timeout=60)
    assert out.read_bytes() == data

    # a miss is a clear error within the lookup timeout, not a hang
    t = time.monotonic()
    miss = nodes[1].cli("get", "sha256:" + "ab" * 32, "-o", str(out), check=False, timeout=60)
    assert miss.returncode == 3 and "no peer in the swarm announces it" in miss.stderr.decode()
    assert time.monotonic() - t < 30

    # a node without the swarm key cannot join, and so cannot fetch
    outsider = start_daemon(tmp_path / "outsider", bootstrap=[nodes[0].addr])
    daemons.append(outsider)
    time.sleep(2)
    assert outsider.status()["peers"] == 0
    assert all(n.status()["peers"] >= 1 for n in nodes)
    res = outsider.cli("get", added["root"], "-o", str(out), check=False, timeout=60)
    assert res.returncode == 3


def test_seeder_killed_mid_transfer_second_seeder_finishes(tmp_path, rng, daemons):
    data = rng.randbytes(48 * MiB)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    a = start_daemon(tmp_path / "a")
    b = start_daemon(tmp_path / "b", bootstrap=[a.addr])
    daemons += [a, b]
    for seeder in (a, b):
        seeder.cli("add", str(src))
        seeder.wait_announced(3)
    c = start_daemon(tmp_path / "c", bootstrap=[a.addr, b.addr])
    daemons.append(c)
    out = tmp_path / "out.bin"
    env_get = subprocess.Popen([sys.executable, "-m", "p2pcache", "--repo", str(c.repo), "get",
                                "sha256:" + hashlib.sha256(data).hexdigest(), "-o", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while c.status()["stored_bytes"] < 4 * MiB:  # the transfer is under way
        assert env_get.poll() is None, env_get.stderr.read().decode()
        assert time.monotonic() < deadline, "transfer never started"
        time.sleep(0.05)
    a.kill()
    assert env_get.wait(timeout=120) == 0, env_get.stderr.read().decode()
    assert out.read_bytes() == data
    st = c.status()
    assert len(data) < st["bytes_fetched"] < len(data) + 64 * 1024  # no block fetched twice


def test_corrupt_seeder_is_rejected_and_honest_one_completes(tmp_path, rng, daemons):
    # Large enough (about 400 leaves) that the DAG fetch's first requests (128 CIDs, two per provider)
    # go to both seeders whichever answered the lookup first: at 6 MiB one request to the honest seeder
    # could carry every leaf, so the corrupt seeder was never asked and never penalised.
    data = rng.randbytes(24 * MiB)
    src = tmp_path / "art.bin"
    src.write_bytes(data)
    honest = start_daemon(tmp_path / "honest")
    daemons.append(honest)
    evil = start_daemon(tmp_path / "evil", bootstrap=[honest.addr], entry=[EVIL_NODE])
    daemons.append(evil)
    for seeder in (honest, evil):
        seeder.cli("add", str(src))
        seeder.wait_announced(3)
    leech = start_daemon(tmp_path / "leech", bootstrap=[evil.addr, honest.addr])
    daemons.append(leech)
    out = tmp_path / "out.bin"
    leech.cli("get", "sha256:" + hashlib.sha256(data).hexdigest(), "-o", str(out), timeout=120)
    assert out.read_bytes() == data
    st = leech.status()
    assert st["peers_penalised"] == [evil.info["peer_id"]]
    assert st["roots_incomplete"] == 0 and st["roots"] == 1


def test_malformed_and_oversized_messages_drop_the_connection_daemon_keeps_serving(tmp_path, rng, daemons):
    data = rng.randbytes(2 * MiB)
    src = tmp_path / "x.bin"
    src.write_bytes(data)
    a = start_daemon(tmp_path / "a")
    daemons.append(a)
    a.cli("add", str(src))
    proc = subprocess.run([sys.executable, GARBAGE_PEER, a.addr, str(tmp_path)],
                          capture_output=True, timeout=90)
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout) == {"malformed": True, "oversized": True}
    assert a.proc.poll() is None  # still running
    b = start_daemon(tmp_path / "b", bootstrap=[a.addr])
    daemons.append(b)
    a.wait_announced(3)  # a's first sweep reached nobody; it sweeps again when b connects
    out = tmp_path / "out.bin"
    b.cli("get", "sha256:" + hashlib.sha256(data).hexdigest(), "-o", str(out), timeout=60)
    assert out.read_bytes() == data


def test_a_flood_of_empty_messages_is_penalised_and_does_not_slow_the_api(tmp_path, daemons):
    a = start_daemon(tmp_path / "a")
    daemons.append(a)
    flood = subprocess.Popen([sys.executable, GARBAGE_PEER, a.addr, str(tmp_path), "empty"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    slowest = 0.0
    while flood.poll() is None:  # the API keeps answering while the flood goes on
        t = time.monotonic()
        a.status()
        slowest = max(slowest, time.monotonic() - t)
        time.sleep(0.05)
    out, err = flood.communicate(timeout=60)
    assert flood.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["dropped"] and result["sent"] < 4 << 20, result  # cut off before the 4 MiB were sent
    st = a.status()
    assert len(st["peers_penalised"]) == 1
    assert slowest < 1.0, slowest
