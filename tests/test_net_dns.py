"""DNS bootstrap addresses (/dns4, /dns6, /dns): real py-libp2p hosts on loopback.

`localhost` resolves from this machine's /etc/hosts. The names that do not resolve yet, or resolve to
::1, need a hosts file of the test's own: that part runs in a child process inside a user, mount and
network namespace (`unshare -rmn`) with its own /etc/hosts and a resolv.conf naming 127.0.0.1
bind-mounted, so no lookup leaves the namespace (it has only a loopback interface, where nothing
answers DNS)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import multiaddr
import pytest
import trio

from p2pcache.net.host import HostConfig, open_host, resolve_addr

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


def _port(host) -> str:
    return str(host.addrs()[0]).split("/tcp/")[1].split("/")[0]


@pytest.mark.trio
async def test_dns_names_resolve_and_other_addresses_pass_through():
    assert await resolve_addr(multiaddr.Multiaddr("/dns4/localhost/tcp/4001")) == [
        multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/4001")]
    assert multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/4001") in await resolve_addr(
        multiaddr.Multiaddr("/dns/localhost/tcp/4001"))
    plain = multiaddr.Multiaddr("/ip4/10.1.2.3/tcp/1")
    assert await resolve_addr(plain) == [plain]


@pytest.mark.trio
@pytest.mark.parametrize("proto", ["dns4", "dns"])
async def test_bootstrap_by_dns_name_connects(tmp_path, proto):
    async with open_host(HostConfig(identity=tmp_path / "boot.key", listen=LOOPBACK, handshake_timeout=2.0)) as boot:
        addr = f"/{proto}/localhost/tcp/{_port(boot)}/p2p/{boot.peer_id.to_base58()}"
        cfg = HostConfig(identity=tmp_path / "node.key", listen=LOOPBACK, bootstrap=(addr,),
                         backoff_initial=0.05, backoff_max=0.2, handshake_timeout=2.0)
        async with open_host(cfg) as node:
            with trio.fail_after(15):
                while not node.is_connected(boot.peer_id):
                    await trio.sleep(0.02)


_IN_NAMESPACE = r"""
import json, logging, sys, time
from pathlib import Path
import trio
from p2pcache.net.host import HostConfig, open_host

hosts, tmp = Path(sys.argv[1]), Path(sys.argv[2])
lines = []

class Keep(logging.Handler):
    def emit(self, record):
        lines.append((time.monotonic(), record.getMessage()))

logging.getLogger("p2pcache.net.host").addHandler(Keep())
logging.getLogger("p2pcache.net.host").setLevel(logging.INFO)

async def wait_connected(node, peer, limit):
    with trio.move_on_after(limit):
        while not node.is_connected(peer):
            await trio.sleep(0.02)
    return node.is_connected(peer)

async def main():
    out = {}
    listen = ("/ip4/127.0.0.1/tcp/0", "/ip6/::1/tcp/0")
    async with open_host(HostConfig(identity=tmp / "boot.key", listen=listen, handshake_timeout=2.0)) as boot:
        ports = {str(a).split("/")[1]: str(a).split("/tcp/")[1].split("/")[0] for a in boot.addrs()}
        pid = boot.peer_id.to_base58()
        # 1. a name not in the hosts file yet: one clear line per try, retried with backoff ...
        late = f"/dns4/cache-peer.test/tcp/{ports['ip4']}/p2p/{pid}"
        cfg = HostConfig(identity=tmp / "late.key", listen=("/ip4/127.0.0.1/tcp/0",), bootstrap=(late,),
                         backoff_initial=0.1, backoff_max=0.4, handshake_timeout=2.0)
        async with open_host(cfg) as node:
            await trio.sleep(1.0)
            out["connected_before"] = node.is_connected(boot.peer_id)
            out["failures"] = [(t, m) for t, m in lines if "cache-peer.test" in m]
            # ... and looked up again on each retry: once the name appears, the next try connects
            with hosts.open("a") as f:
                f.write("127.0.0.1 cache-peer.test\n")
            out["connected_after"] = await wait_connected(node, boot.peer_id, 10)
        # 2. /dns6 to a name that resolves to ::1
        six = f"/dns6/cache-peer6.test/tcp/{ports['ip6']}/p2p/{pid}"
        cfg = HostConfig(identity=tmp / "six.key", listen=("/ip6/::1/tcp/0",), bootstrap=(six,),
                         backoff_initial=0.1, backoff_max=0.4, handshake_timeout=2.0)
        async with open_host(cfg) as node:
            out["dns6_connected"] = await wait_connected(node, boot.peer_id, 10)
    print(json.dumps(out))

trio.run(main)
"""


@pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("ip") is None,
                    reason="needs util-linux unshare and iproute2")
def test_unresolved_name_is_one_line_retried_with_backoff_and_resolved_again_on_each_try(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n::1 cache-peer6.test\n")
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\n")  # nothing listens: DNS refused at once
    script = tmp_path / "ns.py"
    script.write_text(_IN_NAMESPACE)
    shell = (f"ip link set lo up && mount --bind {hosts} /etc/hosts && "
             f"mount --bind {tmp_path / 'resolv.conf'} /etc/resolv.conf && "
             f"exec {sys.executable} {script} {hosts} {tmp_path}")
    proc = subprocess.run(["unshare", "-rmn", "sh", "-c", shell], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["connected_before"]
    failures = out["failures"]
    assert len(failures) >= 3, failures
    for _, line in failures:
        assert "\n" not in line
        assert "cannot resolve 'cache-peer.test'" in line and "retrying in" in line, line
    gaps = [b[0] - a[0] for a, b in zip(failures, failures[1:])]
    assert gaps[-1] > gaps[0], gaps  # backoff: the waits grow
    assert out["connected_after"]
    assert out["dns6_connected"]

