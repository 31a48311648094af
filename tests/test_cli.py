"""The `p2pcache` command, run as a real subprocess against a real repo."""

import base64
import hashlib
import json
import signal
import subprocess
import sys

import pytest

from .conftest import corrupt_raw_block, run_cli, run_on_tmpfs, write_file


def test_add_get_cat_ls_stat_roundtrip(tmp_path, rng):
    repo = tmp_path / "repo"
    a = write_file(tmp_path / "a.tar.gz", b"\x1f\x8b\x08\x00" + rng.randbytes(700_000))
    b = write_file(tmp_path / "b.bin", rng.randbytes(10))
    proc = run_cli("add", "--json", str(a), str(b), repo=repo, check=True)
    lines = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [x["file"] for x in lines] == [str(a), str(b)]
    first = lines[0]
    assert first["sha256"] == hashlib.sha256(a.read_bytes()).hexdigest()
    assert first["size"] == a.stat().st_size and first["format"] == "application/gzip"
    assert first["sri"].startswith("sha256-") and first["root"].startswith("bafyrei")

    # sha512 is computed when first asked for: add does not know it yet, a lookup by it computes it
    assert first["sha512"] is None and first["sha512_known"] is False
    sri512 = "sha512-" + base64.b64encode(hashlib.sha512(a.read_bytes()).digest()).decode()
    for key in (first["root"], "sha256:" + first["sha256"], first["sri"], sri512, first["nix32"]):
        out = tmp_path / "out"
        run_cli("get", key, "-o", str(out), repo=repo, check=True)
        assert out.read_bytes() == a.read_bytes()
    cat = run_cli("cat", lines[1]["sri"], repo=repo, check=True)
    assert cat.stdout == b.read_bytes()

    ls = run_cli("ls", "--json", repo=repo, check=True)
    listed = [json.loads(line) for line in ls.stdout.decode().splitlines()]
    assert {x["root"] for x in listed} == {x["root"] for x in lines}
    stat = json.loads(run_cli("stat", "--json", first["sri"], repo=repo, check=True).stdout)
    assert stat["root"] == first["root"] and stat["chunker"]["alg"] == "fastcdc-2020" and stat["blocks"] >= 2
    stat_b = json.loads(run_cli("stat", "--json", lines[1]["sri"], repo=repo, check=True).stdout)
    assert stat_b["sha512"] is None and stat_b["sha512_known"] is False  # nobody asked for it yet
    stat_b = json.loads(run_cli("stat", "--json", "--sha512", lines[1]["sri"], repo=repo, check=True).stdout)
    assert stat_b["sha512"] == hashlib.sha512(b.read_bytes()).hexdigest() and stat_b["sha512_known"]
    assert json.loads(run_cli("stat", "--json", lines[1]["sri"], repo=repo, check=True).stdout)["sha512_known"]

    run_cli("pin", first["root"], repo=repo, check=True)
    gc = json.loads(run_cli("--json", "gc", "--max-size", "0", repo=repo, check=True).stdout)
    assert gc["roots_removed"] == [lines[1]["root"]] and gc["over_quota"]
    run_cli("unpin", first["root"], repo=repo, check=True)
    gc = json.loads(run_cli("gc", "--max-size", "1K", "--json", repo=repo, check=True).stdout)
    assert gc["roots_removed"] == [first["root"]] and gc["bytes_after"] == 0
    verify = json.loads(run_cli("verify", "--json", repo=repo, check=True).stdout)
    assert verify["consistent"] and verify["blocks_checked"] == 0


def test_add_from_stdin(tmp_path, rng):
    data = rng.randbytes(50_000)
    proc = run_cli("add", "--json", "--name", "piped", "-", repo=tmp_path / "r", input=data, check=True)
    obj = json.loads(proc.stdout)
    assert obj["name"] == "piped" and obj["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("args,code,needle", [
    (["get", "sha256:" + "ab" * 32, "-o", "x"], 3, "is not in the repo"),
    (["cat", "not-a-key"], 2, "is not a key"),
    (["add", "/definitely/not/here"], 5, "does not exist"),
    (["stat", "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq"], 3, "is not in the repo"),
    (["gc", "--max-size", "lots"], 2, "not a size"),
])
def test_errors_are_one_line_with_nonzero_exit(tmp_path, args, code, needle):
    run_cli("init", repo=tmp_path / "r", check=True)
    proc = run_cli(*args, repo=tmp_path / "r")
    err = proc.stderr.decode()
    assert proc.returncode == code, err
    assert needle in err
    assert len(err.strip().splitlines()) == 1, err


