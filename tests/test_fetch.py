"""`p2pcache fetch URL --hash`: the swarm if anyone has it, else the origin; always verified."""

import base64
import functools
import hashlib
import http.server
import json
import threading

import pytest

from .conftest import run_cli
from .helpers.daemons import start_daemon

MiB = 1 << 20


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def origin(tmp_path):
    root = tmp_path / "origin"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def sri(data: bytes) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(data).digest()).decode()


def test_offline_fetch_from_origin_verifies_the_hash(tmp_path, rng, origin):
    root, url = origin
    data = rng.randbytes(MiB + 7)
    (root / "pkg-1.0.tar.gz").write_bytes(data)
    repo = tmp_path / "repo"
    out = tmp_path / "out.tar.gz"
    res = json.loads(run_cli("fetch", f"{url}/pkg-1.0.tar.gz", "--hash", sri(data), "-o", str(out), "--json",
                             repo=repo, check=True).stdout)
    assert res["source"] == "origin" and out.read_bytes() == data
    again = json.loads(run_cli("fetch", f"{url}/gone.tar.gz", "--hash", sri(data), "--json", repo=repo,
                               check=True).stdout)
    assert again["source"] == "local" and again["root"] == res["root"]

    (root / "evil.tar.gz").write_bytes(b"not what you asked for")
    proc = run_cli("fetch", f"{url}/evil.tar.gz", "--hash", sri(b"something else"), repo=repo)
    assert proc.returncode == 4 and "does not match the expected sha256" in proc.stderr.decode()
    listed = run_cli("ls", "--json", repo=repo, check=True).stdout.decode().splitlines()
    assert len(listed) == 1  # the wrong bytes were not recorded
    proc = run_cli("fetch", f"{url}/missing.tar.gz", "--hash", sri(b"x"), repo=repo)
    assert proc.returncode == 3 and "HTTP 404" in proc.stderr.decode()


def test_fetch_prefers_the_swarm_and_falls_back_to_origin(tmp_path, rng, origin):
    root, url = origin
    on_a = rng.randbytes(2 * MiB)
    only_origin = rng.randbytes(MiB)
    (root / "b.tar.gz").write_bytes(only_origin)
    src = tmp_path / "a.tar.gz"
    src.write_bytes(on_a)
    a = start_daemon(tmp_path / "a")
    b = start_daemon(tmp_path / "b", bootstrap=[a.addr])
    try:
        a.cli("add", str(src))
        a.wait_announced(3)
        # the URL is a closed port: the bytes can only come from A
        res = json.loads(b.cli("fetch", "http://127.0.0.1:1/a.tar.gz", "--hash", sri(on_a), "--json").stdout)
        assert res["source"] == "swarm"
        res = json.loads(b.cli("fetch", f"{url}/b.tar.gz", "--hash", sri(only_origin), "--json").stdout)
        assert res["source"] == "origin"
        st = b.status()
        assert st["bytes_fetched"] >= 2 * MiB and st["bytes_fetched_origin"] == MiB
        b.wait_announced(6)  # what B fetched, from either place, is shared on
    finally:
        a.stop()
        b.stop()
