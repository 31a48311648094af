"""Operator experience (issue 16): what a new user meets following the README, through real
subprocesses — one-line errors, human output, swarm keys, ports, repos of other users."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import run_cli, run_on_tmpfs, write_file
from .helpers.daemons import free_port, start_daemon


def _one_line(proc: subprocess.CompletedProcess, code: int, needle: str) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == code, err
    assert needle in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_relative_swarm_key_is_read_from_the_working_directory(tmp_path, daemons):
    work = tmp_path / "work"
    work.mkdir()
    subprocess.run([sys.executable, "-m", "p2pcache", "swarm-key", "new", "-o", "swarm.key"], cwd=work, check=True,
                   capture_output=True)
    proc = subprocess.Popen([sys.executable, "-m", "p2pcache", "--repo", str(tmp_path / "r"), "daemon", "--json",
                             "--swarm-key", "swarm.key", "--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0"],
                            cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read().decode()
        assert json.loads(line)["network"] is True
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_second_daemon_on_a_taken_libp2p_port_fails_with_one_line(tmp_path, daemons):
    port = free_port()
    first = start_daemon(tmp_path / "a", extra=["--listen", f"/ip4/127.0.0.1/tcp/{port}"])
    daemons.append(first)
    assert any(f"/tcp/{port}/" in a for a in first.info["addrs"])
    for listen in (f"/ip4/127.0.0.1/tcp/{port}", f"/ip4/0.0.0.0/tcp/{port}"):
        proc = run_cli("daemon", "--listen", listen, "--api", "127.0.0.1:0", repo=tmp_path / "b", timeout=60)
        _one_line(proc, 1, f"TCP port {port} is taken")
    assert first.status()["peers"] == 0  # and the first node is untouched


@pytest.fixture
def shared_dir():
    """A directory other users can reach (pytest's tmp_path is private to its user)."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="p2pcache-shared-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_unusable_repo_gives_one_line_for_add_ls_daemon(shared_dir):
    tmp_path = shared_dir
    repo = tmp_path / "theirs"
    f = write_file(tmp_path / "f", b"hello")
    run_cli("add", str(f), repo=repo, check=True)
    if os.geteuid() == 0:  # root reads everything: be another user (nobody) for real
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv to drop root")
        prefix = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
        f.chmod(0o644)
    else:
        prefix = []
        for p in [repo, *repo.iterdir()]:
            p.chmod(0o555 if p.is_dir() else 0o444)
    env = dict(os.environ, P2PCACHE_REPO=str(repo))
    for args in (["add", str(f)], ["ls"], ["gc"],
                 ["daemon", "--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0"]):
        proc = subprocess.run([*prefix, sys.executable, "-m", "p2pcache", *args], env=env, capture_output=True,
                              timeout=60)
        err = _one_line(proc, 5, f"the repo {repo}")
        assert "run as the repo's owner" in err and "another daemon" not in err


def test_bad_inputs_are_refused_with_exit_2(tmp_path):
    run_cli("init", repo=tmp_path / "r", check=True)
    proc = run_cli("daemon", "--allow-peer", "notapeer", "--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0",
                   repo=tmp_path / "r", timeout=60)
    _one_line(proc, 2, "'notapeer' is not a peer ID")
    proc = run_cli("fetch", "notaurl", "--hash", "sha256:" + "ab" * 32, repo=tmp_path / "r")
    _one_line(proc, 2, "is not an http(s) URL")
    proc = run_cli("daemon", "--config", str(tmp_path / "absent.toml"), repo=tmp_path / "r", timeout=60)
    _one_line(proc, 2, "absent.toml: No such file or directory")
    bad = write_file(tmp_path / "bad.toml", b'[gc]\nmax_size = "lots"\n')  # the rest: tests/test_config.py
    proc = run_cli("daemon", "--config", str(bad), repo=tmp_path / "r", timeout=60)
    _one_line(proc, 2, "gc.max_size 'lots' is not a size")


def test_add_from_stdin_while_a_daemon_runs(tmp_path, rng, daemons):
    import hashlib

    d = start_daemon(tmp_path / "r")
    daemons.append(d)
    data = rng.randbytes(200_000)
    proc = run_cli("add", "--json", "--name", "piped", "-", repo=d.repo, input=data)
    assert proc.returncode == 0, proc.stderr.decode()
    obj = json.loads(proc.stdout)
    assert obj["sha256"] == hashlib.sha256(data).hexdigest() and obj["announced"] is True
    assert d.cli("cat", obj["root"]).stdout == data


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two nodes: A holds X and Y; B (quota 64 MiB) joined A and fetched X, not Y."""
    import random

    tmp = tmp_path_factory.mktemp("pair")
    rng = random.Random(7)
    a = start_daemon(tmp / "a")
    b = start_daemon(tmp / "b", bootstrap=[a.addr], extra=["--max-size", "64M"])
    try:
        x, y = rng.randbytes(300_000), rng.randbytes(123_457)
        xj = json.loads(a.cli("add", "--json", str(write_file(tmp / "x.bin", x))).stdout)
        yj = json.loads(a.cli("add", "--json", str(write_file(tmp / "y.tar", y))).stdout)
        a.wait_announced(6)
        b.cli("get", xj["root"], "-o", str(tmp / "x.out"), timeout=60)
        yield {"a": a, "b": b, "x": x, "y": y, "xj": xj, "yj": yj}
    finally:
        a.stop()
        b.stop()


def test_status_and_stat_are_for_people(pair):
    b, root = pair["b"], pair["xj"]["root"]
    for text in (b.cli("status").stdout.decode(), b.cli("stat", root).stdout.decode()):
        assert not re.search(r"[{}\[\]]|'\w+':", text), text  # no Python dict/list reprs
        assert not re.search(r"\b1[6-9]\d{8}(\.\d+)?\b", text), text  # no raw epoch seconds
    status = b.cli("status").stdout.decode()
    assert re.search(r"^disk\s+29\d\.\d KiB of 64\.0 MiB quota \(0 %\)$", status, re.M), status
    assert re.search(r"^peers\s+1 connected$", status, re.M), status
    assert re.search(r"^fetched\s+29\d\.\d KiB from peers in \d+ blocks \(0 duplicate\)", status, re.M), status
    stat = b.cli("stat", root).stdout.decode()
    assert re.search(r"^added\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", stat, re.M), stat
    assert re.search(r"^size\s+293\.0 KiB \(300000 bytes\)$", stat, re.M), stat


def test_metrics_cover_peers_repo_bitswap_dht_and_the_process(pair):
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    a, b, data = pair["a"], pair["b"], pair["x"]

    def scrape(d) -> dict:
        text = httpx.get(d.api + "/metrics", timeout=10).text
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    ma, mb = scrape(a), scrape(b)
    for m, roots in ((ma, 2), (mb, 1)):
        assert m[("p2pcache_peers_connected", ())] == 1
        assert m[("p2pcache_repo_roots", (("state", "complete"),))] == roots
        assert m[("p2pcache_repo_blocks", ())] >= 6
        assert m[("process_resident_memory_bytes", ())] > 0 and m[("process_open_fds", ())] > 0
    assert mb[("p2pcache_repo_bytes", ())] == b.status()["stored_bytes"] > len(data)
    assert mb[("p2pcache_repo_quota_bytes", ())] == 64 << 20 and ma[("p2pcache_repo_quota_bytes", ())] == 0
    got = (mb[("p2pcache_bitswap_bytes_total", (("direction", "received"), ("kind", "unique")))]
           + mb[("p2pcache_dag_bytes_total", (("kind", "unique"),))])
    sent = ma[("p2pcache_bitswap_bytes_total", (("direction", "sent"), ("kind", "unique")))]
    assert got >= len(data) and sent >= len(data)
    assert mb[("p2pcache_bitswap_blocks_total", (("direction", "received"), ("kind", "duplicate")))] == 0
    found = {k[1][0][1]: v for k, v in mb.items() if k[0] == "p2pcache_dht_lookups_total"}
    assert found["found_dht"] + found["found_local"] == 1 and found["miss"] == 0, found
    assert ma[("p2pcache_dht_announcements_total", (("result", "provided"),))] >= 3
    assert mb[("p2pcache_buildcache_requests_total", (("result", "saves"),))] == 0  # the build cache's counters
    assert ("p2pcache_buildcache_bytes_fetched_total", ()) in mb


def test_head_of_an_item_only_a_peer_holds_gives_its_length(pair):
    import hashlib

    import httpx

    b, data = pair["b"], pair["y"]
    url = f"{b.api}/sha256/{hashlib.sha256(data).hexdigest()}"
    roots = b.status()["roots"]
    head = httpx.head(url, timeout=60)
    assert head.status_code == 200 and head.headers["content-length"] == str(len(data)), head.headers
    assert b.status()["roots"] == roots  # a HEAD moves no archive
    get = httpx.get(url, timeout=60)
    assert get.status_code == 200 and get.content == data
    assert httpx.head(f"{b.api}/sha256/{'cd' * 32}", timeout=60).status_code == 404


ROOT = Path(__file__).resolve().parent.parent
_STAMP_RE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: "


def _read_lines_until(proc: subprocess.Popen, stream, pattern: str, timeout: float) -> list[str]:
    """Lines of `stream` until one matches `pattern` (or `timeout` seconds passed). Reads the raw fd:
    a buffered readline would hide lines already read ahead from select."""
    import selectors
    import time

    fd = stream.fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    buf, lines = b"", []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sel.select(max(0.0, deadline - time.monotonic())):
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            lines.append(line.decode())
            if re.search(pattern, lines[-1]):
                return lines
    return lines


def test_make_run_defaults_warn_about_no_swarm_key_and_print_dialable_addresses(tmp_path):
    """The default `make run` (0.0.0.0:4011, no swarm key), inside a network namespace of its own."""
    if shutil.which("unshare") is None or shutil.which("make") is None:
        pytest.skip("needs unshare and make")
    script = f"ip link set lo up && exec make -s -C {ROOT} -o .venv/.installed run"
    proc = subprocess.Popen(["unshare", "--net", "--map-root-user", "sh", "-c", script],
                            env=dict(os.environ, P2PCACHE_REPO=str(tmp_path / "r")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out = _read_lines_until(proc, proc.stdout, r"^  repo ", 60)
        assert "p2pcache daemon ready" in out, (out, proc.stderr.read1().decode() if proc.poll() is not None else "")
        listen = [line.split()[1] for line in out if line.startswith("  listen")]
        assert listen and all(a.startswith("/ip4/127.0.0.1/tcp/4011/p2p/12D3KooW") for a in listen), out
        assert not any("0.0.0.0" in line for line in out), out
        proc.terminate()
        err = proc.stderr.read().decode().strip().splitlines()
        warning = [line for line in err if "without a swarm key" in line]
        assert len(warning) == 1 and re.match(_STAMP_RE, warning[0]), err
        assert "/ip4/0.0.0.0/tcp/4011" in warning[0] and "p2pcache swarm-key new" in warning[0]
    finally:
        proc.kill()
        proc.wait()


def test_logs_are_one_json_format_and_a_lone_node_is_told_why(tmp_path, daemons):
    key_a, key_b = tmp_path / "a.key", tmp_path / "b.key"
    for k in (key_a, key_b):  # kubo's swarm.key format, as `p2pcache swarm-key new` writes it
        k.write_text(f"/key/swarm/psk/1.0.0/\n/base16/\n{os.urandom(32).hex()}\n")
    other_team = start_daemon(tmp_path / "other", swarm_key=key_b)
    daemons.append(other_team)
    dead = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/12D3KooWRBhwfeP2Y4TCx1SM6s9rUoHhR5STiGwxBhgFRcw3UERE"
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2pcache", "--repo", str(tmp_path / "r"), "daemon", "--log-format", "json",
         "--swarm-key", str(key_a), "--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0",
         "--bootstrap", other_team.addr, "--bootstrap", dead, "--alone-warning", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lines = _read_lines_until(proc, proc.stderr, "different swarm key", 40)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    records = [json.loads(line) for line in lines]  # every line is one JSON object: no stray text
    assert all(set(r) >= {"time", "level", "logger", "message"} for r in records), records
    alone = [r for r in records if "different swarm key" in r["message"]]
    assert alone and alone[0]["level"] == "warning" and alone[0]["logger"] == "p2pcache.net.host", records
    # py-libp2p's own lines come through the same formatter, at WARNING or above, once per call site
    lib = [r for r in records if r["logger"].startswith("libp2p")]
    assert lib and all(r["level"] in ("warning", "error", "critical") for r in lib), records
    sites = [(r["logger"], r["message"]) for r in lib]
    assert len(sites) == len(set(sites)), sites
    assert not any(r["level"] == "info" for r in records), records


def _wait(pred, timeout: float = 20, what: str = "condition"):
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_quota_evicts_lru_unpinned_withdraws_and_refuses_what_cannot_fit(tmp_path, rng, daemons):
    KiB = 1024
    seed = start_daemon(tmp_path / "seed")
    daemons.append(seed)
    conf = tmp_path / "etc" / "p2pcache.toml"
    conf.parent.mkdir()
    conf.write_text('[gc]\nmax_size = "1M"\nhigh_watermark = 0.9\nlow_watermark = 0.6\ninterval = 0.5\n'
                    '[routing]\nlookup_timeout = 3\n')
    node = start_daemon(tmp_path / "node", bootstrap=[seed.addr], extra=["--config", str(conf)])
    daemons.append(node)
    big = write_file(tmp_path / "big.bin", rng.randbytes(1300 * KiB))
    mid = write_file(tmp_path / "mid.bin", rng.randbytes(700 * KiB))
    big_j = json.loads(seed.cli("add", "--json", str(big)).stdout)
    mid_j = json.loads(seed.cli("add", "--json", str(mid)).stdout)
    seed.wait_announced(6)
    assert node.status()["quota_bytes"] == 1 << 20

    # bigger than the quota: refused before a block is stored, exit 6, nothing left behind
    proc = node.cli("get", big_j["sri"], "-o", str(tmp_path / "out"), check=False, timeout=60)
    _one_line(proc, 6, "more than this node's quota")
    st = node.status()
    assert st["stored_bytes"] == 0 and st["roots"] == 0 and st["gc"]["refused"] == 1
    header = len(b"p2pcache pack 2\n")  # an open pack holds its header only
    stored_files = [p for d in ("packs", "blocks", "tmp") for p in (node.repo / d).rglob("*")
                    if p.is_file() and p.stat().st_size > header]
    assert not stored_files and not (tmp_path / "out").exists()

    # three 350 KiB adds: the third passes 90 % of 1 MiB; LRU unpinned go until under 60 %
    files = [write_file(tmp_path / f"f{i}", rng.randbytes(350 * KiB)) for i in range(3)]
    roots = []
    for i, f in enumerate(files):
        roots.append(json.loads(node.cli("add", "--json", str(f)).stdout)["root"])
        if i == 0:
            node.cli("pin", roots[0])
    st = _wait(lambda: (s := node.status())["gc"]["roots_evicted"] >= 1 and s, what="eviction")
    assert st["stored_bytes"] <= 0.6 * (1 << 20)
    kept = {json.loads(line)["root"] for line in node.cli("ls", "--json").stdout.decode().splitlines()}
    assert roots[0] in kept and roots[1] not in kept  # pinned stays; the least recently used goes
    assert st["announce"]["withdrawn"] >= 3  # root CID, sha256, sha512 of the evicted one
    assert re.search(r"^disk\s+\S+ KiB of 1\.0 MiB quota \(\d+ %\)$", node.cli("status").stdout.decode(), re.M)

    # 700 KiB from the swarm fits only if the pinned one goes: refused while pinned, nothing stored
    proc = node.cli("get", mid_j["sri"], "-o", str(tmp_path / "mid.out"), check=False, timeout=60)
    _one_line(proc, 6, "does not fit in the quota")
    assert node.status()["stored_bytes"] == st["stored_bytes"]
    # unpinned, it is evicted to make room before the fetch starts, and the fetch completes
    node.cli("unpin", roots[0])
    node.cli("get", mid_j["sri"], "-o", str(tmp_path / "mid.out"), timeout=60)
    assert (tmp_path / "mid.out").read_bytes() == mid.read_bytes()
    st = node.status()
    listed = [json.loads(line)["root"] for line in node.cli("ls", "--json").stdout.decode().splitlines()]
    assert listed == [mid_j["root"]] and st["stored_bytes"] <= 1 << 20


def test_progress_lines_in_ci_logs_and_a_bar_with_a_total_on_a_terminal(tmp_path, rng, daemons):
    import hashlib
    import pty
    import threading

    MiB = 1 << 20
    a = start_daemon(tmp_path / "a")
    data = rng.randbytes(16 * MiB)
    src = write_file(tmp_path / "big.bin", data)
    daemons.append(a)
    b = start_daemon(tmp_path / "b", bootstrap=[a.addr])
    daemons.append(b)
    a.cli("add", str(src))
    a.wait_announced(3)
    key = "sha256:" + hashlib.sha256(data).hexdigest()
    env = dict(os.environ, P2PCACHE_REPO=str(b.repo), P2PCACHE_PROGRESS_INTERVAL="0.02")

    # no terminal (a CI log): --progress always prints lines with bytes, total, rate and ETA
    proc = subprocess.run([sys.executable, "-m", "p2pcache", "--progress", "always", "get", key, "-o",
                           str(tmp_path / "b.out")], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stderr.decode().splitlines()
    assert lines[0].startswith("fetching sha256:") and len(lines) >= 3, lines
    middle = [line for line in lines[1:-1] if "of 16.0 MiB (" in line and "/s" in line and "ETA" in line]
    assert middle, lines
    assert "16.0 MiB of 16.0 MiB (100 %)" in lines[-1] and "done in" in lines[-1], lines
    assert "\x1b[" not in proc.stderr.decode()  # no terminal control codes in a log

    # a terminal (a pty): the rich bar shows the archive's total once the daemon knows it
    b.cli("gc", "--max-size", "0")  # B forgets it, so it comes over the swarm again
    assert b.status()["roots"] == 0
    master, slave = pty.openpty()
    seen = bytearray()
    p = subprocess.Popen([sys.executable, "-m", "p2pcache", "get", key, "-o", str(tmp_path / "c.out")],
                         env=dict(env, COLUMNS="120"), stdout=subprocess.PIPE,
                         stderr=slave)
    os.close(slave)

    def pump():
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                return
            if not chunk:
                return
            seen.extend(chunk)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    assert p.wait(timeout=120) == 0
    reader.join(timeout=5)
    os.close(master)
    text = seen.decode(errors="replace")
    assert (tmp_path / "c.out").read_bytes() == data
    assert re.search(r"/16\.0 MiB", text), text[-2000:]  # "12.5/16.0 MiB": a total, not a bare count


def test_readme_documents_every_command_and_daemon_option():
    import argparse

    from p2pcache.cli import build_parser

    readme = (ROOT / "README.md").read_text()
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [name for name in sub.choices if not re.search(rf"^  {re.escape(name)}\b|/ {name}\b", readme, re.M)]
    assert not missing, f"commands not in the README's CLI block: {missing}"
    options = [o for a in sub.choices["daemon"]._actions for o in a.option_strings
               if o.startswith("--") and o not in ("--help", "--repo", "--json", "--progress")]
    assert not [o for o in options if o not in readme], [o for o in options if o not in readme]
    for sp in sub.choices.values():  # and every option says what it does
        assert all(a.help for a in sp._actions if a.option_strings and a.dest != "help"), sp.prog


def test_daemon_fetch_that_cannot_fit_on_a_full_disk_fails_early_and_leaves_nothing(tmp_path, rng, daemons):
    """A real small file system: a 2 MiB tmpfs in a private mount namespace holds the node's repo."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    seed = start_daemon(tmp_path / "seed")
    daemons.append(seed)
    data = rng.randbytes(4 << 20)
    added = json.loads(seed.cli("add", "--json", str(write_file(tmp_path / "big", data))).stdout)
    py = sys.executable
    script = f"""
{py} -m p2pcache daemon --listen /ip4/127.0.0.1/tcp/0 --api 127.0.0.1:0 --bootstrap {seed.addr} \
    > {tmp_path}/node.out 2> {tmp_path}/node.err &
pid=$!
for _ in $(seq 100); do [ -s $P2PCACHE_REPO/api.json ] && break; sleep 0.2; done
for _ in $(seq 100); do {py} -m p2pcache status | grep -q '^peers  *1 connected' && break; sleep 0.2; done
for _ in $(seq 40); do  # until the seed has announced it to us (exit 3 before)
  {py} -m p2pcache get {added['sri']} -o {tmp_path}/out 2> {tmp_path}/get.err; rc=$?
  [ $rc -ne 3 ] && break; sleep 0.5
done
echo $rc > {tmp_path}/get.rc
{py} -m p2pcache status --json > {tmp_path}/status.json
kill $pid; wait $pid
"""
    proc = run_on_tmpfs(tmp_path / "mnt", script)
    assert proc.returncode == 0, proc.stderr.decode() + (tmp_path / "node.err").read_text()
    err = (tmp_path / "get.err").read_text()
    assert (tmp_path / "get.rc").read_text().strip() == "6", err
    assert "bytes free" in err and len(err.strip().splitlines()) == 1, err
    st = json.loads((tmp_path / "status.json").read_text())
    assert st["stored_bytes"] == 0 and st["roots"] == 0 and st["gc"]["refused"] == 1
    assert not (tmp_path / "out").exists()  # (pack files of the new layout are checked by the index: 0 bytes)
    assert "Traceback" not in (tmp_path / "node.err").read_text()