def test_read_commands_on_missing_repo_say_how_to_fix(tmp_path):
    proc = run_cli("ls", repo=tmp_path / "none")
    assert proc.returncode != 0 and "p2pcache init" in proc.stderr.decode()


def test_corrupt_block_makes_get_fail_and_verify_report(tmp_path, rng):
    repo = tmp_path / "r"
    f = write_file(tmp_path / "f", rng.randbytes(400_000))
    root = json.loads(run_cli("add", "--json", str(f), repo=repo, check=True).stdout)["root"]
    corrupt_raw_block(repo)
    proc = run_cli("get", root, "-o", str(tmp_path / "out"), repo=repo)
    assert proc.returncode == 4 and "corrupt" in proc.stderr.decode()
    assert not (tmp_path / "out").exists()
    proc = run_cli("verify", repo=repo)
    assert proc.returncode == 4 and "1 corrupt" in proc.stdout.decode()
    proc = run_cli("verify", "--repair", repo=repo)
    assert proc.returncode == 0 and "1 roots incomplete" in proc.stdout.decode()
    assert run_cli("verify", repo=repo).returncode == 0
    ls = json.loads(run_cli("ls", "--json", repo=repo, check=True).stdout)
    assert ls["complete"] is False


def test_daemon_owns_the_repo_writers_are_refused_adds_go_through_it(tmp_path, rng):
    repo = tmp_path / "r"
    f = write_file(tmp_path / "f", rng.randbytes(1000))
    daemon = subprocess.Popen([sys.executable, "-m", "p2pcache", "--repo", str(repo), "daemon", "--json",
                               "--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready = json.loads(daemon.stdout.readline())
        assert ready["network"] is True and ready["repo"] == str(repo) and ready["api"].startswith("http://127.0.0.1:")
        proc = run_cli("verify", "--repair", repo=repo)
        assert proc.returncode == 5 and "in use by another p2pcache process" in proc.stderr.decode()
        assert f"pid {daemon.pid}" in proc.stderr.decode()
        added = json.loads(run_cli("add", "--json", str(f), repo=repo, check=True).stdout)
        assert added["announced"] is True  # the daemon added it for us
        assert run_cli("ls", repo=repo).returncode == 0  # readers are fine
        status = json.loads(run_cli("status", "--json", repo=repo, check=True).stdout)
        assert status["roots"] == 1 and status["peer_id"] == ready["peer_id"]
        sweep = status["announce"]["sweep"]  # the start-up sweep (batched), over the keys held then: none
        assert sweep["running"] is False and sweep["keys_done"] == sweep["keys_total"] == 0
        # pin and gc go through the daemon too; what gc evicts is withdrawn from the DHT
        run_cli("pin", added["root"], repo=repo, check=True)
        assert json.loads(run_cli("gc", "--max-size", "0", "--json", repo=repo, check=True).stdout)["over_quota"]
        run_cli("unpin", added["root"], repo=repo, check=True)
        gc = json.loads(run_cli("gc", "--max-size", "0", "--json", repo=repo, check=True).stdout)
        assert gc["roots_removed"] == [added["root"]]
        status = json.loads(run_cli("status", "--json", repo=repo, check=True).stdout)
        assert status["roots"] == 0 and status["announce"]["withdrawn"] == 3
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=15) == 0
    assert not (repo / "api.json").exists()
    proc = run_cli("status", repo=repo)
    assert proc.returncode == 5 and "no daemon is running" in proc.stderr.decode()
    run_cli("gc", repo=repo, check=True)


def test_disk_full_is_a_clear_error_and_loses_nothing(tmp_path, rng):
    """A real full file system: a 2 MiB tmpfs in a private mount namespace."""
    small = write_file(tmp_path / "small", rng.randbytes(200_000))
    big = write_file(tmp_path / "big", rng.randbytes(4 << 20))
    py = sys.executable
    script = f"""
{py} -m p2pcache add --json {small} > {tmp_path}/small.json || exit 98
{py} -m p2pcache add {big} 2> {tmp_path}/big.err; echo $? > {tmp_path}/big.rc
{py} -m p2pcache verify --json > {tmp_path}/verify.json; echo $? > {tmp_path}/verify.rc
{py} -m p2pcache get sha256:$({py} -c 'import json;print(json.load(open("{tmp_path}/small.json"))["sha256"])') -o {tmp_path}/small.out || exit 97
{py} -m p2pcache gc --json > {tmp_path}/gc.json || exit 96
"""
    proc = run_on_tmpfs(tmp_path / "mnt", script)
    assert proc.returncode == 0, proc.stderr.decode()
    err = (tmp_path / "big.err").read_text()
    assert (tmp_path / "big.rc").read_text().strip() == "6", err
    assert "disk full" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "verify.rc").read_text().strip() == "0"
    assert json.loads((tmp_path / "verify.json").read_text())["consistent"]
    assert (tmp_path / "small.out").read_bytes() == small.read_bytes()


