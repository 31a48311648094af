"""node.py's fetch path: the whole-archive digests `Node.fetch` checks before it registers an archive, fed
by the DAG fetch with the verified bytes as they arrive (real py-libp2p hosts and real repos on loopback)."""

import hashlib
import io
import random
from pathlib import Path

import httpx
import pytest
import trio

from p2pcache.content import nixbase32
from p2pcache.content.cid import RAW
from p2pcache.content.manifest import iter_blocks
from p2pcache.content.nar import Contents, RegularFile, write_nar
from p2pcache.net.dagxfer import DagConfig
from p2pcache.node import ArchiveDigests

from . import test_net_dagxfer as dx
from .helpers.daemons import start_daemon

MiB = 1 << 20


class CountingRepo:
    """The leecher's repo as ArchiveDigests sees it, counting the raw bytes it reads back."""

    def __init__(self, repo):
        self.repo = repo
        self.read = 0

    def has_block(self, cid):
        return self.repo.has_block(cid)

    def load_block(self, cid):
        data = self.repo.load_block(cid)
        self.read += len(data) if cid.codec == RAW else 0
        return data

    def load_blocks(self, links):
        for (cid, _), data in zip(links, self.repo.load_blocks(links)):
            self.read += len(data) if cid.codec == RAW else 0
            yield data


async def _digest_while_fetching(fetch, repo, manifest):
    """Run `fetch(stored, verified)` with ArchiveDigests beside it, as Node.fetch does; its digests."""
    counting = CountingRepo(repo)
    digesting = ArchiveDigests(counting, manifest, ["sha256", "sha512"])
    out = {}

    async def digest():
        out["d"] = await digesting.run()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(digest)
        try:
            await fetch(digesting.stored, digesting.verified)
            digesting.finish(ok=True)
        finally:
            digesting.finish(ok=False)
    assert counting.read == digesting.read_back
    return out["d"], counting.read


def _whole(data):
    return {"sha256": hashlib.sha256(data).digest(), "sha512": hashlib.sha512(data).digest()}


@pytest.mark.trio
async def test_the_archive_is_hashed_from_the_bytes_as_they_arrive_and_read_back_only_what_was_not_streamed(tmp_path):
    data = random.Random(21).randbytes(6 * MiB + 99)
    async with dx.peer(tmp_path, "a") as a, dx.peer(tmp_path, "b") as b, dx.peer(tmp_path, "c") as c:
        root = a.repo.add_stream(io.BytesIO(data), name="x.tar", params=dx.SMALLER).root
        manifest = a.repo.manifest(root)
        chunks = [(cid, size) for cid, size in iter_blocks(manifest, a.repo.load_block) if cid.codec == RAW]
        addr = a.exchange.host.addrs()[0]

        # A fresh fetch from one provider: every chunk's bytes come with the walk, in archive order.
        with trio.fail_after(60):
            digests, read = await _digest_while_fetching(
                lambda stored, verified: b.fetch(root, [addr], b.repo, stored, verified), b.repo, manifest)
        assert digests == _whole(data) and read == 0

        # A resumed fetch: c holds every third chunk already; exactly those are read back, in their turn.
        held = chunks[::3]
        c.repo.put_blocks([(cid, a.repo.load_block(cid)) for cid, _ in held])
        with trio.fail_after(60):
            digests, read = await _digest_while_fetching(
                lambda stored, verified: c.fetch(root, [addr], c.repo, stored, verified), c.repo, manifest)
        assert digests == _whole(data) and read == sum(size for _, size in held)


@pytest.mark.trio
async def test_out_of_order_leaves_past_the_hold_and_a_bitswap_fetch_are_read_back_and_hashed_in_order(
        tmp_path, monkeypatch):
    data = random.Random(22).randbytes(4 * MiB + 5)
    cfg = DagConfig(request_blocks=16)
    async with dx.peer(tmp_path, "a") as a, dx.peer(tmp_path, "c") as c, dx.peer(tmp_path, "b", config=cfg) as b, \
            dx.peer(tmp_path, "d") as d:
        for p in (a, c):
            root = p.repo.add_stream(io.BytesIO(data), name="x.bin", params=dx.SMALLER).root
        manifest = a.repo.manifest(root)
        addrs = [p.exchange.host.addrs()[0] for p in (a, c)]

        # Two providers' streams interleave; with a hold of 64 KiB most of what runs ahead is dropped and
        # read back once stored.
        monkeypatch.setattr(ArchiveDigests, "HOLD", 64 << 10)
        with trio.fail_after(60):
            digests, read = await _digest_while_fetching(
                lambda stored, verified: b.fetch(root, addrs, b.repo, stored, verified), b.repo, manifest)
        assert digests == _whole(data) and read > 0

        # bitswap hands over no bytes: everything is read back, still in order.
        with trio.fail_after(60):
            digests, read = await _digest_while_fetching(
                lambda stored, verified: d.exchange.fetch_dag(root, addrs[:1], d.repo, stored), d.repo, manifest)
        assert digests == _whole(data) and read == len(data)


