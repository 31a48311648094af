"""Bitswap interop with a real foreign peer: js-libp2p + @helia/bitswap 2.2.0 under Node, over loopback TCP
with Noise and Yamux, in both directions, for raw and dag-cbor blocks; and inside a private network
(kubo swarm.key, libp2p PSK v1) shared with the js peer.

Needs `npm ci --prefix tests/interop` (node_modules is not committed)."""

from __future__ import annotations

import base64
import functools
import io
import itertools
import json
import random
import shutil
import subprocess
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from p2pcache.content.chunking import ChunkerParams
from p2pcache.content.cid import CID, DAG_CBOR, RAW
from p2pcache.content.manifest import ChunkIndex, iter_blocks
from p2pcache.net.bitswap import BitswapExchange, RepoBlockSource
from p2pcache.net.host import HostConfig, HostError, open_host
from p2pcache.net.pnet import write_swarm_key
from p2pcache.store.repo import Repo

HERE = Path(__file__).resolve().parent


def require_js_harness() -> list[str]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("interop tests need Node.js 20+ on PATH (`node`); install nodejs")
    if not (HERE / "node_modules" / "@helia" / "bitswap").is_dir():
        pytest.fail(f"interop tests need the js peer's packages: run `npm ci --prefix {HERE}` (node_modules is missing)")
    return [node, "--import", str(HERE / "polyfill.mjs"), str(HERE / "peer.mjs")]


