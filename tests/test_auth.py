"""Trust boundaries of the local HTTP port, tried as an attacker would (issue 15), against real daemons on
loopback: the daemon runs as root, the attacker as user `nobody` (setpriv) or as a web page (an Origin
header, a rebound Host). Each test shows one attack failing and what a legitimate caller keeps.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from p2pcache.content import nixbase32
from p2pcache.store.nixstore import dump_path

from .helpers.daemons import start_daemon
from .test_nix_real import Nix, nix  # noqa: F401  (the fixture fails, not skips, without Nix)

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def shared():
    """A directory user `nobody` can read (pytest's tmp_path is root's own, mode 0700)."""
    d = Path(tempfile.mkdtemp(prefix="p2pcache-auth-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _tree_nar(root: Path, text: str) -> bytes:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "hello").write_text(text)
    (root / "bin" / "hello").chmod(0o755)
    return b"".join(dump_path(root))


def _narinfo(store_path: str, url: str, nar: bytes, file: bytes | None = None, compression: str = "none") -> bytes:
    file = nar if file is None else file
    return (f"StorePath: {store_path}\nURL: {url}\nCompression: {compression}\n"
            f"FileHash: sha256:{nixbase32.encode(hashlib.sha256(file).digest())}\nFileSize: {len(file)}\n"
            f"NarHash: sha256:{nixbase32.encode(hashlib.sha256(nar).digest())}\nNarSize: {len(nar)}\n"
            "References: \n").encode()


def _curl_as_nobody(*args: str) -> int:
    """Run curl as `nobody`; the HTTP status it got."""
    proc = subprocess.run([*NOBODY, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", *args],
                          capture_output=True, timeout=60)
    return int(proc.stdout or 0)


# The CLI as `nobody`: imported as root (the checkout may be closed to other users, as /root is), then the
# process drops to uid/gid 65534 before it does anything, so every file it opens is opened as nobody.
_NOBODY_CLI = """
import os, sys
import encodings.idna, httpx, httpcore, h11, idna  # noqa
import p2pcache.cli, p2pcache.client, p2pcache.apitoken  # noqa
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
sys.exit(p2pcache.cli.main(sys.argv[1:]))
"""


def _cli_as_nobody(*args: str) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "HOME": "/tmp", "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt"}
    return subprocess.run([sys.executable, "-c", _NOBODY_CLI, *args], capture_output=True, env=env, timeout=60,
                          cwd="/")


def _keys(nix: Nix, d: Path, name: str) -> tuple[Path, str]:
    nix.run("nix-store", "--generate-binary-cache-key", f"{name}-1", str(d / f"{name}.sec"), str(d / f"{name}.pub"))
    return d / f"{name}.sec", (d / f"{name}.pub").read_text().strip()


def test_poisoning_put_as_nobody_is_refused_and_nix_installs_the_genuine_path(nix, tmp_path, shared, daemons):
    sec, pub = _keys(nix, tmp_path, "runner")
    node = start_daemon(tmp_path / "node", extra=["--sign-key", str(sec)])
    daemons.append(node)
    token_file = node.repo / "api.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600 and len(node.token) >= 32
    assert stat.S_IMODE(node.netrc.stat().st_mode) == 0o600
    assert subprocess.run([*NOBODY, "cat", str(token_file)], capture_output=True).returncode != 0

    # root builds and pushes the genuine path, the way the post-build hook does (netrc → Basic auth)
    tag = secrets.token_hex(4)
    genuine = tmp_path / f"tool-{tag}"
    _tree_nar(genuine, "#!/bin/sh\necho genuine\n")
    path = nix.out("nix-store", "--add", str(genuine))
    nix.run("nix", "copy", "--to", node.api, path, config=f"netrc-file = {node.netrc}\n")
    store_hash = Path(path).name[:32]
    # the other form Nix 2.8 can send: the token as the password in the store URL's user-info
    other = tmp_path / f"other-{tag}"
    _tree_nar(other, "other\n")
    other_path = nix.out("nix-store", "--add", str(other))
    nix.run("nix", "copy", "--to", node.api.replace("http://", f"http://p2pcache:{node.token}@"), other_path)
    assert httpx.get(f"{node.api}/{Path(other_path).name[:32]}.narinfo").status_code == 200

    # nobody crafts a NAR and narinfo of its own for the same store path and PUTs them
    evil_nar = _tree_nar(shared / "evil", "#!/bin/sh\necho PWNED\n")
    (shared / "evil.nar").write_bytes(evil_nar)
    (shared / "evil.narinfo").write_bytes(_narinfo(path, "nar/evil.nar", evil_nar))
    for f in ("evil.nar", "evil.narinfo"):
        (shared / f).chmod(0o644)
    put_nar = ["-X", "PUT", "--data-binary", f"@{shared / 'evil.nar'}", f"{node.api}/nar/evil.nar"]
    put_info = ["-X", "PUT", "--data-binary", f"@{shared / 'evil.narinfo'}", f"{node.api}/{store_hash}.narinfo"]
    assert _curl_as_nobody(*put_nar) == 401
    assert _curl_as_nobody(*put_info) == 401
    assert _curl_as_nobody("-u", "p2pcache:guessed-token", *put_info) == 401
    assert _curl_as_nobody("-H", "Authorization: Bearer " + "x" * 43, *put_info) == 401

    # even a pusher holding the token cannot replace what the node holds: 409, first writer wins
    assert httpx.put(f"{node.api}/nar/evil.nar", content=evil_nar, headers=node.auth, timeout=30).status_code == 200
    r = httpx.put(f"{node.api}/{store_hash}.narinfo", content=_narinfo(path, "nar/evil.nar", evil_nar),
                  headers=node.auth, timeout=30)
    assert r.status_code == 409 and "not replaced" in r.json()["error"]

    # a second runner whose Nix trusts only the runner's key installs the genuine file
    # (by the name localhost: Nix's narinfo disk cache already remembers the upload under 127.0.0.1)
    store2 = tmp_path / "store2"
    nix.run("nix", "copy", "--from", node.api.replace("127.0.0.1", "localhost"), "--to", str(store2), path,
            config=f"require-sigs = true\ntrusted-public-keys = {pub}\n")
    assert (store2 / path.lstrip("/") / "bin" / "hello").read_text() == "#!/bin/sh\necho genuine\n"


def test_add_streams_the_callers_bytes_and_the_daemon_opens_no_path(tmp_path, shared, daemons):
    node = start_daemon(shared / "node")  # a repo nobody can look into (api.json readable, api.token not)
    daemons.append(node)
    (shared / "node").chmod(0o755)
    shadow = Path("/etc/shadow").read_bytes()

    # the old confused deputy, as nobody without a token and as a token holder: the daemon opens nothing
    body = json.dumps({"path": "/etc/shadow"})
    assert _curl_as_nobody("-X", "POST", "-H", "Content-Type: application/json", "-d", body,
                           f"{node.api}/api/v0/add") == 401
    r = httpx.post(f"{node.api}/api/v0/add", content=body, headers={**node.auth, "content-type": "application/json"})
    assert r.status_code == 400 and "does not open paths" in r.json()["error"]
    assert node.status()["roots"] == 0

    # nobody's CLI: no token for it, so a clear one-line error (exit 5), and nothing added
    proc = _cli_as_nobody("--repo", str(node.repo), "add", "/etc/shadow")
    assert proc.returncode == 5 and b"api.token: permission denied" in proc.stderr, proc.stderr
    assert node.status()["roots"] == 0

    # root's own add through the daemon streams the file (and stdin) and announces it
    data = os.urandom(3 << 20)
    src = tmp_path / "artifact.bin"
    src.write_bytes(data)
    added = json.loads(node.cli("add", "--json", str(src)).stdout)
    assert added["sha256"] == hashlib.sha256(data).hexdigest() and added["announced"] is True
    piped = json.loads(node.cli("add", "--json", "--name", "piped", "-", input=data[:100_000]).stdout)
    assert piped["sha256"] == hashlib.sha256(data[:100_000]).hexdigest() and piped["announced"] is True
    assert all(hashlib.sha256(shadow).hexdigest() != j["sha256"] for j in (added, piped))
    assert node.status()["roots"] == 2


def test_browser_and_dns_rebinding_requests_are_refused(tmp_path, daemons):
    node = start_daemon(tmp_path / "node")
    daemons.append(node)
    port = node.api.rsplit(":", 1)[1]
    for i in range(4):
        src = tmp_path / f"f{i}"
        src.write_bytes(os.urandom(1000))
        node.cli("add", str(src))
    assert node.status()["roots"] == 4

    # a page's simple cross-origin POST (text/plain, no preflight): refused, gc never runs
    evil = {"origin": "http://evil.example", "content-type": "text/plain"}
    r = httpx.post(f"{node.api}/api/v0/gc", content='{"max_size": 0}', headers=evil)
    assert r.status_code == 403 and "Origin" in r.json()["error"]
    # even with the token, a simple content type is refused: no state change without a preflighted request
    r = httpx.post(f"{node.api}/api/v0/gc", content='{"max_size": 0}',
                   headers={**node.auth, "content-type": "text/plain"})
    assert r.status_code == 415
    r = httpx.post(f"{node.api}/api/v0/add", content=b"x", headers={"content-type": "text/plain",
                                                                      "sec-fetch-site": "cross-site"})
    assert r.status_code == 403
    # the preflight a browser must send before adding the token header is refused
    r = httpx.request("OPTIONS", f"{node.api}/api/v0/gc", headers={
        "origin": "http://evil.example", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    assert node.status()["roots"] == 4

    # DNS rebinding: evil.example resolving to 127.0.0.1 sends Host: evil.example:PORT — on every endpoint
    for method, path in [("GET", "/nix-cache-info"), ("GET", "/" + "0" * 32 + ".narinfo"), ("GET", "/metrics"),
                         ("GET", "/sha256/" + "ab" * 32), ("GET", "/api/v0/status"), ("PUT", "/nar/x.nar")]:
        r = httpx.request(method, node.api + path, headers={**node.auth, "host": f"evil.example:{port}"})
        assert r.status_code == 403, (method, path, r.status_code)
    # …while Nix and the CLI keep working under their own names
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"127.0.0.2:{port}"):
        assert httpx.get(node.api + "/nix-cache-info", headers={"host": host}).status_code == 200
    assert httpx.get(node.api + "/api/v0/status").status_code == 401  # no token, no API
    assert node.status()["roots"] == 4


def test_narinfo_for_a_held_path_with_another_nar_hash_is_409_the_same_is_idempotent(tmp_path, daemons):
    node = start_daemon(tmp_path / "node")
    daemons.append(node)
    store_path = f"/nix/store/{nixbase32.encode(os.urandom(20))}-conflict"
    store_hash = Path(store_path).name[:32]
    first = _tree_nar(tmp_path / "a", "one\n")
    second = _tree_nar(tmp_path / "b", "two\n")

    def push(nar: bytes, url: str) -> httpx.Response:
        assert httpx.put(f"{node.api}/{url}", content=nar, headers=node.auth).status_code == 200
        return httpx.put(f"{node.api}/{store_hash}.narinfo", content=_narinfo(store_path, url, nar), headers=node.auth)

    assert push(first, "nar/first.nar").status_code == 200
    assert push(first, "nar/first-again.nar").status_code == 200  # the same NarHash again: idempotent
    r = push(second, "nar/second.nar")
    assert r.status_code == 409, r.text
    served = httpx.get(f"{node.api}/{store_hash}.narinfo").text
    assert f"NarHash: sha256:{nixbase32.encode(hashlib.sha256(first).digest())}" in served
    assert node.status()["roots"] == 1  # the refused upload was dropped, not kept


def test_oversized_uploads_are_413_and_pending_ones_expire_and_have_a_quota(tmp_path, daemons):
    repo = tmp_path / "node"
    repo.mkdir()
    (repo / "config.toml").write_text("[nix]\nmax_upload_size = 400000\nupload_quota = 500000\nupload_ttl = 2\n")
    node = start_daemon(repo)
    daemons.append(node)
    big = _tree_nar(tmp_path / "big", "x" * 450_000)
    # Content-Length over the limit: refused before a byte is stored
    r = httpx.put(f"{node.api}/nar/big.nar", content=big, headers=node.auth)
    assert r.status_code == 413 and "max_upload_size" in r.json()["error"]
    # chunked (no Content-Length): counted as it streams
    r = httpx.put(f"{node.api}/nar/big.nar", content=iter([big[:200_000], big[200_000:]]), headers=node.auth)
    assert r.status_code == 413
    # a small xz file whose NAR is over the limit (a decompression bomb)
    bomb_nar = _tree_nar(tmp_path / "bomb", "\0" * 2_000_000)
    r = httpx.put(f"{node.api}/nar/bomb.nar.xz", content=lzma.compress(bomb_nar), headers=node.auth)
    assert r.status_code == 413 and "NAR inside" in r.json()["error"]
    assert node.status()["roots"] == 0

    # uploads waiting for their narinfo share a quota…
    nars = [_tree_nar(tmp_path / f"p{i}", f"{i}" * 200_000) for i in range(3)]
    for i in range(2):
        assert httpx.put(f"{node.api}/nar/p{i}.nar", content=nars[i], headers=node.auth).status_code == 200
    r = httpx.put(f"{node.api}/nar/p2.nar", content=nars[2], headers=node.auth)
    assert r.status_code == 507 and "upload_quota" in r.json()["error"]
    assert node.status()["roots"] == 2
    # …and are dropped when their narinfo does not come within the TTL
    deadline = time.monotonic() + 15
    while node.status()["roots"]:
        assert time.monotonic() < deadline, node.status()
        time.sleep(0.3)
    store_path = f"/nix/store/{nixbase32.encode(os.urandom(20))}-late"
    r = httpx.put(f"{node.api}/{Path(store_path).name[:32]}.narinfo", headers=node.auth,
                  content=_narinfo(store_path, "nar/p0.nar", nars[0]))
    assert r.status_code == 400 and "was not uploaded first" in r.json()["error"]
    assert httpx.put(f"{node.api}/nar/p2.nar", content=nars[2], headers=node.auth).status_code == 200
    # a pending upload does not outlive the daemon: at the next start it is gone (and the token is new)
    old_auth = node.auth
    node.stop()
    node = start_daemon(repo)
    daemons.append(node)
    assert node.status()["roots"] == 0
    assert httpx.get(f"{node.api}/api/v0/status", headers=old_auth).status_code == 401


def test_a_pr_runner_on_the_swarm_cannot_get_its_path_signed_by_the_trusted_runner(nix, tmp_path, daemons):
    """A PR build runs on runner A with A's token; it pushes its own contents for a store path. Runner B
    (the trusted runner's key) serves A's narinfo from the swarm with A's signatures only, so a Nix that
    trusts B's key refuses it; B's key still vouches for what is pushed to B itself."""
    sec_b, pub_b = _keys(nix, tmp_path, "trusted")
    sec_a, _ = _keys(nix, tmp_path, "pr")
    key = tmp_path / "swarm.key"
    key.write_text("/key/swarm/psk/1.0.0/\n/base16/\n" + os.urandom(32).hex() + "\n")
    a = start_daemon(tmp_path / "a", swarm_key=key, extra=["--sign-key", str(sec_a)])
    daemons.append(a)
    b = start_daemon(tmp_path / "b", swarm_key=key, bootstrap=[a.addr], extra=["--sign-key", str(sec_b)])
    daemons.append(b)
    store_path = f"/nix/store/{nixbase32.encode(os.urandom(20))}-hello-2.12"
    store_hash = Path(store_path).name[:32]
    nar = _tree_nar(tmp_path / "pr", "#!/bin/sh\necho PWNED\n")
    assert httpx.put(f"{a.api}/nar/pr.nar", content=nar, headers=a.auth).status_code == 200
    assert httpx.put(f"{a.api}/{store_hash}.narinfo", content=_narinfo(store_path, "nar/pr.nar", nar),
                     headers=a.auth).status_code == 200
    a.wait_announced(2)
    served = httpx.get(f"{b.api}/{store_hash}.narinfo", timeout=60)
    assert served.status_code == 200, served.text
    sigs = [line for line in served.text.splitlines() if line.startswith("Sig: ")]
    assert sigs and all(s.startswith("Sig: pr-1:") for s in sigs), sigs
    proc = nix.run("nix", "copy", "--from", b.api, "--to", str(tmp_path / "store-b"), store_path, check=False,
                   config=f"require-sigs = true\ntrusted-public-keys = {pub_b}\n")
    assert proc.returncode != 0 and b"signature" in proc.stderr.lower(), proc.stderr.decode()
