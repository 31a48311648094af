"""The daemon's file socket (p2pcache/filesocket.py) with a real daemon: saves hand their files over as
descriptors; the token is checked first; only regular files of the stated size, read to the end."""

import json
import os
import socket
import stat
import subprocess

import httpx
import pytest

from p2pcache.cacheupload import SOCKET_LENGTH, FileSocket
from p2pcache.content import dagcbor

from .helpers.daemons import start_daemon


def ask(path, token, files, fds, lease=None):
    """One raw request: (size, name) per descriptor; the daemon's answer."""
    msg = dagcbor.encode({"token": token, "lease": lease, "sizes": [n for n, _ in files],
                          "names": [name for _, name in files]})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        socket.send_fds(s, [SOCKET_LENGTH.pack(len(msg)) + msg], fds)
        head = s.recv(SOCKET_LENGTH.size, socket.MSG_WAITALL)
        body = s.recv(SOCKET_LENGTH.unpack(head)[0], socket.MSG_WAITALL)
        return dagcbor.decode(body)


def by_descriptor(d) -> float:
    text = httpx.get(d.api + "/metrics", headers=d.auth).text
    return float(next(line.split()[-1] for line in text.splitlines()
                      if line.startswith("p2pcache_buildcache_files_by_descriptor_total")))


@pytest.fixture
def daemon(tmp_path, daemons):
    d = start_daemon(tmp_path / "a")
    daemons.append(d)
    return d


def test_a_save_hands_its_files_over_as_descriptors(daemon, tmp_path):
    sock = daemon.repo / "files.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert json.loads((daemon.repo / "api.json").read_text())["files_socket"] == str(sock)
    build = tmp_path / "build"
    build.mkdir()
    for i in range(300):  # more than one request's worth of descriptors
        (build / f"f{i}.o").write_bytes(os.urandom(1500 + i * 37))
    (build / "small").write_bytes(b"x" * 100)  # inline in its entry: read by the CLI itself
    saved = json.loads(daemon.cli("--json", "cache", "save", "main/fd", str(build)).stdout)
    assert saved["saved"] and saved["tree"]["files"] == 301 and by_descriptor(daemon) == 300
    daemon.cli("cache", "restore", "main/fd", str(tmp_path / "out"))
    assert subprocess.run(["diff", "-r", str(build), str(tmp_path / "out")]).returncode == 0


def test_the_socket_checks_the_token_and_reads_only_whole_regular_files(daemon, tmp_path):
    sock, token = daemon.repo / "files.sock", daemon.token
    f = tmp_path / "f.o"
    f.write_bytes(os.urandom(5000))
    with open(f, "rb") as good:
        wrong = ask(sock, "not-the-token", [(5000, b"f.o")], [good.fileno()])
        assert wrong["status"] == 401 and "token" in wrong["error"]
        r, w = os.pipe()
        try:
            piped = ask(sock, token, [(10, b"pipe")], [r])
        finally:
            os.close(r)
            os.close(w)
        assert piped["status"] == 400 and "not a regular file" in piped["error"]
        grown = ask(sock, token, [(4000, b"f.o")], [good.fileno()])  # the file is not the size it says
        assert grown["status"] == 400 and "changed while it was read" in grown["error"]
        mismatch = ask(sock, token, [(5000, b"f.o"), (1, b"g")], [good.fileno()])
        assert mismatch["status"] == 400
        fine = ask(sock, token, [(5000, b"f.o")], [good.fileno()])
        assert len(fine["bodies"]) == 1 and fine["bodies"][0][0] == 5000 and fine["new_bytes"] == 5000
    fd = os.open(f, os.O_WRONLY)  # a descriptor its owner may not read through: nor may the daemon
    try:
        unreadable = ask(sock, token, [(5000, b"f.o")], [fd])
    finally:
        os.close(fd)
    assert "error" in unreadable and "cannot read" in unreadable["error"]
    assert by_descriptor(daemon) == 1
    # the client half reports the daemon's line as the error it is
    client = FileSocket(str(sock), token)
    try:
        with pytest.raises(Exception, match="changed while it was read"):
            client.upload([(os.fsencode(f), 4000)], None)
    finally:
        client.close()


