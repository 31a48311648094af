import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from p2pcache.store.repo import Repo


@pytest.fixture
def repo(tmp_path):
    r = Repo.init(tmp_path / "repo")
    yield r
    r.close()


@pytest.fixture
def daemons():
    """Real daemons a test starts (tests/helpers/daemons.py); stopped when it ends."""
    started = []
    yield started
    for d in started:
        d.stop()


@pytest.fixture
def rng():
    return random.Random(12345)


def write_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def run_cli(*args: str, repo: Path | None = None, input: bytes | None = None, check: bool = False,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the real `p2pcache` command in a subprocess."""
    cmd = [sys.executable, "-m", "p2pcache", *args]
    env = dict(os.environ)
    if repo is not None:
        env["P2PCACHE_REPO"] = str(repo)
    proc = subprocess.run(cmd, input=input, capture_output=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}): {proc.stderr.decode()}")
    return proc


def corrupt_raw_block(repo_path: Path, n: int = 0):
    """Flip the first bytes of the n-th raw block's record in its pack file (as bit rot would); its CID."""
    with Repo.open(repo_path) as r:
        cid, loc = [(c, loc) for part in r.index.iter_locations() for c, loc in part if c.codec == 0x55][n]
        path = r.packs.path(loc.pack)
    with open(path, "r+b") as f:
        f.seek(loc.offset)
        head = f.read(4)
        f.seek(loc.offset)
        f.write(bytes(b ^ 0xFF for b in head))
    return cid
