"""Lookups under lies, against real daemons on loopback: hostile swarm members (tests/helpers/liar_peers.py,
real libp2p hosts) announce a Nix path, an archive and the upstream-gateway key before the honest holder
does, then stay silent or lie on the resolve protocol. The honest holder is still found, every answer
comes within the lookup timeout (a 503 when the lookup is still going), and a lookup that failed is not
remembered as a miss."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from p2pcache.content import nixbase32

from .helpers.daemons import start_daemon
from .test_nix_uploads import _nar, _narinfo

LOOKUP_TIMEOUT = 3.0
PATIENCE = 4 * LOOKUP_TIMEOUT + 3  # nix.lookup_patience's default (nixcache.service.default_patience)
SLACK = 3.0  # process and loopback overheads on a loaded 2-core machine


def _metric(daemon, name: str) -> float:
    text = httpx.get(daemon.api + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lies")
    a = start_daemon(tmp / "a")
    b = start_daemon(tmp / "b", bootstrap=[a.addr], extra=["--lookup-timeout", str(LOOKUP_TIMEOUT)])
    store_hash = nixbase32.encode(os.urandom(20))
    archive = tmp / "archive.bin"
    archive.write_bytes(os.urandom(200_000))
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    specs = [f"nix:{store_hash}:silent", f"nix:{store_hash}:wrong-path", f"nix:{store_hash}:bad-manifest",
             f"sha256:{sha}:silent", f"sha256:{sha}:wrong-path", f"sha256:{sha}:bad-manifest", "gateway:silent"]
    liars = subprocess.Popen([sys.executable, str(Path(__file__).parent / "helpers" / "liar_peers.py"), str(tmp),
                              b.addr, *specs], stdout=subprocess.PIPE, stderr=open(tmp / "liars.log", "wb"),
                             env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent)))
    try:
        line = liars.stdout.readline()
        assert json.loads(line) == {"peers": len(specs)}, (tmp / "liars.log").read_text()
        # the honest holder announces last
        before = a.status()["announce"]["provided"]
        a.cli("add", str(archive))
        nar = _nar(tmp)
        url = f"nar/{nixbase32.encode(hashlib.sha256(nar).digest())}.nar"
        assert httpx.put(headers=a.auth, url=f"{a.api}/{url}", content=nar, timeout=30).status_code == 200
        assert httpx.put(headers=a.auth, url=f"{a.api}/{store_hash}.narinfo", content=_narinfo(store_hash, url, "none", nar, nar),
                         timeout=30).status_code == 200
        a.wait_announced(before + 5)
        yield {"a": a, "b": b, "store_hash": store_hash, "nar": nar, "archive": archive, "sha": sha, "tmp": tmp}
    finally:
        liars.kill()
        liars.wait()
        b.stop()
        a.stop()


def test_nix_path_found_behind_a_silent_peer_and_two_liars_within_the_lookup_timeout(swarm):
    b, store_hash = swarm["b"], swarm["store_hash"]
    t = time.monotonic()
    r = httpx.get(f"{b.api}/{store_hash}.narinfo", timeout=60)
    took = time.monotonic() - t
    assert r.status_code == 200, r.text
    assert took < LOOKUP_TIMEOUT + SLACK, took
    url = next(line.split(": ", 1)[1] for line in r.text.splitlines() if line.startswith("URL: "))
    nar = httpx.get(f"{b.api}/{url}", timeout=60)
    assert nar.status_code == 200 and nar.content == swarm["nar"]
    # the two liars failed and were demoted (asked last next time); the silent one was outrun or timed out
    assert b.status()["lookups"]["providers_demoted"] >= 2


def test_archive_found_behind_a_silent_peer_and_two_liars(swarm):
    b = swarm["b"]
    out = swarm["tmp"] / "got.bin"
    t = time.monotonic()
    b.cli("get", f"sha256:{swarm['sha']}", "-o", str(out))
    assert time.monotonic() - t < LOOKUP_TIMEOUT + SLACK + 3  # + the CLI's own start-up
    assert out.read_bytes() == swarm["archive"].read_bytes()
    assert b.status()["fetch_failures"] == 0


def test_a_silent_gateway_cannot_stall_a_miss_and_the_failure_is_not_cached(swarm):
    """Every answer comes within the wait: 503s while the silent gateway is being asked, again and again
    within the lookup's patience (Nix retries a 5xx), then a 404 — never remembered as a miss."""
    b = swarm["b"]
    missing = nixbase32.encode(os.urandom(20))
    failures = _metric(b, "p2pcache_narinfo_lookup_failures_total")
    for _ in range(2):
        statuses = []
        start = time.monotonic()
        while not statuses or statuses[-1] == 503:
            # the walks past silent DHT members and the silent gateway's ask end by nix.lookup_patience
            assert time.monotonic() - start < PATIENCE + SLACK, statuses
            t = time.monotonic()
            r = httpx.get(f"{b.api}/{missing}.narinfo", timeout=120)
            took = time.monotonic() - t
            assert took < LOOKUP_TIMEOUT + SLACK, took
            statuses.append(r.status_code)
            time.sleep(0.25)  # as Nix backs off between retries
        assert statuses[-1] == 404 and set(statuses) <= {503, 404}, statuses
    # both went to the swarm (a failed lookup is not a miss to remember), each asked the swarm again while its
    # patience lasted, and each ended unsettled
    assert _metric(b, "p2pcache_narinfo_negative_cache_hits_total") == 0
    assert _metric(b, "p2pcache_narinfo_lookup_failures_total") >= failures + 4
    assert _metric(b, "p2pcache_narinfo_lookup_retries_total") >= 2
    assert _metric(b, "p2pcache_narinfo_lookups_unsettled_total") == 2