def _send(s, token, files, fds, **extra):
    msg = dagcbor.encode({"token": token, "lease": None, "sizes": [n for n, _ in files],
                          "names": [name for _, name in files], **extra})
    socket.send_fds(s, [SOCKET_LENGTH.pack(len(msg)) + msg], fds)


def _answer(s):
    head = s.recv(SOCKET_LENGTH.size, socket.MSG_WAITALL)
    return dagcbor.decode(s.recv(SOCKET_LENGTH.unpack(head)[0], socket.MSG_WAITALL))


def _missing(d, cids):
    from p2pcache.cacheupload import frame_cids
    from p2pcache.content.cid import CID

    r = httpx.post(d.api + "/api/v0/blocks/missing", headers={**d.auth, "content-type": "application/octet-stream"},
                   content=frame_cids([CID.decode(c) if isinstance(c, bytes) else c for c in cids]))
    r.raise_for_status()
    return len(r.json()["missing"])


def test_held_uploads_are_pipelined_recorded_at_their_commit_and_dropped_without_one(daemon, tmp_path):
    """A saver sends its requests ahead of the answers, asks the daemon to hold their blocks, and has them
    recorded in one commit before it claims its root; a connection that ends without the commit (a saver
    killed mid-save) leaves none of them recorded."""
    sock, token = str(daemon.repo / "files.sock"), daemon.token
    paths = []
    for i in range(4):
        p = tmp_path / f"f{i}.o"
        p.write_bytes(os.urandom(20_000 + i))
        paths.append(p)
    opened = [open(p, "rb") for p in paths]
    try:
        def links(answer):
            return [c for body in answer["bodies"] for c, _ in body[2]]

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # ends without a commit
            s.connect(sock)
            _send(s, token, [(20_000, b"f0.o")], [opened[0].fileno()], hold=True)
            _send(s, token, [(20_001, b"f1.o")], [opened[1].fileno()], hold=True)  # before the first answer
            first, second = _answer(s), _answer(s)
            assert first["held"] is True and second["held"] is True, (first, second)
            dropped = links(first) + links(second)
            # (a file of random bytes past the chunker's minimum may be cut in two: count the links)
            assert len(dropped) >= 2 and _missing(daemon, dropped) == len(dropped)  # held: not recorded yet
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(sock)
            _send(s, token, [(20_002, b"f2.o"), (20_003, b"f3.o")], [opened[2].fileno(), opened[3].fileno()],
                  hold=True)
            kept = links(_answer(s))
            assert len(kept) >= 2 and _missing(daemon, kept) == len(kept)
            _send(s, token, [], [], commit=True)
            assert _answer(s) == {"committed": True}
            assert _missing(daemon, kept) == 0
        assert _missing(daemon, dropped) == len(dropped)  # the first connection's blocks were never recorded
    finally:
        for f in opened:
            f.close()


def test_a_save_passes_more_descriptors_than_a_low_soft_limit_allows(tmp_path, daemons):
    """Requests in flight hold up to 2 x 250 descriptors per connection: a daemon and a saver started with
    a soft limit of 256 open files raise it (to at most the hard limit) instead of failing the save."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the hard limit of open files is {hard}")
    build = tmp_path / "build"
    build.mkdir()
    for i in range(1200):
        (build / f"f{i}.o").write_bytes(os.urandom(1100 + i))
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # inherited by the daemon and the CLI
    try:
        d = start_daemon(tmp_path / "a")
        daemons.append(d)
        saved = json.loads(d.cli("--json", "cache", "save", "main/many", str(build)).stdout)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert saved["saved"] and by_descriptor(d) == 1200
    d.cli("cache", "restore", "main/many", str(tmp_path / "out"))
    assert subprocess.run(["diff", "-r", str(build), str(tmp_path / "out")]).returncode == 0
