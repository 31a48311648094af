"""Mutational fuzzing of the parsers a peer reaches over the network: bitswap messages (protobuf) and their
framing, resolve requests and answers (protobuf) and their framing, and the dag-cbor blocks a peer hands us
as manifests (archive manifests, chunk-index nodes, NAR manifests, walked as a reader walks them).

Seeds are real: messages made with the encoders, manifests made by a real repo from real archives and NARs
(with a small chunker, so index nodes and directory pages exist). Inputs are mutated seeds (the mutator of
bench/fuzz_nix.py) and, for dag-cbor, also random well-formed dag-cbor values put in manifest-shaped maps
(wrong types where the schema wants others). The only exceptions allowed to escape are p2pcache's own
(errors.P2PCacheError and its subclasses: exchange.ProtocolViolation, routing.ResolveProtocolError,
MalformedBlock, NotFound, ...); whatever a parser accepts must survive its own round trip.

Prints one JSON line per parser on stdout ({"parser", "inputs", "accepted", "rejected", "seconds"}), a summary
on stderr, and exits 1 with a reproducer on the first unexpected behaviour.

    .venv/bin/python bench/fuzz_wire.py            # 100,000 inputs per parser, 800,000 in all
    .venv/bin/python bench/fuzz_wire.py --quick    # 5,000 per parser
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fuzz_nix import Unexpected, mutate_bytes, run  # noqa: E402
from p2pcache.content import dagcbor  # noqa: E402
from p2pcache.content.chunking import ChunkerParams  # noqa: E402
from p2pcache.content.cid import CID, DAG_CBOR, RAW  # noqa: E402
from p2pcache.content.manifest import ArchiveManifest, ChunkIndex, iter_blocks  # noqa: E402
from p2pcache.content.nar import Contents, DirectoryEnd, DirectoryStart, Entry, RegularFile, Symlink, write_nar  # noqa: E402
from p2pcache.content.narmanifest import NarManifest, iter_plan  # noqa: E402
from p2pcache.errors import NotFound, P2PCacheError  # noqa: E402
from p2pcache.exchange.message import (Block, FrameDecoder, Message, Presence, WantEntry, WantType,  # noqa: E402
                                       decode, encode, frame)
from p2pcache.routing.resolve_wire import (MAX_REQUEST, MAX_RESPONSE, FrameReader, NarInfoFields,  # noqa: E402
                                           ResolveAnswer, decode_request, decode_response, encode_request,
                                           encode_response)
from p2pcache.routing.resolve_wire import frame as resolve_frame  # noqa: E402

SMALL = ChunkerParams(min_size=256, avg_size=256, max_size=1024)


# -- seeds ------------------------------------------------------------------------------------------------


def bitswap_seeds() -> list[bytes]:
    data = [b"", b"x", bytes(range(256)) * 4]
    blocks = tuple(Block(CID.for_block(RAW, d), d) for d in data)
    cids = [b.cid for b in blocks] + [CID.for_block(DAG_CBOR, b"\xa0")]
    msgs = [
        Message(),
        Message(full=True),
        Message(wants=tuple(WantEntry(c, WantType.HAVE if i % 2 else WantType.BLOCK, priority=i, cancel=i == 3,
                                      send_dont_have=bool(i % 2)) for i, c in enumerate(cids)), full=True),
        Message(blocks=blocks),
        Message(presences=tuple(Presence(c, have=bool(i % 2)) for i, c in enumerate(cids)), pending_bytes=12345),
        Message(wants=(WantEntry(cids[0], WantType.BLOCK),), blocks=blocks[:1], presences=(Presence(cids[1], True),)),
    ]
    return [encode(m) for m in msgs]


def resolve_seeds() -> tuple[list[bytes], list[bytes]]:
    requests = [encode_request(a) for a in ("sha256:" + "ab" * 32, "nix:7h5mcfhx2cmdddb8lgg8z16p0w3zmxp5",
                                            str(CID.for_block(DAG_CBOR, b"m")))]
    nar = NarInfoFields(store_path="/nix/store/7h5mcfhx2cmdddb8lgg8z16p0w3zmxp5-hello-2.12",
                        nar_hash="sha256:1yqy9ds0p8sfmxrl8whpbs9kkyvqmsl7zmn8j2fikkm4k94qy5zl", nar_size=4096,
                        references=("7h5mcfhx2cmdddb8lgg8z16p0w3zmxp5-hello-2.12",), deriver="x.drv",
                        system="x86_64-linux", ca="", sigs=("cache-1:" + "A" * 86 + "==",))
    answers = [encode_response(a) for a in (None, ResolveAnswer(CID.for_block(DAG_CBOR, b"m"), "archive", 123),
                                            ResolveAnswer(CID.for_block(DAG_CBOR, b"n"), "nar", 4096, nar))]
    # payloads without their length prefix: the framing is fuzzed separately
    return [FrameReader(MAX_REQUEST).feed(r) for r in requests], [FrameReader(MAX_RESPONSE).feed(a) for a in answers]


def manifest_seeds(workdir: Path, rng: random.Random) -> tuple[list[bytes], list[bytes], dict[CID, bytes]]:
    """(archive manifest + index blocks, NAR manifest + page blocks, every dag-cbor block by CID)."""
    from p2pcache.store.narstore import RepoNarStore
    from p2pcache.store.repo import Repo

    repo = Repo.init(workdir / "repo", durable=False)
    archive_blocks: list[bytes] = []
    for size in (0, 100, 5000, 200_000):
        root = repo.add_stream(io.BytesIO(rng.randbytes(size)), name=f"a{size}.tar", params=SMALL).root
        archive_blocks.append(repo.load_block(root))
        archive_blocks += [repo.load_block(c) for c, _ in iter_blocks(repo.manifest(root), repo.load_block)
                           if c.codec == DAG_CBOR]
    store = RepoNarStore(repo)
    trees = [
        [RegularFile(5, True), Contents(b"hello")],
        [Symlink(b"../target")],
        [DirectoryStart(), Entry(b"a"), RegularFile(13), Contents(b"hello, world\n"), Entry(b"big"),
         RegularFile(3000), Contents(rng.randbytes(3000)), Entry(b"d"), DirectoryStart(), Entry(b"l"),
         Symlink(b"../a"), DirectoryEnd(), DirectoryEnd()],
        [DirectoryStart()] + [x for i in range(300) for x in (Entry(b"f%04d" % i), RegularFile(1), Contents(b"z"))]
        + [DirectoryEnd()],
    ]
    nar_blocks: list[bytes] = []
    for i, tree in enumerate(trees):
        nar = b"".join(write_nar(tree))
        root = store.add_nar(None, [nar], store_path=f"/nix/store/{'0' * 31}{i}-fuzz", params=SMALL).root
        nar_blocks.append(repo.load_block(root))
    by_cid = {}
    for data in archive_blocks + nar_blocks:
        by_cid[CID.for_block(DAG_CBOR, data)] = data
    # the NAR manifests' pages and index nodes, for walking
    for raw in list(repo.index.all_blocks()):
        c = CID.decode(raw)
        if c.codec == DAG_CBOR:
            by_cid[c] = repo.load_block(c)
    repo.close()
    return archive_blocks, nar_blocks, by_cid


def random_ipld(rng: random.Random, links: list[CID], depth: int = 0) -> object:
    kinds = ["int", "neg", "big", "bytes", "str", "bool", "null", "float", "link"]
    if depth < 4:
        kinds += ["list", "map"] * 2
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice((0, 1, 7, 8, 255, 256, 65536, 2**32, 2**63 - 1, rng.randrange(1 << 20)))
    if kind == "neg":
        return -rng.randrange(1, 1 << 40)
    if kind == "big":
        return rng.choice((2**64 - 1, 2**63))
    if kind == "bytes":
        return rng.randbytes(rng.choice((0, 1, 31, 32, 33, 64)))
    if kind == "str":
        return rng.choice(("", "p2pcache/archive", "p2pcache/nar", "sha256", "fastcdc", "a/b", "..", "é" * 3))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "float":
        return rng.choice((0.5, 1.0, -2.25))
    if kind == "link":
        return rng.choice(links)
    if kind == "list":
        return [random_ipld(rng, links, depth + 1) for _ in range(rng.choice((0, 1, 2, 3, 5)))]
    keys = ["type", "version", "size", "hashes", "chunker", "depth", "children", "name", "mediaType", "narHash",
            "narSize", "inline", "root", "x"]
    return {rng.choice(keys): random_ipld(rng, links, depth + 1) for _ in range(rng.choice((0, 1, 3, 6, 9)))}


def reshaped(rng: random.Random, seeds: list[bytes], links: list[CID]) -> bytes:
    """A real manifest with some of its fields replaced by random values (well-formed dag-cbor)."""
    value = dagcbor.decode(rng.choice(seeds))
    if isinstance(value, dict):
        for _ in range(rng.choice((1, 1, 2, 3))):
            value[rng.choice(list(value) or ["x"])] = random_ipld(rng, links, 2)
    else:
        value = random_ipld(rng, links)
    try:
        return dagcbor.encode(value)
    except P2PCacheError:
        return dagcbor.encode([])


# -- targets ----------------------------------------------------------------------------------------------


def check_bitswap(rng: random.Random, data: bytes) -> bool:
    try:
        msg = decode(data)
    except P2PCacheError:
        return False
    if decode(encode(msg)) != msg:
        raise Unexpected("an accepted bitswap message does not survive encode -> decode")
    return True


def check_bitswap_frames(rng: random.Random, data: bytes) -> bool:
    decoder = FrameDecoder()
    try:
        i = 0
        while i < len(data):
            n = rng.choice((1, 2, 7, 64, 1 << 20))
            for payload in decoder.feed(data[i : i + n]):
                decode(payload)
            i += n
    except P2PCacheError:
        return False
    return True


def check_resolve_request(rng: random.Random, data: bytes) -> bool:
    try:
        alias = decode_request(data)
    except P2PCacheError:
        return False
    if decode_request(FrameReader(MAX_REQUEST).feed(encode_request(alias))) != alias:
        raise Unexpected("an accepted resolve request does not survive encode -> decode")
    return True


def check_resolve_answer(rng: random.Random, data: bytes) -> bool:
    try:
        answer = decode_response(data)
    except P2PCacheError:
        return False
    if decode_response(FrameReader(MAX_RESPONSE).feed(encode_response(answer))) != answer:
        raise Unexpected("an accepted resolve answer does not survive encode -> decode")
    return True


def check_resolve_frames(rng: random.Random, data: bytes) -> bool:
    reader = FrameReader(MAX_RESPONSE, "answer")
    try:
        i, payload = 0, None
        while i < len(data) and payload is None:
            n = rng.choice((1, 3, 64, 1 << 16))
            payload = reader.feed(data[i : i + n])
            i += n
        if payload is None:
            reader.eof()
        decode_response(payload)
    except P2PCacheError:
        return False
    return True


def make_loader(blocks: dict[CID, bytes]) -> Callable[[CID], bytes]:
    def load(cid: CID) -> bytes:
        try:
            return blocks[cid]
        except KeyError:
            raise NotFound(f"block {cid} is not here") from None
    return load


def check_archive_manifest(load: Callable[[CID], bytes]):
    def check(rng: random.Random, data: bytes) -> bool:
        accepted = False
        try:
            m = ArchiveManifest.decode(data)
            accepted = True
            if ArchiveManifest.decode(m.encode()) != m:
                raise Unexpected("an accepted archive manifest does not survive encode -> decode")
            for _ in iter_blocks(m, load):  # the walk a fetch and `get` do
                pass
        except P2PCacheError:
            pass
        try:
            n = ChunkIndex.decode(data)
            accepted = True
            if ChunkIndex.decode(n.encode()) != n:
                raise Unexpected("an accepted chunk index does not survive encode -> decode")
        except P2PCacheError:
            pass
        return accepted
    return check


def check_nar_manifest(load: Callable[[CID], bytes]):
    def check(rng: random.Random, data: bytes) -> bool:
        try:
            m = NarManifest.decode(data)
        except P2PCacheError:
            return False
        if NarManifest.decode(m.encode()) != m:
            raise Unexpected("an accepted NAR manifest does not survive encode -> decode")
        try:
            for _ in iter_plan(m, load):  # the walk that streams a NAR to Nix
                pass
        except P2PCacheError:
            pass
        return True
    return check


def check_dagcbor(rng: random.Random, data: bytes) -> bool:
    try:
        value = dagcbor.decode(data)
    except P2PCacheError:
        return False
    if dagcbor.encode(value) != bytes(data):
        raise Unexpected("an accepted dag-cbor block is not in canonical form (re-encodes differently)")
    return True


def plan(rng: random.Random, workdir: Path) -> list[tuple[str, Callable[[], object], Callable]]:
    bitswap = bitswap_seeds()
    framed = [b"".join(frame(m) for m in rng.sample(bitswap, k)) for k in (1, 2, 3, 6)]
    requests, answers = resolve_seeds()
    resolve_framed = [resolve_frame(a) for a in answers]
    archives, nars, by_cid = manifest_seeds(workdir, rng)
    load = make_loader(by_cid)
    links = list(by_cid) + [CID.for_block(RAW, b"chunk")]
    cbor = archives + nars

    def mutated(seeds: list[bytes]) -> Callable[[], bytes]:
        return lambda: mutate_bytes(rng, rng.choice(seeds), seeds)

    def manifests(seeds: list[bytes]) -> Callable[[], bytes]:
        m = mutated(seeds)
        return lambda: m() if rng.random() < 0.6 else reshaped(rng, seeds, links)

    return [
        ("bitswap-message", mutated(bitswap), check_bitswap),
        ("bitswap-framing", mutated(framed), check_bitswap_frames),
        ("resolve-request", mutated(requests), check_resolve_request),
        ("resolve-answer", mutated(answers), check_resolve_answer),
        ("resolve-framing", mutated(resolve_framed), check_resolve_frames),
        ("dag-cbor", manifests(cbor), check_dagcbor),
        ("archive-manifest", manifests(archives), check_archive_manifest(load)),
        ("nar-manifest", manifests(nars), check_nar_manifest(load)),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="5,000 inputs per parser instead of 100,000")
    ap.add_argument("--count", type=int, help="inputs per parser")
    ap.add_argument("--seed", type=int, default=1, help="random seed (default 1); runs are reproducible")
    args = ap.parse_args(argv)
    count = args.count or (5_000 if args.quick else 100_000)
    rng = random.Random(args.seed)
    total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, make, check in plan(rng, Path(tmp)):
            result = run(name, count, rng, make, check)
            total += result["inputs"]
            print(json.dumps(result), flush=True)
            print(f"{name:>20}: {result['inputs']:>7} inputs, {result['accepted']:>6} accepted, "
                  f"{result['rejected']:>7} rejected with our own errors, {result['seconds']} s", file=sys.stderr)
    print(f"{'total':>20}: {total:>7} inputs, no unexpected exception", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
