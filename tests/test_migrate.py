"""Format 1 (one file per block) to format 2 (pack files): a repo made by the format-1 release is refused with
one line naming `p2pcache migrate`, migrates in place with progress, and a migration SIGKILLed at spread-out
instants resumes to the same consistent repo."""

import hashlib
import json
import random
import shutil
import sqlite3
import tarfile
import time
from pathlib import Path

from p2pcache.content.chunking import ChunkerParams, Chunker
from p2pcache.content.cid import CID, RAW
from p2pcache.content.keys import HashKey
from p2pcache.content.manifest import ManifestBuilder

from .conftest import run_cli
from .test_crash import _spawn
from .test_narstore import STORE_HASH, _nar

FIXTURE = Path(__file__).parent / "data" / "format1-repo.tar.gz"

# The format-1 index tables a tiny format-1 writer needs (as the format-1 release created them).
FORMAT1_SCHEMA = """
CREATE TABLE blocks (cid BLOB PRIMARY KEY, size INTEGER NOT NULL, refs INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
CREATE TABLE roots (root BLOB PRIMARY KEY, kind TEXT NOT NULL, size INTEGER NOT NULL, name TEXT, media_type TEXT,
    added REAL NOT NULL, last_access REAL NOT NULL, pinned INTEGER NOT NULL DEFAULT 0,
    complete INTEGER NOT NULL DEFAULT 1) WITHOUT ROWID;
CREATE INDEX roots_lru ON roots(pinned, last_access);
CREATE TABLE aliases (key TEXT NOT NULL, root BLOB NOT NULL, PRIMARY KEY (key, root)) WITHOUT ROWID;
CREATE INDEX aliases_root ON aliases(root);
CREATE TABLE root_blocks (root BLOB NOT NULL, cid BLOB NOT NULL, PRIMARY KEY (root, cid)) WITHOUT ROWID;
CREATE INDEX root_blocks_cid ON root_blocks(cid);
"""


def _write_format1(path: Path, archives: list[bytes], params: ChunkerParams) -> list[str]:
    """A format-1 repo: block files under blocks/XY/<cid> and a format-1 index. Returns the roots."""
    (path / "blocks").mkdir(parents=True)
    db = sqlite3.connect(path / "index.sqlite")
    db.executescript(FORMAT1_SCHEMA)
    roots = []
    for data in archives:
        builder = ManifestBuilder(params)
        blocks = []
        chunker = Chunker(params)
        for chunk in [bytes(c) for c in chunker.feed(data)] + [bytes(c) for c in chunker.finish()]:
            cid = CID.for_block(RAW, chunk)
            blocks.append((cid, chunk))
            blocks.extend(builder.add_chunk(cid, len(chunk)))
        hashes = {"sha256": hashlib.sha256(data).digest(), "sha512": hashlib.sha512(data).digest()}
        root, root_data, index_blocks = builder.finish(len(data), hashes)
        blocks += index_blocks + [(root, root_data)]
        for cid, block in blocks:
            name = str(cid)
            f = path / "blocks" / name[-3:-1] / name
            f.parent.mkdir(exist_ok=True)
            f.write_bytes(block)
            db.execute("INSERT INTO blocks VALUES (?, ?, 0) ON CONFLICT DO NOTHING", (cid.buffer, len(block)))
            if db.execute("INSERT OR IGNORE INTO root_blocks VALUES (?, ?)", (root.buffer, cid.buffer)).rowcount:
                db.execute("UPDATE blocks SET refs = refs + 1 WHERE cid = ?", (cid.buffer,))
        db.execute("INSERT INTO roots VALUES (?, 'archive', ?, NULL, 'application/octet-stream', 0, 0, 0, 1)",
                   (root.buffer, len(data)))
        for algo, digest in hashes.items():
            db.execute("INSERT INTO aliases VALUES (?, ?)", (HashKey(algo, digest).alias, root.buffer))
        roots.append(str(root))
    db.commit()
    db.close()
    (path / "version").write_text("1\n")
    return roots


