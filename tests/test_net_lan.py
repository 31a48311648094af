"""LAN discovery (mDNS) between two network namespaces joined by a veth pair the test makes.

Three real hosts in three processes: A in one namespace, B and C in the other. A and B share a swarm key,
C has another. With `mdns=True` and no bootstrap address, A and B find each other by multicast DNS over
the veth link and connect; C, advertising under its own swarm's service type and unable to pass the
private-network handshake anyway, stays alone. No traffic leaves the two namespaces.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from p2pcache.net.host import HostConfig, NodeHost
from p2pcache.net.lan import advertised_addrs, service_type

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 (ip netns)")

_NODE = r"""
import json, sys, trio
from pathlib import Path
from p2pcache.net.host import HostConfig, open_host
from p2pcache.net.pnet import read_swarm_key

identity, key_file, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])

async def main():
    cfg = HostConfig(identity=Path(identity), listen=("/ip4/0.0.0.0/tcp/0",), mdns=True, handshake_timeout=3.0,
                     swarm_key=read_swarm_key(key_file))
    async with open_host(cfg) as host:
        print(json.dumps({"peer_id": host.peer_id.to_base58()}), flush=True)
        events = host.subscribe()
        with trio.move_on_after(seconds):
            async for ev in events:
                print(json.dumps({"peer": ev.peer.to_base58(), "connected": ev.connected}), flush=True)

trio.run(main)
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def test_nodes_of_one_swarm_find_each_other_on_the_lan_and_another_swarm_stays_out(tmp_path):
    from p2pcache.net.host import new_swarm_key_file

    new_swarm_key_file(tmp_path / "team.key")
    new_swarm_key_file(tmp_path / "other.key")
    script = tmp_path / "node.py"
    script.write_text(_NODE)
    tag = f"p2pc{os.getpid() % 100000}"
    ns_a, ns_b = f"{tag}a", f"{tag}b"
    procs = []
    try:
        _ip("netns", "add", ns_a)
        _ip("netns", "add", ns_b)
        _ip("link", "add", f"{tag}va", "type", "veth", "peer", "name", f"{tag}vb")
        _ip("link", "set", f"{tag}va", "netns", ns_a)
        _ip("link", "set", f"{tag}vb", "netns", ns_b)
        for ns, dev, addr in ((ns_a, f"{tag}va", "10.199.0.1/24"), (ns_b, f"{tag}vb", "10.199.0.2/24")):
            _ip("-n", ns, "addr", "add", addr, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", dev)  # multicast out of the veth
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        for ns, name, key in ((ns_a, "a", "team.key"), (ns_b, "b", "team.key"), (ns_b, "c", "other.key")):
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, str(script), str(tmp_path / f"{name}.id"),
                 str(tmp_path / key), "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        out: list[list[dict]] = [[] for _ in procs]

        def read(p, lines):
            for line in p.stdout:
                if line.startswith("{"):
                    lines.append(json.loads(line))

        readers = [threading.Thread(target=read, args=(p, lines), daemon=True) for p, lines in zip(procs, out)]
        for r in readers:
            r.start()
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and not all(
                any(e.get("connected") for e in lines) for lines in out[:2]):
            time.sleep(0.1)
        time.sleep(2.0)  # C keeps browsing a little longer than A and B needed
        for p in procs:
            p.terminate()
        for p, r in zip(procs, readers):
            p.wait(timeout=20)
            r.join(timeout=5)
        for p, lines in zip(procs, out):
            assert lines, p.stderr.read()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    ids = [lines[0]["peer_id"] for lines in out]
    seen = [{e["peer"] for e in lines[1:] if e.get("connected")} for lines in out]
    assert ids[1] in seen[0] and ids[0] in seen[1]  # A and B found each other with no bootstrap address
    assert not seen[2] and ids[2] not in seen[0] | seen[1]  # C, of another swarm, connected to nobody


def test_advertised_addresses_expand_wildcards_and_leave_out_loopback(tmp_path):
    import multiaddr

    host = NodeHost(HostConfig(identity=tmp_path / "id.key"))
    pid = host.peer_id
    assert advertised_addrs([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/4011")], pid) == []
    assert advertised_addrs([multiaddr.Multiaddr("/ip4/10.1.2.3/tcp/4011")], pid) == [
        f"/ip4/10.1.2.3/tcp/4011/p2p/{pid.to_base58()}"]
    wild = advertised_addrs([multiaddr.Multiaddr("/ip4/0.0.0.0/tcp/4011")], pid)
    assert all(a.endswith(f"/tcp/4011/p2p/{pid.to_base58()}") and "/127." not in a for a in wild)
    assert service_type(None) == "_p2p._udp.local."
    a, b = service_type(b"k" * 32), service_type(b"j" * 32)
    assert a != b and a.startswith("_p2p-") and len(a.split(".")[0]) <= 16
