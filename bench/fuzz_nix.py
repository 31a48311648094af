"""Mutational fuzzing of the Nix format parsers: NAR reader, narinfo, store paths, nix-base32, hashes, keys and
signatures.

Each parser gets inputs made by mutating valid seeds with `random.Random(seed)` (byte flips, inserts, deletes,
duplicated and spliced ranges, truncation, and for NAR overwritten 8-byte length fields). The only exceptions
allowed to escape are the module's own error types; and whatever a parser accepts must survive its own
round trip (NAR: the writer reproduces the exact input bytes; text formats: render -> parse gives the same value).

Prints one JSON line per parser on stdout ({"parser", "inputs", "accepted", "rejected", "seconds"}), a summary
on stderr, and exits 1 with a reproducer on the first unexpected behaviour.

    .venv/bin/python bench/fuzz_nix.py            # ~370,000 inputs
    .venv/bin/python bench/fuzz_nix.py --quick    # ~18,500 inputs
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pcache.content import nixbase32  # noqa: E402
from p2pcache.content.nar import (  # noqa: E402
    Contents,
    DirectoryEnd,
    DirectoryStart,
    Entry,
    InvalidNar,
    NarReader,
    RegularFile,
    Symlink,
    write_nar,
)
from p2pcache.content.narinfo import InvalidNarInfo, NarInfo  # noqa: E402
from p2pcache.content.nixhash import ALGORITHMS, InvalidNixHash, NixHash  # noqa: E402
from p2pcache.content.nixhash import parse as parse_hash  # noqa: E402
from p2pcache.content.nixsig import InvalidSignature, PublicKey, SecretKey, Signature  # noqa: E402
from p2pcache.content.storepath import InvalidStorePath, StorePath  # noqa: E402


class Unexpected(Exception):
    pass


# -- mutation ---------------------------------------------------------------------------------------------


def mutate_bytes(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        op = rng.randrange(8)
        n = len(b)
        i = rng.randrange(n + 1)
        if op == 0 and n:  # flip bits in one byte
            b[min(i, n - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # set one byte
            b[min(i, n - 1)] = rng.choice((0, 1, 0x2F, 0x2E, 0x28, 0x29, 0x7F, 0xFF, rng.randrange(256)))
        elif op == 2:  # insert
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.choice((1, 1, 7, 8, 16))))
        elif op == 3 and n:  # delete a range
            del b[i : i + rng.choice((1, 7, 8, 16, 64))]
        elif op == 4 and n:  # duplicate a range
            j = rng.randrange(n)
            b[i:i] = b[j : j + rng.choice((8, 16, 24, 48))]
        elif op == 5:  # truncate
            del b[i:]
        elif op == 6 and n >= 8:  # overwrite an 8-aligned word (NAR lengths) with an interesting value
            k = rng.randrange(n // 8) * 8
            v = rng.choice((0, 1, 7, 8, 9, 13, 255, 256, 4096, 2**31, 2**63, 2**64 - 1, rng.randrange(2**64)))
            b[k : k + 8] = v.to_bytes(8, "little")
        else:  # splice with another seed
            other = rng.choice(seeds)
            j = rng.randrange(len(other) + 1)
            b[i:] = other[j:]
    return bytes(b)


def mutate_text(rng: random.Random, text: str, seeds: list[str], alphabet: str) -> str:
    s = list(text)
    for _ in range(rng.choice((1, 1, 2, 3))):
        op = rng.randrange(6)
        n = len(s)
        i = rng.randrange(n + 1)
        if op == 0 and n:
            s[min(i, n - 1)] = rng.choice(alphabet)
        elif op == 1:
            s[i:i] = [rng.choice(alphabet) for _ in range(rng.choice((1, 1, 2, 5)))]
        elif op == 2 and n:
            del s[i : i + rng.choice((1, 1, 3, 10))]
        elif op == 3 and n:
            j = rng.randrange(n)
            s[i:i] = s[j : j + rng.choice((1, 5, 20))]
        elif op == 4:
            del s[i:]
        else:
            other = rng.choice(seeds)
            j = rng.randrange(len(other) + 1)
            s[i:] = list(other[j:])
    return "".join(s)


# -- seeds ------------------------------------------------------------------------------------------------


def nar_seeds() -> list[bytes]:
    trees = [
        [RegularFile(0)],
        [RegularFile(5, True), Contents(b"hello")],
        [Symlink(b"../target")],
        [DirectoryStart(), DirectoryEnd()],
        [
            DirectoryStart(),
            Entry(b"a"), RegularFile(13), Contents(b"hello, world\n"),
            Entry(b"bin"), DirectoryStart(),
            Entry(b"run"), RegularFile(8, True), Contents(b"#!/bin/s"),
            DirectoryEnd(),
            Entry(b"empty"), DirectoryStart(), DirectoryEnd(),
            Entry(b"link"), Symlink(b"a"),
            Entry(b"z\xff"), RegularFile(0),
            DirectoryEnd(),
        ],
    ]
    return [b"".join(write_nar(t)) for t in trees]


def narinfo_seeds() -> list[str]:
    sig = "cache-1:" + base64.b64encode(bytes(range(64))).decode()
    h = NixHash.of(b"nar")
    return [
        "StorePath: /nix/store/r910wcnq0snrp2gvskmpjqr7b7dwjxpj-withref\n"
        "URL: nar/09zr7g9xaqhdx5zh49s2a95l46i3bby823nqkigql92r7d5sxa21.nar.xz\n"
        "Compression: xz\n"
        "FileHash: sha256:09zr7g9xaqhdx5zh49s2a95l46i3bby823nqkigql92r7d5sxa21\n"
        "FileSize: 176\n"
        "NarHash: sha256:0mvi5yx7kv5m1nfy1hnxgwvg3m484qhn6z377m7wdv4d874fb5k9\n"
        "NarSize: 168\n"
        "References: 3j8r511q8gg85ch41in6l4r4cfqrn0bv-tree r910wcnq0snrp2gvskmpjqr7b7dwjxpj-withref\n"
        "Deriver: d2c2njksdd7c2dr45ryc09zy0jlnj2xv-withref.drv\n"
        f"Sig: {sig}\n",
        "StorePath: /nix/store/3j8r511q8gg85ch41in6l4r4cfqrn0bv-tree\n"
        "URL: nar/x.nar\n"
        f"NarHash: {h.sri()}\n"
        "NarSize: 1232\n"
        "References: \n"
        "System: x86_64-linux\n"
        f"CA: fixed:r:{h.nix32()}\n"
        "X-Unknown: kept\n",
    ]


def hash_seeds() -> list[str]:
    out = []
    for algo in ALGORITHMS:
        h = NixHash.of(b"seed", algo)
        out += [h.nix32(), h.base16(), h.base64(), h.sri()]
    return out


def key_seeds() -> list[str]:
    seed = hashlib.sha256(b"fuzz key").digest()
    sk = SecretKey("fuzz-1", seed)
    return [str(sk), str(sk.public_key()), str(sk.sign("message"))]


STORE_PATH_SEEDS = [
    "/nix/store/3j8r511q8gg85ch41in6l4r4cfqrn0bv-tree",
    "/nix/store/d2c2njksdd7c2dr45ryc09zy0jlnj2xv-withref.drv",
    "/opt/store/00000000000000000000000000000000-a+b-c_d?e=f.g",
]
NIX32_SEEDS = [nixbase32.encode(hashlib.sha256(bytes([i])).digest()[: i + 1]) for i in range(32)]

TEXT_ALPHABET = nixbase32.ALPHABET + "eoutABCXYZ:-+/=._?; \n\t\r\x00é/" + "0123456789"


# -- targets ----------------------------------------------------------------------------------------------


def check_nar(rng: random.Random, data: bytes) -> bool:
    reader = NarReader()
    events = []
    try:
        i = 0
        while i < len(data):  # random piece boundaries exercise the incremental paths
            n = rng.choice((1, 3, 8, 64, 1 << 20))
            events += reader.feed(data[i : i + n])
            i += n
        reader.end()
    except InvalidNar:
        return False
    again = b"".join(write_nar(events))
    if again != data:
        raise Unexpected("accepted a NAR the writer does not reproduce byte for byte")
    return True


def check_narinfo(rng: random.Random, text: str) -> bool:
    try:
        info = NarInfo.parse(text)
    except InvalidNarInfo:
        return False
    if NarInfo.parse(info.render()) != info:
        raise Unexpected("render -> parse changed an accepted narinfo")
    info.fingerprint()
    return True


def check_store_path(rng: random.Random, text: str) -> bool:
    try:
        path = StorePath.parse(text)
    except InvalidStorePath:
        return False
    if str(path) != text or StorePath.parse(str(path)) != path:
        raise Unexpected("an accepted store path does not print back to itself")
    return True


def check_nix32(rng: random.Random, text: str) -> bool:
    nbytes = rng.choice((None, None, rng.randrange(0, 70)))
    try:
        data = nixbase32.decode(text, nbytes)
    except nixbase32.InvalidNixBase32:
        return False
    if nixbase32.encode(data) != text:
        raise Unexpected("an accepted nix-base32 string does not encode back to itself")
    return True


def check_hash(rng: random.Random, text: str) -> bool:
    algo = rng.choice((None, None, "sha256", "sha512"))
    try:
        h = parse_hash(text, algo)
    except InvalidNixHash:
        return False
    if parse_hash(h.nix32()) != h or parse_hash(h.sri()) != h or parse_hash(h.base16()) != h:
        raise Unexpected("an accepted hash does not round-trip through its printed forms")
    return True


def check_key_line(rng: random.Random, text: str) -> bool:
    accepted = False
    for cls in (Signature, PublicKey, SecretKey):
        try:
            value = cls.parse(text)
        except InvalidSignature:
            continue
        accepted = True
        if cls.parse(str(value)) != value:
            raise Unexpected(f"an accepted {cls.__name__} does not print back to itself")
    return accepted


def run(name: str, count: int, rng: random.Random, make: Callable[[], object], check) -> dict:
    accepted = 0
    start = time.perf_counter()
    for n in range(count):
        item = make()
        try:
            accepted += check(rng, item)
        except Unexpected as e:
            print(f"FAIL {name} input #{n}: {e}: {item!r:.2000}", file=sys.stderr)
            raise SystemExit(1)
        except Exception as e:  # noqa: BLE001 - that is the point: nothing else may escape
            print(f"FAIL {name} input #{n}: {type(e).__name__}: {e}: {item!r:.2000}", file=sys.stderr)
            raise SystemExit(1) from e
    return {"parser": name, "inputs": count, "accepted": accepted, "rejected": count - accepted,
            "seconds": round(time.perf_counter() - start, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="about 18,500 inputs instead of about 370,000")
    ap.add_argument("--seed", type=int, default=1, help="random seed (default 1); runs are reproducible")
    args = ap.parse_args(argv)
    scale = 0.05 if args.quick else 1.0
    rng = random.Random(args.seed)

    nars = nar_seeds()
    narinfos = narinfo_seeds()
    hashes = hash_seeds()
    keys = key_seeds()

    def text_maker(seeds: list[str]) -> Callable[[], str]:
        return lambda: mutate_text(rng, rng.choice(seeds), seeds, TEXT_ALPHABET)

    plan = [
        ("nar", 150_000, lambda: mutate_bytes(rng, rng.choice(nars), nars), check_nar),
        ("narinfo", 100_000, text_maker(narinfos), check_narinfo),
        ("storepath", 30_000, text_maker(STORE_PATH_SEEDS), check_store_path),
        ("nixbase32", 30_000, text_maker(NIX32_SEEDS), check_nix32),
        ("nixhash", 30_000, text_maker(hashes), check_hash),
        ("keys-and-signatures", 30_000, text_maker(keys), check_key_line),
    ]
    total = 0
    for name, count, make, check in plan:
        result = run(name, max(1, int(count * scale)), rng, make, check)
        total += result["inputs"]
        print(json.dumps(result), flush=True)
        print(f"{name:>20}: {result['inputs']:>7} inputs, {result['accepted']:>6} accepted, "
              f"{result['rejected']:>7} rejected with the module's own error, {result['seconds']} s", file=sys.stderr)
    print(f"{'total':>20}: {total:>7} inputs, no unexpected exception", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