def test_a_repo_made_by_the_format_1_release_is_refused_then_migrated(tmp_path):
    with tarfile.open(FIXTURE) as t:
        t.extractall(tmp_path, filter="data")
    repo = tmp_path / "repo"
    proc = run_cli("ls", repo=repo)
    err = proc.stderr.decode().strip()
    assert proc.returncode == 5 and "run `p2pcache migrate`" in err and len(err.splitlines()) == 1, err

    proc = run_cli("migrate", repo=repo, check=True)
    assert "migrated 35/35 blocks" in proc.stderr.decode()
    assert (repo / "version").read_text().strip() == "2" and not (repo / "blocks").exists()
    assert json.loads(run_cli("verify", "--json", repo=repo, check=True).stdout)["consistent"]

    # the same archives, pins and NAR as the format-1 repo held (the fixture's generator is tests/data/)
    rng = random.Random(7)
    a = rng.randbytes(120_000)
    b = a[:60_000] + rng.randbytes(20_000)
    listed = {x["name"]: x for x in map(json.loads, run_cli("ls", "--json", repo=repo, check=True).stdout.splitlines())}
    assert listed["b.bin"]["pinned"] and not listed["a.bin"]["pinned"]
    for name, data in (("a.bin", a), ("b.bin", b)):
        out = tmp_path / name
        run_cli("get", "sha256:" + hashlib.sha256(data).hexdigest(), "-o", str(out), repo=repo, check=True)
        assert out.read_bytes() == data
    from p2pcache.store.repo import Repo

    with Repo.open(repo) as r:
        assert b"".join(r.stream_nar(STORE_HASH)) == _nar(3)
    again = json.loads(run_cli("migrate", "--json", repo=repo, check=True).stdout)
    assert again["from_version"] == "2" and again["blocks_moved"] == 0


def test_migration_killed_at_spread_out_instants_resumes_to_a_consistent_repo(tmp_path):
    rng = random.Random(3)
    repo = tmp_path / "repo"
    archives = [rng.randbytes(12 << 20) for _ in range(2)]
    params = ChunkerParams(min_size=2048, avg_size=8192, max_size=32768)
    roots = _write_format1(repo, archives, params)
    files = sum(1 for _ in (repo / "blocks").rglob("*") if _.is_file())
    (repo / "blocks" / "zz").mkdir(exist_ok=True)
    victim = next(p for p in sorted((repo / "blocks").rglob("*")) if p.is_file())
    victim.write_bytes(b"bit rot")  # a corrupt format-1 block: dropped by the migration, its root incomplete

    snapshot = tmp_path / "snapshot"
    shutil.copytree(repo, snapshot)
    t0 = time.monotonic()
    run_cli("migrate", repo=repo, check=True)
    full = time.monotonic() - t0
    shutil.rmtree(repo)
    shutil.copytree(snapshot, repo)

    kills = 0
    for i in range(5):  # each run resumes the last: killing each ~10 % into its work lands at ~10, 20, 30 … %
        proc = _spawn("migrate", repo=repo)
        deadline = time.monotonic() + 2 * full + 10
        while (repo / "version").read_text().strip() == "1" and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(full * 0.1 * rng.uniform(0.8, 1.2))
        kills += proc.poll() is None
        proc.kill()
        proc.wait()
        if (repo / "version").read_text().strip() != "2":
            proc = run_cli("ls", repo=repo)
            assert proc.returncode == 5 and "run `p2pcache migrate`" in proc.stderr.decode()
    assert kills >= 3, f"only {kills} migrations were still running when killed (one takes {full:.2f}s)"
    report = json.loads(run_cli("migrate", "--json", repo=repo, check=True).stdout)
    assert report["from_version"] in ("2-migrating", "2")  # every kill landed after the conversion began
    verify = json.loads(run_cli("verify", "--json", repo=repo, check=True).stdout)
    assert verify["consistent"] and verify["blocks_checked"] == files - 1, verify
    listed = {x["root"]: x for x in map(json.loads, run_cli("ls", "--json", repo=repo, check=True).stdout.splitlines())}
    assert sorted(x["complete"] for x in listed.values()) == [False, True]
    for root, data in zip(roots, archives):
        if listed[root]["complete"]:
            out = tmp_path / "out"
            run_cli("get", root, "-o", str(out), repo=repo, check=True)
            assert out.read_bytes() == data
