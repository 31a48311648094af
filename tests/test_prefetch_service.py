"""The prefetch service (p2pcache/prefetch.py) with a real repo and fakes for the swarm and the origin:
what a lying peer or a wrong origin can and cannot get recorded, de-duplication and the -j bound."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import zipfile

import pytest
import trio

from p2pcache.content.cid import CID, DAG_CBOR
from p2pcache.content.gomod import zip_hash
from p2pcache.content.lockfiles import Dependency, DepHash
from p2pcache.content.manifest import iter_blocks
from p2pcache.errors import NotFound
from p2pcache.prefetch import Prefetcher
from p2pcache.routing.keys import dht_key
from p2pcache.store.origin import OriginError
from p2pcache.store.repo import Repo


class FakeOrigin:
    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.calls: list[str] = []
        self.active = self.peak = 0

    async def stream(self, url: str):
        self.calls.append(url)
        if url not in self.files:
            raise OriginError(f"origin answered HTTP 404 for {url}", 404)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await trio.sleep(0.01)
            data = self.files[url]
            for i in range(0, len(data), 1000):
                yield data[i:i + 1000]
        finally:
            self.active -= 1

    async def find_in_index(self, index_url, project, filename):
        raise OriginError("no index here", 404)


class FakeSwarm:
    """A peer's repo; `forged` maps an alias to a root the peer answers instead of the real one."""

    def __init__(self, peer: Repo, ours: Repo):
        self.peer, self.ours = peer, ours
        self.forged: dict[str, CID] = {}
        self.asked: list[str] = []

    async def fetch_blocks(self, alias: str, claim) -> CID:
        self.asked.append(alias)
        root = self.forged.get(alias) or self.peer.index.resolve_alias(alias)
        if root is None:
            raise NotFound(f"{alias}: nobody")
        blocks = [(root, self.peer.load_block(root))]
        blocks += [(c, self.peer.load_block(c)) for c, _ in iter_blocks(self.peer.manifest(root), self.peer.load_block)]
        self.ours.put_blocks(blocks)
        await claim(root)
        return root


@pytest.fixture
def repos(tmp_path):
    ours, peer = Repo.init(tmp_path / "ours"), Repo.init(tmp_path / "peer")
    yield ours, peer
    ours.close()
    peer.close()


def dep(name: str, data: bytes, algo: str = "sha512", url: str | None = None, kind: str = "npm") -> Dependency:
    return Dependency(name, "1.0.0", url, DepHash(algo, hashlib.new(algo, data).digest()), kind, f"{name}.tgz")


def forge(peer: Repo, real: bytes, claimed: bytes) -> CID:
    """A manifest over `real`'s chunks that claims the size and hashes of `claimed`."""
    root = peer.add_stream(io.BytesIO(real)).root
    m = peer.manifest(root)
    fake = dataclasses.replace(m, size=len(claimed), hashes={"sha256": hashlib.sha256(claimed).digest(),
                                                             "sha512": hashlib.sha512(claimed).digest()})
    data = fake.encode()
    cid = CID.for_block(DAG_CBOR, data)
    peer.put_blocks([(cid, data)])
    return cid


@pytest.mark.trio
async def test_a_peer_lying_about_its_manifest_gets_nothing_recorded(repos):
    ours, peer = repos
    wanted, other = b"the locked tarball" * 1000, b"something else entirely" * 1000
    d = dep("p", wanted, url="http://o/p.tgz")
    swarm = FakeSwarm(peer, ours)
    swarm.forged[d.hash.alias] = forge(peer, other, wanted)
    origin = FakeOrigin({"http://o/p.tgz": wanted})
    outcome = await Prefetcher(ours, origin, swarm).fetch(d)
    assert (outcome.source, outcome.size) == ("origin", len(wanted))  # the peer's copy was refused
    assert [r.size for r in ours.index.list_roots()] == [len(wanted)]  # only the origin's, verified
    assert b"".join(ours.stream(CID.parse(outcome.root))) == wanted