# -- real daemons: the registration of what a fetch brought happens inside the quota's guard ---------------

GC_AT_CLAIM = str(Path(__file__).parent / "helpers" / "gc_at_claim.py")


def test_a_gc_between_the_last_block_and_the_registration_cannot_sweep_a_fetched_nar_or_archive(
        tmp_path, rng, daemons):
    a = start_daemon(tmp_path / "a")
    daemons.append(a)
    b = start_daemon(tmp_path / "b", bootstrap=[a.addr], entry=[GC_AT_CLAIM])
    daemons.append(b)
    data = rng.randbytes(3 * MiB + 1)
    (tmp_path / "x.tar").write_bytes(data)
    a.cli("add", str(tmp_path / "x.tar"))
    nar = b"".join(write_nar([RegularFile(len(data)), Contents(data[::-1])]))
    store_hash = nixbase32.encode(rng.randbytes(20))
    url = f"nar/{nixbase32.encode(hashlib.sha256(nar).digest())}.nar"
    httpx.put(headers=a.auth, url=f"{a.api}/{url}", content=nar, timeout=30).raise_for_status()
    narinfo = (f"StorePath: /nix/store/{store_hash}-gap-test\nURL: {url}\nCompression: none\n"
               f"NarHash: sha256:{nixbase32.encode(hashlib.sha256(nar).digest())}\nNarSize: {len(nar)}\n"
               "References: \n")
    httpx.put(headers=a.auth, url=f"{a.api}/{store_hash}.narinfo", content=narinfo, timeout=30).raise_for_status()
    a.wait_announced(4)

    # B fetches both from A; a gc is started at the instant each is about to be registered
    info = httpx.get(f"{b.api}/{store_hash}.narinfo", timeout=60)
    assert info.status_code == 200, info.text
    nar_url = next(line.split(": ", 1)[1] for line in info.text.splitlines() if line.startswith("URL: "))
    assert httpx.get(f"{b.api}/{nar_url}", timeout=60).content == nar
    b.cli("get", "sha256:" + hashlib.sha256(data).hexdigest(), "-o", str(tmp_path / "out1"), timeout=60)
    assert (tmp_path / "out1").read_bytes() == data

    # Both were claimed before that gc ran (it waited for the fetch's guard): B serves them with A gone.
    a.stop()
    st = b.status()
    assert st["roots"] == 2 and st["roots_incomplete"] == 0, st
    assert httpx.get(f"{b.api}/{nar_url}", timeout=60).content == nar
    b.cli("get", "sha256:" + hashlib.sha256(data).hexdigest(), "-o", str(tmp_path / "out2"), timeout=60)
    assert (tmp_path / "out2").read_bytes() == data
    injected = [ln for ln in (tmp_path / "b.log").read_text().splitlines() if "gc at claim:" in ln]
    assert len(injected) == 2 and all(ln.endswith(": waited") for ln in injected), injected


def test_a_restore_from_a_peer_checks_the_quota_before_fetching_the_tree(tmp_path, rng, daemons):
    from . import test_buildcache_swarm as bc

    for name in ("a", "b"):
        bc.write_writers(tmp_path / name, [("ci/*", ["*"])])
    quota = 2 * MiB
    a = start_daemon(tmp_path / "a")
    daemons.append(a)
    b = start_daemon(tmp_path / "b", bootstrap=[a.addr], extra=["--max-size", str(quota)])
    daemons.append(b)
    big = tmp_path / "big"
    for i in range(6):
        (big / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        (big / f"d{i % 2}" / f"f{i}.o").write_bytes(rng.randbytes(600_000))
    small = tmp_path / "small"
    small.mkdir()
    (small / "f.o").write_bytes(rng.randbytes(300_000))
    a.cli("--json", "cache", "save", "ci/big", str(big))
    a.cli("--json", "cache", "save", "ci/small", str(small))

    # 3.6 MB of files does not fit a 2 MiB quota: refused before any of it is stored, with one line
    res = bc.restore(b, "ci/big", tmp_path / "out-big", check=False)
    assert not isinstance(res, dict), res
    err = res.stderr.decode().strip()
    assert res.returncode == 6 and len(err.splitlines()) == 1 and "quota" in err and "--max-size" in err, err
    st = b.status()
    assert st["stored_bytes"] <= quota and st["roots"] == 0, st
    assert not (tmp_path / "out-big").exists() or not any((tmp_path / "out-big").iterdir())

    # one that fits is fetched and restored
    got = bc.restore(b, "ci/small", tmp_path / "out-small")
    assert got["match"] == "exact" and bc.same_tree(small, tmp_path / "out-small")
    assert b.status()["stored_bytes"] <= quota
