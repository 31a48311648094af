"""How tests/data/format1-repo.tar.gz was made: run once with the format-1 code (commit dc517ca), before the pack store replaced it. Kept for the record; it cannot run against format 2."""
import io, random, tarfile, sys, os
sys.path.insert(0, ".")
from p2pcache.store.repo import Repo
from p2pcache.content.chunking import ChunkerParams
from tests.test_narstore import _nar, _narinfo
from pathlib import Path
import tempfile, shutil
rng = random.Random(7)
work = Path(tempfile.mkdtemp())
small = ChunkerParams(min_size=1024, avg_size=4096, max_size=16384)
with Repo.init(work / "repo", durable=True) as repo:
    a = rng.randbytes(120_000)
    r1 = repo.add_stream(io.BytesIO(a), name="a.bin", params=small)
    r2 = repo.add_stream(io.BytesIO(a[:60_000] + rng.randbytes(20_000)), name="b.bin", params=small)
    repo.set_pinned(str(r2.root), True)
    nar = _nar(3)
    repo.add_nar(io.BytesIO(nar), narinfo=_narinfo(nar))
    repo.put_blocks([(r1.root, repo.load_block(r1.root))])  # an unreferenced-but-recorded block case is fine
    print(r1.root, r2.root, len(repo.index.all_blocks()))
(work / "repo" / "repo.lock").unlink()
with tarfile.open("tests/data/format1-repo.tar.gz", "w:gz") as t:
    t.add(work / "repo", arcname="repo")
shutil.rmtree(work)
