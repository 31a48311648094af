"""Random reads from a repo holding very many blocks: format 2 (pack files, `Repo.load_block`) beside
format 1 (one file per block, as the format-1 release read it: open + read + sha256 against the CID).

Both stores get the same N small blocks (default 1,000,000 blocks of 512 bytes: the block count, not the bytes,
is what strains a layout); then 10,000 blocks picked at random are read from each, page cache warm (dropping
caches on a shared machine would disturb others). Reports blocks/s for each and the ratio, plus build times.

Prints a table on stderr and JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pcache.content.cid import CID, RAW  # noqa: E402
from p2pcache.store.blockstore import syncfs  # noqa: E402
from p2pcache.store.repo import Repo  # noqa: E402


def emit(metric: str, value: float, unit: str, better: str, **extra) -> None:
    print(json.dumps({"bench": "store_random_read", "metric": metric, "value": round(value, 4), "unit": unit,
                      "better": better, **extra}), flush=True)


SEED = os.urandom(16)


def blocks(n: int, size: int):
    seed = SEED  # the same blocks for both layouts
    for i in range(n):
        data = seed + i.to_bytes(8, "big") + bytes(size - 24)
        yield CID.for_block(RAW, data), data


def build_packs(root: Path, n: int, size: int) -> float:
    t = time.perf_counter()
    with Repo.init(root) as repo:
        batch = []
        for b in blocks(n, size):
            batch.append(b)
            if len(batch) >= 20_000:
                repo.put_blocks(batch)
                batch = []
        repo.put_blocks(batch)
    return time.perf_counter() - t


def build_files(root: Path, n: int, size: int) -> tuple[float, list[CID]]:
    """Format 1's layout: blocks/XY/<cid> written via tmp + rename, one syncfs per 20,000 blocks."""
    t = time.perf_counter()
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    for a in alphabet:
        for b in alphabet:
            (root / "blocks" / (a + b)).mkdir(parents=True)
    (root / "tmp").mkdir()
    cids = []
    for i, (cid, data) in enumerate(blocks(n, size)):
        name = str(cid)
        tmp = f"{root}/tmp/{i}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)
        os.rename(tmp, f"{root}/blocks/{name[-3:-1]}/{name}")
        cids.append(cid)
        if i % 20_000 == 19_999:
            fd = os.open(root, os.O_RDONLY)
            syncfs(fd)
            os.close(fd)
    return time.perf_counter() - t, cids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=1_000_000)
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--reads", type=int, default=10_000)
    ap.add_argument("--quick", action="store_true", help="100,000 blocks")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    if args.quick:
        args.blocks = 100_000
    work = Path(tempfile.mkdtemp(prefix="p2pcache-randread-", dir=args.workdir))
    try:
        files_build, cids = build_files(work / "files", args.blocks, args.block_size)
        packs_build = build_packs(work / "packs", args.blocks, args.block_size)
        rng = random.Random(1)
        sample = [cids[rng.randrange(len(cids))] for _ in range(args.reads)]
        del cids
        # format 1's read: the path from the CID, open, read, sha256 against the CID
        t = time.perf_counter()
        for cid in sample:
            name = str(cid)
            with open(f"{work}/files/blocks/{name[-3:-1]}/{name}", "rb", buffering=0) as f:
                data = f.readall()
            assert cid.verify(data)
        files_t = time.perf_counter() - t
        with Repo.open(work / "packs") as repo:
            t = time.perf_counter()
            for cid in sample:
                repo.load_block(cid)
            packs_t = time.perf_counter() - t
        n = args.reads
        print(f"{args.blocks} blocks of {args.block_size} B; {n} random reads, page cache warm (loaded machine)",
              file=sys.stderr)
        print(f"format 1 (file per block): build {files_build:7.1f} s, random read {n / files_t:9.0f} blocks/s",
              file=sys.stderr)
        print(f"format 2 (pack files):     build {packs_build:7.1f} s, random read {n / packs_t:9.0f} blocks/s "
              f"({files_t / packs_t:.2f}x)", file=sys.stderr)
        emit("files_random_read", n / files_t, "blocks/s", "higher", blocks=args.blocks)
        emit("packs_random_read", n / packs_t, "blocks/s", "higher", blocks=args.blocks)
        emit("packs_random_read_vs_files", files_t / packs_t, "ratio", "higher", blocks=args.blocks)
        emit("files_build", files_build, "s", "lower", blocks=args.blocks)
        emit("packs_build", packs_build, "s", "lower", blocks=args.blocks)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