def test_daemon_startup_errors_are_one_line(tmp_path):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        cases = [
            (["--api", f"127.0.0.1:{port}", "--listen", "/ip4/127.0.0.1/tcp/0"], 5, "Address already in use"),
            (["--listen", "/ip4/999.0.0.1/tcp/0"], 2, "is not a multiaddr"),
            (["--swarm-key", str(tmp_path / "absent.key"), "--listen", "/ip4/127.0.0.1/tcp/0"], 2, "cannot read swarm key"),
        ]
        for extra, code, needle in cases:
            proc = run_cli("daemon", *extra, repo=tmp_path / "r", timeout=60)
            err = proc.stderr.decode()
            assert proc.returncode == code and needle in err, err
            assert len(err.strip().splitlines()) == 1, err
    finally:
        busy.close()



def test_get_and_cat_hold_the_root_from_their_check_to_their_read_and_fetch_it_again_if_evicted_before(
        tmp_path, rng, daemons):
    """Real daemons. The quota's gc evicts every root nobody reads; the CLI used to look at the root, let go,
    and read it: an eviction in between failed the get with "not in the repo" although the daemon could
    have fetched it again. Now the root is held (RootReaders) from the check to the end of the read, and one
    evicted before the hold is fetched again by the daemon."""
    import os
    from pathlib import Path

    from .helpers.daemons import start_daemon

    evicting_cli = str(Path(__file__).parent / "helpers" / "evicting_cli.py")
    a = start_daemon(tmp_path / "a")
    b = start_daemon(tmp_path / "b", bootstrap=[a.addr])
    daemons += [a, b]
    data = rng.randbytes(2 << 20)
    src = write_file(tmp_path / "x.bin", data)
    a.cli("add", str(src))
    b.cli("add", str(src))
    a.wait_announced(3)
    sha = "sha256:" + hashlib.sha256(data).hexdigest()

    def cli(when, *args):
        env = dict(os.environ, P2PCACHE_REPO=str(b.repo), P2PCACHE_EVICT_AT=when)
        return subprocess.run([sys.executable, evicting_cli, *args], env=env, capture_output=True, timeout=120)

    out = tmp_path / "out.bin"
    got = cli("check", "get", sha, "-o", str(out))  # evicted right after the check said it is there
    assert got.returncode == 0, got.stderr.decode()
    assert out.read_bytes() == data
    cat = cli("check", "cat", sha)
    assert cat.returncode == 0 and cat.stdout == data, cat.stderr.decode()
    st = b.status()
    assert st["roots"] == 1 and st["fetches"] == 0  # held through both: the gc kept it, nothing fetched again

    out.unlink()
    got = cli("resolve", "get", sha, "-o", str(out))  # evicted before the CLI held it: the daemon fetches it again
    assert got.returncode == 0, got.stderr.decode()
    assert out.read_bytes() == data
    st = b.status()
    assert st["roots"] == 1 and st["fetches"] == 1
