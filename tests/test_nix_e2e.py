"""Two CI runners on one machine, with real Nix (Debian nix-bin 2.8) and real p2pcache daemons.

Runner A's Nix is the default store; runner B's Nix is a chroot store (`--store DIR`) that starts empty.
Each runner has its own daemon; the daemons form a private swarm on loopback. What B's Nix gets must
come from A through the swarm (or through A's upstream), never from anywhere else: substituters are
off except the one under test, and fixed-output URLs point at a closed port.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from .helpers.daemons import start_daemon
from .test_nix_real import Nix, nix  # noqa: F401  (the fixture fails, not skips, without Nix)

MiB = 1 << 20


@pytest.fixture(scope="module")
def keys(tmp_path_factory, nix):
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("runner-a", "stranger"):
        nix.run("nix-store", "--generate-binary-cache-key", f"{name}-1", str(d / f"{name}.sec"), str(d / f"{name}.pub"))
        out[name] = (d / f"{name}.sec", (d / f"{name}.pub").read_text().strip())
    return out


@pytest.fixture(scope="module")
def closure(tmp_path_factory, nix) -> dict:
    """Three store paths: a tree (files, an executable, a symlink, nested dirs, 2 MiB of data), a built
    output referring to it, and a top output referring to both. Fresh for every run (a random token)."""
    token = secrets.token_hex(6)
    tree = tmp_path_factory.mktemp("closure") / f"tree-{token}"
    (tree / "sub" / "deep").mkdir(parents=True)
    (tree / "hello.txt").write_text(f"hello {token}\n")
    (tree / "sub" / "deep" / "data.bin").write_bytes(os.urandom(2 * MiB))
    exe = tree / "bin-tool"
    exe.write_text("#!/bin/sh\necho tool\n")
    exe.chmod(0o755)
    os.symlink("hello.txt", tree / "link")
    added = nix.out("nix-store", "--add", str(tree))

    def build(name: str, script: str, **deps: str) -> str:
        dep_attrs = " ".join(f'{k} = builtins.storePath "{v}";' for k, v in deps.items())
        expr = (f'derivation {{ name = "{name}-{token}"; system = builtins.currentSystem; builder = "/bin/sh"; '
                f'{dep_attrs} args = [ "-c" {json.dumps(script)} ]; }}')
        return nix.out("nix-build", "--no-out-link", "-E", expr)

    mid = build("p2pcache-mid", "/bin/mkdir -p $out/bin && echo $tree > $out/tree-ref && "
                "/bin/ln -s $tree/hello.txt $out/hello && printf '#!/bin/sh\\necho mid\\n' > $out/bin/mid && "
                "/bin/chmod +x $out/bin/mid", tree=added)
    top = build("p2pcache-top", "/bin/mkdir -p $out && echo $mid $tree > $out/refs", mid=mid, tree=added)
    paths = nix.out("nix-store", "--query", "--requisites", top).split()
    assert set(paths) == {added, mid, top}
    info = json.loads(nix.out("nix", "path-info", "--json", "--recursive", top))
    return {"top": top, "mid": mid, "tree": added, "paths": paths,
            "nar_hash": {p["path"]: p["narHash"] for p in info}}


def _path_info(nix: Nix, store: Path, path: str) -> dict:
    out = nix.out("nix", "path-info", "--json", "--recursive", "--store", str(store), path)
    return {p["path"]: p["narHash"] for p in json.loads(out)}


def _metric(daemon, name: str, **labels) -> float:
    text = httpx.get(daemon.api + "/metrics", timeout=10).text  # open on loopback, like the substituter
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    total = 0.0
    for line in text.splitlines():
        if line.startswith(want + " "):
            total += float(line.split()[-1])
    return total


def _narinfo(daemon, path: str) -> httpx.Response:
    """The narinfo of store path `path` from `daemon`, once its lookup has ended (200 asserted)."""
    deadline = time.monotonic() + 30
    while (r := httpx.get(f"{daemon.api}/{Path(path).name[:32]}.narinfo", timeout=60)).status_code == 503:
        assert time.monotonic() < deadline
    assert r.status_code == 200, r.text
    return r


def _swarm(tmp_path, daemons, a_extra=(), b_extra=()):
    key = tmp_path / "swarm.key"
    subprocess.run([sys.executable, "-c", "import os;print('/key/swarm/psk/1.0.0/\\n/base16/\\n'+os.urandom(32).hex())"],
                   check=True, stdout=open(key, "w"))
    a = start_daemon(tmp_path / "a", swarm_key=key, extra=list(a_extra))
    daemons.append(a)
    b = start_daemon(tmp_path / "b", swarm_key=key, bootstrap=[a.addr], extra=list(b_extra))
    daemons.append(b)
    return a, b


def test_closure_from_runner_a_to_runner_b_with_signatures(nix, closure, keys, tmp_path, daemons):
    a_sec, a_pub = keys["runner-a"]
    a, b = _swarm(tmp_path, daemons, a_extra=["--sign-key", str(a_sec)])
    # A's post-build-hook would do this; Nix authenticates with the daemon's netrc (token as password)
    nix.run("nix", "copy", "--to", a.api, closure["top"], config=f"netrc-file = {a.netrc}\n")
    a.wait_announced(len(closure["paths"]) * 2)  # each NAR: nix:<hash> and sha256:<NarHash> (+ its CID)

    # B's Nix trusts only A's key and requires signatures: the copy succeeds, bytes from A via the swarm
    store_b = tmp_path / "store-b"
    trusted = f"require-sigs = true\ntrusted-public-keys = {a_pub}\n"
    nix.run("nix", "copy", "--from", b.api, "--to", str(store_b), closure["top"], config=trusted)
    assert _path_info(nix, store_b, closure["top"]) == closure["nar_hash"]
    assert (store_b / closure["top"].lstrip("/") / "refs").read_text().split() == [closure["mid"], closure["tree"]]
    tool = store_b / closure["tree"].lstrip("/") / "bin-tool"
    assert os.access(tool, os.X_OK) and os.readlink(store_b / closure["tree"].lstrip("/") / "link") == "hello.txt"
    fetched = _metric(b, "p2pcache_bytes_fetched_total", source="peer")
    assert fetched >= 2 * MiB, fetched
    served_from_peer = _metric(b, "p2pcache_bytes_served_total", source="peer")
    assert served_from_peer >= 2 * MiB
    assert _metric(b, "p2pcache_narinfo_requests_total", result="hit", source="peer") >= 3

    # the same with an untrusted key fails in Nix (the narinfos carry A's signature, not the stranger's)
    store_c = tmp_path / "store-c"
    _, stranger_pub = keys["stranger"]
    proc = nix.run("nix", "copy", "--from", b.api, "--to", str(store_c), closure["top"],
                   config=f"require-sigs = true\ntrusted-public-keys = {stranger_pub}\n", check=False)
    assert proc.returncode != 0 and b"signature" in proc.stderr.lower(), proc.stderr.decode()


def _fixed_output_expr(name: str, sha256_hex: str) -> str:
    # builtin:fetchurl, as nixpkgs' fetchurl uses; the URL is a closed port, so only a hashed mirror helps
    return (f'derivation {{ name = "{name}"; builder = "builtin:fetchurl"; system = "builtin"; '
            f'url = "http://127.0.0.1:1/{name}"; outputHash = "{sha256_hex}"; outputHashAlgo = "sha256"; '
            f'outputHashMode = "flat"; }}')


def test_fixed_output_fetch_through_hashed_mirror_comes_over_the_swarm(nix, tmp_path, daemons):
    a, b = _swarm(tmp_path, daemons)
    archive = tmp_path / f"src-{secrets.token_hex(4)}.tar.gz"
    archive.write_bytes(os.urandom(3 * MiB))
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    a.cli("add", str(archive))  # runner A downloaded it once
    a.wait_announced(3)
    store_b = tmp_path / "store-b"
    out = nix.out("nix-build", "--store", str(store_b), "--no-out-link", "-E", _fixed_output_expr(archive.name, digest),
                  config=f"hashed-mirrors = {b.api}/\n")
    assert (store_b / out.lstrip("/")).read_bytes() == archive.read_bytes()
    st = b.status()
    assert st["bytes_fetched"] >= 3 * MiB and st["fetches"] == 1
    assert _metric(b, "p2pcache_hashed_mirror_requests_total", result="hit") >= 1


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_pull_through_a_path_runner_a_never_had(nix, tmp_path, daemons):
    # a static binary cache (nix copy --to file://) served by a real HTTP server on loopback
    tree = tmp_path / f"upstream-only-{secrets.token_hex(4)}"
    tree.mkdir()
    (tree / "payload").write_bytes(os.urandom(MiB))
    path = nix.out("nix-store", "--add", str(tree))
    cache = tmp_path / "static-cache"
    nix.run("nix", "copy", "--to", f"file://{cache}?compression=xz", path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_QuietHandler, directory=str(cache)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        upstream = f"http://127.0.0.1:{server.server_address[1]}"
        a, b = _swarm(tmp_path, daemons, a_extra=["--upstream", upstream])
        a.wait_announced(1)  # A announces itself as a gateway to upstream caches
        store_b = tmp_path / "store-b"
        nix.run("nix", "copy", "--from", b.api, "--to", str(store_b), path, config="require-sigs = false\n")
        assert (store_b / path.lstrip("/") / "payload").read_bytes() == (tree / "payload").read_bytes()
        assert _metric(a, "p2pcache_bytes_fetched_total", source="upstream") >= MiB
        assert _metric(b, "p2pcache_bytes_fetched_total", source="peer") >= MiB
    finally:
        server.shutdown()


def test_miss_is_a_fast_404_and_cached_and_dead_peers_do_not_stall(tmp_path, daemons):
    a, b = _swarm(tmp_path, daemons, b_extra=["--lookup-timeout", "2", "--negative-ttl", "60"])
    c = start_daemon(tmp_path / "c", swarm_key=tmp_path / "swarm.key", bootstrap=[b.addr])
    deadline = time.monotonic() + 20
    while b.status()["peers"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    c.kill()  # a dead peer stays in B's routing table for a while
    missing = "0" * 32
    t = time.monotonic()
    r = httpx.get(f"{b.api}/{missing}.narinfo", timeout=60)
    first = time.monotonic() - t
    assert r.status_code == 404
    assert first < 2 * 2 + 3  # bounded by the lookup timeout (2 s) for the DHT and the gateway lookup
    before = b.status()["lookups"]
    for _ in range(5):
        assert httpx.get(f"{b.api}/{missing}.narinfo", timeout=60).status_code == 404
    after = b.status()["lookups"]
    assert after["total"] == before["total"]  # answered from the negative cache, no DHT work
    assert _metric(b, "p2pcache_narinfo_negative_cache_hits_total") == 5
    assert httpx.head(f"{b.api}/{missing}.narinfo", timeout=60).status_code == 404


def test_a_lookup_cut_by_its_wait_is_a_503_nix_retries_and_the_copy_succeeds(nix, closure, tmp_path, daemons):
    """B answers every narinfo whose swarm lookup is not done at once with 503 (`nix.lookup_wait = 0`):
    real Nix retries (a 404 would be "path … is not valid", remembered for an hour) and, the lookup
    having gone on meanwhile, gets the answer; nothing was remembered as a miss."""
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.toml").write_text("[nix]\nlookup_wait = 0\nlookahead_lookups = 0\n")
    a, b = _swarm(tmp_path, daemons)
    nix.run("nix", "copy", "--to", a.api, closure["top"], config=f"netrc-file = {a.netrc}\n")
    a.wait_announced(len(closure["paths"]) * 2)
    store_b = tmp_path / "store-b"
    proc = nix.run("nix", "copy", "--from", b.api, "--to", str(store_b), closure["top"],
                   config="require-sigs = false\n")
    assert _path_info(nix, store_b, closure["top"]) == closure["nar_hash"]
    assert b"HTTP error 503" in proc.stderr and b"retrying" in proc.stderr, proc.stderr.decode()
    assert _metric(b, "p2pcache_narinfo_still_looking_total") >= len(closure["paths"])
    assert _metric(b, "p2pcache_narinfo_requests_total", result="hit", source="peer") >= len(closure["paths"])
    assert _metric(b, "p2pcache_narinfo_requests_total", result="miss", source="none") == 0
    assert _metric(b, "p2pcache_narinfo_negative_cache_hits_total") == 0


def test_answers_waiting_for_their_nar_expire_and_the_copy_still_works(nix, closure, tmp_path, daemons):
    """B answers top's narinfo and looks ahead at mid and tree: three answers wait for their NARs, for at
    most `nix.pending_ttl`; once they expired, Nix's copy looks the paths up again and succeeds."""
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.toml").write_text("[nix]\npending_ttl = 3\n")
    a, b = _swarm(tmp_path, daemons)
    nix.run("nix", "copy", "--to", a.api, closure["top"], config=f"netrc-file = {a.netrc}\n")
    a.wait_announced(len(closure["paths"]) * 2)
    top_hash = Path(closure["top"]).name[:32]
    assert httpx.get(f"{b.api}/{top_hash}.narinfo", timeout=60).status_code == 200

    def wait_for(pending: int, within: float) -> None:
        deadline = time.monotonic() + within
        while _metric(b, "p2pcache_narinfo_pending") != pending:
            assert time.monotonic() < deadline, _metric(b, "p2pcache_narinfo_pending")
            time.sleep(0.1)

    wait_for(len(closure["paths"]), within=2.5)  # top, and mid and tree found by the look-ahead
    assert _metric(b, "p2pcache_narinfo_lookahead_total", result="found") == len(closure["paths"]) - 1
    wait_for(0, within=10)
    hits = _metric(b, "p2pcache_narinfo_requests_total", result="hit", source="peer")
    store_b = tmp_path / "store-b"
    nix.run("nix", "copy", "--from", b.api, "--to", str(store_b), closure["top"], config="require-sigs = false\n")
    assert _path_info(nix, store_b, closure["top"]) == closure["nar_hash"]
    assert _metric(b, "p2pcache_narinfo_requests_total", result="hit", source="peer") > hits