@pytest.mark.trio
async def test_sha1_and_h1_entries_come_from_a_peer_verified_and_are_found_by_their_hash_after(repos):
    ours, peer = repos
    tarball = b"old npm tarball" * 500
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("m.test/x@v1.0.0/go.mod", "module m.test/x\n")
    module_zip = buf.getvalue()
    h1 = DepHash("h1", zip_hash(io.BytesIO(module_zip)))
    for data, alias in ((tarball, f"sha1:{hashlib.sha1(tarball).hexdigest()}"), (module_zip, h1.alias)):
        root = peer.add_stream(io.BytesIO(data)).root
        peer.add_aliases(root, [alias])
    deps = [dep("old", tarball, "sha1"),
            Dependency("m.test/x", "v1.0.0", None, h1, "go-zip", "m.test/x/@v/v1.0.0.zip")]
    swarm = FakeSwarm(peer, ours)
    outcomes, summary = await Prefetcher(ours, FakeOrigin({}), swarm).run(deps, jobs=2)
    assert [o.source for o in outcomes] == ["peer", "peer"] and summary.peer == 2
    assert ours.index.resolve_alias(h1.alias) is not None
    again, summary = await Prefetcher(ours, FakeOrigin({}), swarm).run(deps, jobs=2)
    assert summary.local == 2 and len(swarm.asked) == 2  # the second run did not ask the swarm


@pytest.mark.trio
async def test_wrong_origin_bytes_fail_the_entry_and_record_nothing(repos, tmp_path):
    ours, _ = repos
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("m.test/x@v1.0.0/go.mod", "module m.test/x\n")
    good = buf.getvalue()
    h1 = DepHash("h1", zip_hash(io.BytesIO(good)))
    deps = [Dependency("m.test/x", "v1.0.0", "http://o/x.zip", h1, "go-zip", "x.zip"),
            dep("s", b"sha1 file", "sha1", url="http://o/s.tgz"),
            dep("n", b"sha512 file", url="http://o/n.tgz"),
            dep("gone", b"?", url="http://o/gone.tgz"),
            Dependency("u", "1", "http://o/n.tgz", None, "npm", error="unknown hash algorithm 'md6'")]
    origin = FakeOrigin({"http://o/x.zip": good.replace(b"module", b"MODULE"), "http://o/s.tgz": b"wrong",
                         "http://o/n.tgz": b"wrong too"})
    outcomes, summary = await Prefetcher(ours, origin).run(deps, jobs=4)
    assert [o.failure for o in outcomes] == ["hash mismatch", "hash mismatch", "hash mismatch", "origin 404",
                                             "unknown hash"]
    assert summary.failed == 5 and ours.index.list_roots() == []
    assert not list((ours.path / "tmp").iterdir())  # the spooled zip is gone too


@pytest.mark.trio
async def test_duplicates_are_fetched_once_and_parallelism_is_bounded(repos):
    ours, _ = repos
    files = {f"http://o/{i}.tgz": bytes([i]) * 5000 for i in range(12)}
    deps = [dep(str(i), files[f"http://o/{i}.tgz"], url=f"http://o/{i}.tgz") for i in range(12)]
    deps.append(dataclasses.replace(deps[0], name="copy-of-0"))
    origin = FakeOrigin(files)
    outcomes, summary = await Prefetcher(ours, origin).run(deps, jobs=3)
    assert summary.origin == 12 and summary.local == 1 and len(origin.calls) == 12
    assert origin.peak == 3


def test_lock_file_aliases_have_dht_keys():
    sha1 = "sha1:" + hashlib.sha1(b"x").hexdigest()
    assert dht_key(sha1) == bytes([0x11, 20]) + hashlib.sha1(b"x").digest()
    h1 = "h1:" + base64.b64encode(bytes(32)).decode()
    assert dht_key(h1)[:2] == bytes([0x12, 32]) and dht_key(h1) != dht_key("sha256:" + "00" * 32)
    with pytest.raises(Exception):
        dht_key("sha1:abc")
