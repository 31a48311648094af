"""Slow clients against a real daemon over real sockets: 45 NAR downloads that never read and 200 uploads
that trickle 8 bytes every 5 s must not keep a legitimate narinfo, NAR or `add` from answering; and the
body rule (`http.asgi.bounded_bodies`) cuts off a trickling body, on a real hypercorn server."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import httpx
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from p2pcache.content import nixbase32
from p2pcache.http.asgi import bounded_bodies, read_body, send_bytes
from p2pcache.http.nix import MAX_UPLOADS
from p2pcache.store.nixstore import dump_path

from .helpers.daemons import start_daemon
from .test_nix_uploads import _narinfo

MiB = 1 << 20


def _host_port(api: str) -> tuple[str, int]:
    host, port = api.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _connect(api: str) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a reader that never reads fills up fast
    s.connect(_host_port(api))
    return s


@pytest.fixture
def node_with_a_nar(tmp_path):
    d = start_daemon(tmp_path / "node")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big").write_bytes(os.urandom(8 * MiB))
    nar = b"".join(dump_path(tree))
    store_hash = nixbase32.encode(os.urandom(20))
    url = f"nar/{nixbase32.encode(hashlib.sha256(nar).digest())}.nar"
    assert httpx.put(headers=d.auth, url=f"{d.api}/{url}", content=nar, timeout=60).status_code == 200
    assert httpx.put(headers=d.auth, url=f"{d.api}/{store_hash}.narinfo", content=_narinfo(store_hash, url, "none", nar, nar),
                     timeout=30).status_code == 200
    narinfo = httpx.get(f"{d.api}/{store_hash}.narinfo", timeout=30).text
    served_url = next(line.split(": ", 1)[1] for line in narinfo.splitlines() if line.startswith("URL: "))
    yield d, store_hash, served_url, nar
    d.stop()


def test_legitimate_requests_answer_while_245_slow_clients_are_connected(node_with_a_nar, tmp_path):
    d, store_hash, nar_url, nar = node_with_a_nar
    host, _ = _host_port(d.api)
    socks: list[socket.socket] = []
    stop = threading.Event()
    try:
        for _ in range(45):  # NAR downloads that never read a byte of the answer
            s = _connect(d.api)
            s.sendall(f"GET /{nar_url} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            socks.append(s)
        uploads = []
        for i in range(200):  # uploads announcing 1 MB and trickling it (with the token: the worst case)
            s = _connect(d.api)
            s.sendall(f"PUT /nar/slow{i}.nar HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1000000\r\n"
                      f"Authorization: Bearer {d.token}\r\n\r\n".encode()
                      + (13).to_bytes(8, "little"))  # a NAR starts: the length of "nix-archive-1"
            uploads.append(s)
            socks.append(s)

        def trickle() -> None:
            while not stop.wait(5):
                for s in uploads:
                    try:
                        s.send(b"nix-arch")
                    except OSError:
                        pass

        threading.Thread(target=trickle, daemon=True).start()
        time.sleep(2)  # let the daemon take them all in

        t = time.monotonic()
        r = httpx.get(f"{d.api}/{store_hash}.narinfo", timeout=30)
        assert r.status_code == 200
        got = httpx.get(f"{d.api}/{nar_url}", timeout=30)
        assert got.status_code == 200 and got.content == nar
        f = tmp_path / "legit.bin"
        f.write_bytes(os.urandom(100_000))
        added = d.cli("add", str(f), timeout=30)
        assert b"announced" in added.stdout
        assert time.monotonic() - t < 20

        # Uploads beyond the cap were refused at once with 503; the NAR readers got their 200 header.
        refused = 0
        for s in uploads:
            s.settimeout(0.05)
            try:
                refused += s.recv(64).startswith(b"HTTP/1.1 503")
            except OSError:
                pass  # still uploading, in one of the slots
        assert refused == 200 - MAX_UPLOADS, refused
    finally:
        stop.set()
        for s in socks:
            s.close()


def test_a_trickling_body_is_cut_off_with_408_on_a_real_server():
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                await send({"type": event["type"] + ".complete"})
                if event["type"] == "lifespan.shutdown":
                    return
        try:
            body = await read_body(receive)
        except Exception:
            return  # the client "went away": what the upload handlers see
        await send_bytes(send, 200, str(len(body)).encode(), "text/plain")

    async def main() -> tuple[bytes, float]:
        hc = HypercornConfig()
        hc.bind = ["127.0.0.1:0"]
        hc.accesslog = None
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(serve, bounded_bodies(app, grace=1.0, min_rate=100), hc)
            host, port = _host_port(binds[0])
            fast = await trio.open_tcp_stream(host, port)
            await fast.send_all(f"POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5000\r\n\r\n".encode()
                                + b"x" * 5000)
            fast_answer = await fast.receive_some(4096)
            slow = await trio.open_tcp_stream(host, port)
            await slow.send_all(f"POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5000\r\n\r\n".encode())
            start = trio.current_time()
            answer = b""
            with trio.move_on_after(10):
                while not answer:
                    await slow.send_all(b"12345678")
                    with trio.move_on_after(0.5):
                        answer = await slow.receive_some(4096)
            took = trio.current_time() - start
            with trio.move_on_after(2):
                while b"}" not in answer:
                    answer += await slow.receive_some(4096)
            nursery.cancel_scope.cancel()
            assert fast_answer.startswith(b"HTTP/1.1 200"), fast_answer
            return answer, took

    answer, took = trio.run(main)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"too slowly" in answer
    assert 1.0 <= took < 5.0  # grace 1 s + the 8-byte pieces it earned at 100 B/s