def test_post_build_hook_pushes_outputs_to_the_local_node(nix, tmp_path, daemons):
    a, b = _swarm(tmp_path, daemons)
    tree = tmp_path / f"hooked-{secrets.token_hex(4)}"
    tree.mkdir()
    (tree / "out.txt").write_text("built\n")
    path = nix.out("nix-store", "--add", str(tree))
    env = dict(os.environ, OUT_PATHS=path, P2PCACHE_REPO=str(a.repo),
               NIX_CONFIG="experimental-features = nix-command\nsubstituters =\n", HOME=str(nix.home))
    proc = subprocess.run([sys.executable, "-m", "p2pcache", "nix-hook"], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"pushed 1 path" in proc.stdout
    store_hash = Path(path).name[:32]
    assert httpx.get(f"{a.api}/{store_hash}.narinfo", timeout=30).status_code == 200
    # and B's Nix can now substitute it through the swarm
    store_b = tmp_path / "store-b"
    a.wait_announced(2)
    nix.run("nix", "copy", "--from", b.api, "--to", str(store_b), path, config="require-sigs = false\n")
    assert (store_b / path.lstrip("/") / "out.txt").read_text() == "built\n"


def test_post_build_hook_configured_in_real_nix_pushes_what_it_built(nix, tmp_path, daemons):
    """Nix itself runs the hook after a real build (Nix 2.8.0 passes DRV_PATH and an empty OUT_PATHS,
    NixOS/nix#6446): the outputs must reach the node anyway."""
    a, b = _swarm(tmp_path, daemons)
    seen = tmp_path / "hook-env"
    hook = tmp_path / "p2pcache-hook"
    hook.write_text(f"#!/bin/sh\necho \"OUT_PATHS=$OUT_PATHS DRV_PATH=$DRV_PATH\" >> {seen}\n"
                    f"exec {sys.executable} -m p2pcache --repo {a.repo} nix-hook >> {tmp_path}/hook.log 2>&1\n")
    hook.chmod(0o755)
    token = secrets.token_hex(6)
    expr = (f'derivation {{ name = "hooked-{token}"; system = builtins.currentSystem; builder = "/bin/sh"; '
            f'args = [ "-c" "echo built-{token} > $out" ]; }}')
    out = nix.out("nix-build", "--no-out-link", "-E", expr, config=f"post-build-hook = {hook}\n")
    env_line = seen.read_text()
    assert "DRV_PATH=/nix/store/" in env_line, env_line
    log = (tmp_path / "hook.log").read_text()
    assert "pushed 1 path" in log, (env_line, log)
    store_hash = Path(out).name[:32]
    assert httpx.get(f"{a.api}/{store_hash}.narinfo", timeout=30).status_code == 200
    a.wait_announced(2)
    store_b = tmp_path / "store-b"
    nix.run("nix", "copy", "--from", b.api, "--to", str(store_b), out, config="require-sigs = false\n")
    assert (store_b / out.lstrip("/")).read_text() == f"built-{token}\n"


def test_a_nar_that_cannot_fit_in_the_quota_is_refused_before_any_byte(nix, tmp_path, daemons):
    a, b = _swarm(tmp_path, daemons, b_extra=["--max-size", "64K"])
    tree = tmp_path / f"big-{secrets.token_hex(4)}"
    tree.mkdir()
    (tree / "data.bin").write_bytes(os.urandom(300_000))
    path = nix.out("nix-store", "--add", str(tree))
    nix.run("nix", "copy", "--to", a.api, path, config=f"netrc-file = {a.netrc}\n")
    a.wait_announced(2)
    store_hash = Path(path).name[:32]
    narinfo = httpx.get(f"{b.api}/{store_hash}.narinfo", timeout=60)
    assert narinfo.status_code == 200
    url = next(line.split(": ", 1)[1] for line in narinfo.text.splitlines() if line.startswith("URL: "))
    r = httpx.get(f"{b.api}/{url}", timeout=60)
    assert r.status_code == 507 and "more than this node's quota" in r.json()["error"], r.text
    st = b.status()
    # refused once for the NAR request, and (with nix.prefetch_nars on) once for the prefetch its narinfo began
    assert st["roots"] == 0 and st["stored_bytes"] == 0 and st["gc"]["refused"] in (1, 2)
    # and Nix, asked to substitute it from B, fails cleanly instead of filling B's disk
    proc = nix.run("nix", "copy", "--from", b.api, "--to", str(tmp_path / "store-b"), path,
                   config="require-sigs = false\ndownload-attempts = 1\n", check=False)
    assert proc.returncode != 0 and b"507" in proc.stderr, proc.stderr.decode()


def test_a_corrupt_pack_region_is_never_served_to_nix(tmp_path, daemons):
    """A NAR whose chunk rotted in its pack file: `verify` finds it, and the node's answer to Nix's GET of the
    NAR is an error or an aborted body, never the wrong bytes presented as whole."""
    from p2pcache.store.repo import Repo

    from .conftest import corrupt_raw_block, run_cli
    from .test_narstore import STORE_HASH, _nar, _narinfo

    repo = tmp_path / "a"
    nar = _nar(5)
    with Repo.init(repo) as r:
        r.add_nar(iter([nar]), narinfo=_narinfo(nar))
    corrupt_raw_block(repo)
    proc = run_cli("verify", repo=repo)
    assert proc.returncode == 4 and "1 corrupt" in proc.stdout.decode()
    a = start_daemon(repo)
    daemons.append(a)
    narinfo = httpx.get(f"{a.api}/{STORE_HASH}.narinfo", timeout=30)
    url = next(line.split(": ", 1)[1] for line in narinfo.text.splitlines() if line.startswith("URL: "))
    got = b""
    try:
        with httpx.stream("GET", f"{a.api}/{url}", timeout=30) as resp:
            status = resp.status_code
            for piece in resp.iter_bytes():
                got += piece
    except httpx.HTTPError:
        status = -1  # the body was cut short: Nix sees a failed download
    assert status != 200 or len(got) < len(nar), (status, len(got))
    assert got != nar


def test_a_narinfo_from_the_swarm_starts_lookups_of_its_references(nix, closure, tmp_path, daemons):
    a, b = _swarm(tmp_path, daemons)
    nix.run("nix", "copy", "--to", a.api, closure["top"], config=f"netrc-file = {a.netrc}\n")
    a.wait_announced(len(closure["paths"]) * 2)
    top = Path(closure["top"]).name.split("-")[0]
    assert httpx.get(f"{b.api}/{top}.narinfo", timeout=30).status_code == 200
    deadline = time.monotonic() + 30  # Nix asks for mid and tree next: B looked them up already
    while _metric(b, "p2pcache_narinfo_lookahead_total", result="found") < 2:
        assert time.monotonic() < deadline, httpx.get(b.api + "/metrics").text[-2000:]
        time.sleep(0.1)
    a.kill()  # what B answers now it found before Nix asked: no second lookup (nobody is left to ask)
    for path in (closure["mid"], closure["tree"]):
        r = httpx.get(f"{b.api}/{Path(path).name.split('-')[0]}.narinfo", timeout=30)
        assert r.status_code == 200 and f"StorePath: {path}\n" in r.text
    assert _metric(b, "p2pcache_narinfo_requests_total", result="hit", source="peer") == 3


def test_a_nar_whose_provider_dies_mid_response_still_arrives_whole_from_the_next(nix, closure, tmp_path, daemons):
    """Once B's NAR response has begun, the one provider its lookup found (A) is gone: B answers the narinfo
    from A, another runner (A2) pushes the same path, A dies, and the NAR B streams is still whole (the
    fetch fails and is tried again with the providers a fresh lookup names, or, when B's bitswap already
    asks A2, gets the rest from it), never a partial file."""
    a, b = _swarm(tmp_path, daemons)
    nix.run("nix", "copy", "--to", a.api, closure["tree"], config=f"netrc-file = {a.netrc}\n")
    a.wait_announced(2)
    r = _narinfo(b, closure["tree"])
    nar_url = next(line.split(": ", 1)[1] for line in r.text.splitlines() if line.startswith("URL: "))
    (tmp_path / "a2").mkdir()  # its own copy only: Nix pushes what a2 says it does not have
    (tmp_path / "a2" / "config.toml").write_text('[nix]\nlookup_order = ["repo"]\n')
    a2 = start_daemon(tmp_path / "a2", swarm_key=tmp_path / "swarm.key", bootstrap=[b.addr, a.addr])
    daemons.append(a2)
    nix.run("nix", "copy", "--to", a2.api, closure["tree"], config=f"netrc-file = {a2.netrc}\n")
    a2.wait_announced(2)
    a.kill()
    a.proc.wait()
    with httpx.stream("GET", f"{b.api}/{nar_url}", timeout=120) as resp:
        assert resp.status_code == 200
        body = b"".join(resp.iter_bytes())  # a cut response raises here (RemoteProtocolError)
    assert body == nix.dump(closure["tree"])


def test_a_narinfo_from_the_swarm_begins_its_nar_fetch_before_nix_asks_for_the_nar(nix, closure, tmp_path, daemons):
    """B answers a narinfo from A and begins fetching its NAR at once (`nix.prefetch_nars = 4`): the blocks arrive
    with no NAR request, nothing is claimed until a request streams them (NarHash checked), and that request
    gets the whole NAR from the prefetch rather than starting a fetch of its own."""
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.toml").write_text("[nix]\nprefetch_nars = 4\n")
    a, b = _swarm(tmp_path, daemons)
    nix.run("nix", "copy", "--to", a.api, closure["tree"], config=f"netrc-file = {a.netrc}\n")
    a.wait_announced(2)
    r = _narinfo(b, closure["tree"])
    nar = nix.dump(closure["tree"])
    deadline = time.monotonic() + 30
    while _metric(b, "p2pcache_bytes_fetched_total", source="peer") < len(nar):
        assert time.monotonic() < deadline, _metric(b, "p2pcache_bytes_fetched_total", source="peer")
        time.sleep(0.1)
    assert _metric(b, "p2pcache_nar_prefetches_total", result="started") == 1
    assert b.status()["roots"] == 0  # fetched, not claimed: no NAR request checked it yet
    url = next(line.split(": ", 1)[1] for line in r.text.splitlines() if line.startswith("URL: "))
    assert httpx.get(f"{b.api}/{url}", timeout=60).content == nar
    assert _metric(b, "p2pcache_nar_prefetches_total", result="taken") == 1
    assert _metric(b, "p2pcache_bytes_fetched_total", source="peer") < 1.1 * len(nar)  # fetched once
    assert b.status()["roots"] == 1