class JsPeer:
    """The js peer subprocess, driven by JSON lines (see peer.mjs)."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self._buf = b""
        self._ids = itertools.count(1)
        self._replies: dict[int, dict] = {}
        self.peer_id = ""
        self.addrs: list[str] = []

    async def _line(self) -> dict:
        while b"\n" not in self._buf:
            chunk = await self.proc.stdout.receive_some(1 << 20)
            if not chunk:
                raise AssertionError(f"js peer exited (code {self.proc.poll()}); see its stderr above")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    async def start(self) -> None:
        ready = await self._line()
        assert ready.get("event") == "ready", ready
        self.peer_id, self.addrs = ready["peerId"], ready["addrs"]

    async def call(self, cmd: str, **kw) -> dict:
        rid = next(self._ids)
        await self.proc.stdin.send_all(json.dumps({"id": rid, "cmd": cmd, **kw}).encode() + b"\n")
        while rid not in self._replies:
            msg = await self._line()
            self._replies[msg.get("id")] = msg
        reply = self._replies.pop(rid)
        if "error" in reply:
            raise AssertionError(f"js peer: {cmd} failed: {reply['error']}")
        return reply


@asynccontextmanager
async def js_peer(swarm_key: Path | None = None):
    cmd = require_js_harness()
    if swarm_key is not None:
        cmd += ["--swarm-key", str(swarm_key)]
    async with trio.open_nursery() as nursery:
        proc = await nursery.start(functools.partial(
            trio.run_process, cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, check=False))
        peer = JsPeer(proc)
        try:
            with trio.fail_after(30):
                await peer.start()
            yield peer
        finally:
            proc.kill()
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def our_node(tmp_path: Path, swarm_key: bytes | None = None):
    repo = Repo.init(tmp_path / "repo", durable=False)
    cfg = HostConfig(identity=tmp_path / "id.key", listen=("/ip4/127.0.0.1/tcp/0",), swarm_key=swarm_key,
                     handshake_timeout=5)
    try:
        async with open_host(cfg) as host:
            ex = BitswapExchange(host, RepoBlockSource(repo))
            async with trio.open_nursery() as nursery:
                await nursery.start(ex.run)
                yield ex, repo
                nursery.cancel_scope.cancel()
    finally:
        repo.close()


def sample_archive(repo: Repo, seed: int, size: int = 600_000):
    """An archive in `repo`: a dag-cbor manifest root and raw chunks. Returns (root, {cid: bytes})."""
    data = random.Random(seed).randbytes(size)
    added = repo.add_stream(io.BytesIO(data), name="sample.tar", params=ChunkerParams())
    blocks = {added.root: repo.load_block(added.root)}
    for cid, _ in iter_blocks(repo.manifest(added.root), repo.load_block):
        blocks[cid] = repo.load_block(cid)
    return added.root, data, blocks


def foreign_blocks(seed: int) -> dict[CID, bytes]:
    """Raw blocks and a dag-cbor block (a chunk index naming them), made here, not by the repo."""
    rng = random.Random(seed)
    raws = [rng.randbytes(n) for n in (1, 1000, 200_000, 1 << 20)]
    out = {CID.for_block(RAW, d): d for d in raws}
    index = ChunkIndex(0, tuple((c, len(d)) for c, d in out.items())).encode()
    out[CID.for_block(DAG_CBOR, index)] = index
    return out


async def js_fetches_from_us(js: JsPeer, ex: BitswapExchange, blocks: dict[CID, bytes]) -> None:
    await js.call("dial", addr=str(ex.host.addrs()[0]))
    reply = await js.call("want", cids=[str(c) for c in blocks], timeout=20000)
    got = {CID.parse(b["cid"]): b for b in reply["blocks"]}
    assert set(got) == set(blocks)
    for cid, data in blocks.items():
        assert got[cid]["ok"], f"js peer's own sha-256 check failed for {cid}"
        assert base64.b64decode(got[cid]["data"]) == data


async def we_fetch_from_js(js: JsPeer, ex: BitswapExchange, blocks: dict[CID, bytes]) -> None:
    await js.call("put", blocks=[{"cid": str(c), "data": base64.b64encode(d).decode()} for c, d in blocks.items()])
    got = await ex.fetch_blocks(list(blocks), [js.addrs[0]])
    assert got == blocks


@pytest.mark.trio
async def test_js_fetches_raw_and_dag_cbor_blocks_we_serve(tmp_path):
    async with our_node(tmp_path) as (ex, repo), js_peer() as js:
        root, _, blocks = sample_archive(repo, 1)
        assert {c.codec for c in blocks} == {RAW, DAG_CBOR}
        with trio.fail_after(60):
            await js_fetches_from_us(js, ex, blocks)
        assert ex.server.ledger(next(p for p in ex.host.connected_peers())).blocks_sent >= len(blocks) - 1


@pytest.mark.trio
async def test_we_fetch_raw_and_dag_cbor_blocks_js_serves(tmp_path):
    async with our_node(tmp_path) as (ex, repo), js_peer() as js:
        blocks = foreign_blocks(2)
        with trio.fail_after(60):
            await we_fetch_from_js(js, ex, blocks)


@pytest.mark.trio
async def test_we_fetch_a_whole_archive_from_js(tmp_path):
    src = Repo.init(tmp_path / "src", durable=False)
    root, data, blocks = sample_archive(src, 3, size=3_000_000)
    src.close()
    async with our_node(tmp_path) as (ex, repo), js_peer() as js:
        await js.call("put", blocks=[{"cid": str(c), "data": base64.b64encode(d).decode()} for c, d in blocks.items()])
        with trio.fail_after(60):
            await ex.fetch_archive(root, [js.addrs[0]], repo)
        assert b"".join(repo.stream(root)) == data


@pytest.mark.trio
async def test_dag_transfer_from_js_negotiates_down_to_bitswap(tmp_path):
    """js speaks only bitswap: the DAG protocol is refused at negotiation, nobody is blamed, and the
    whole archive comes over bitswap through the same walk."""
    from p2pcache.net.dagxfer import DagTransfer

    src = Repo.init(tmp_path / "src", durable=False)
    root, data, blocks = sample_archive(src, 4, size=3_000_000)
    src.close()
    async with our_node(tmp_path) as (ex, repo), js_peer() as js:
        await js.call("put", blocks=[{"cid": str(c), "data": base64.b64encode(d).decode()} for c, d in blocks.items()])
        dag = DagTransfer(ex.host, ex)
        with trio.fail_after(60):
            await dag.fetch(root, [js.addrs[0]], repo)
        repo.register_root(root)
        assert b"".join(repo.stream(root)) == data
        assert dag.stats.bitswap_fallbacks == 1 and dag.stats.streams == 0 and dag.stats.peers_dropped == 0
        assert ex.penalised == []


@pytest.mark.trio
async def test_private_network_with_js_both_directions(tmp_path):
    key_file = tmp_path / "swarm.key"
    key = write_swarm_key(key_file)
    async with our_node(tmp_path, swarm_key=key) as (ex, repo), js_peer(swarm_key=key_file) as js:
        _, _, ours = sample_archive(repo, 4, size=300_000)
        with trio.fail_after(60):
            await js_fetches_from_us(js, ex, ours)
            await we_fetch_from_js(js, ex, foreign_blocks(5))


@pytest.mark.trio
async def test_js_peer_with_another_swarm_key_cannot_connect(tmp_path):
    key_file = tmp_path / "swarm.key"
    write_swarm_key(key_file)
    async with our_node(tmp_path, swarm_key=bytes(32)) as (ex, repo), js_peer(swarm_key=key_file) as js:
        with trio.fail_after(30):
            with pytest.raises(HostError):
                await ex.host.connect(js.addrs[0])
            with pytest.raises(AssertionError, match="dial failed"):
                await js.call("dial", addr=str(ex.host.addrs()[0]))


@pytest.mark.trio
async def test_an_idle_connection_to_js_answers_our_keepalive_pings_and_stays_up(tmp_path, monkeypatch):
    """js-libp2p's yamux answers the keepalive pings our wire sends on a connection with nothing else on it
    (intervals cut to 0.3 s / 1 s here, 30 s / 20 s in the daemon): after many rounds the connection is still
    there and still carries a fetch."""
    from p2pcache.net import wire

    monkeypatch.setattr(wire, "KEEPALIVE_INTERVAL", 0.3)
    monkeypatch.setattr(wire, "KEEPALIVE_TIMEOUT", 1.0)
    async with our_node(tmp_path) as (ex, repo), js_peer() as js:
        blocks = foreign_blocks(5)
        await js.call("put", blocks=[{"cid": str(c), "data": base64.b64encode(d).decode()} for c, d in blocks.items()])
        with trio.fail_after(30):
            await ex.host.connect(js.addrs[0])
        (conn,) = ex.host.libp2p.get_network().connections[next(iter(ex.host.connected_peers()))]
        muxed = conn.muxed_conn
        assert isinstance(muxed, wire.YamuxConnection)
        await trio.sleep(5)  # a ping every interval + timeout at most: 3 or more
        assert muxed.pings_sent >= 3 and muxed.pongs_received >= muxed.pings_sent - 1
        assert muxed.is_established and not muxed.is_closed
        with trio.fail_after(60):
            assert await ex.fetch_blocks(list(blocks), [js.addrs[0]]) == blocks
