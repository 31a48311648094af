"""Hostile swarm members for lookup tests: real libp2p hosts that join a swarm on loopback, announce keys
in its DHT and then misbehave on the resolve protocol.

    python tests/helpers/liar_peers.py WORKDIR BOOTSTRAP_ADDR ALIAS:MODE [ALIAS:MODE ...]

One host per ALIAS:MODE argument (ALIAS is `nix:<hash>`, `sha256:<hex>` or `gateway`, the marker that
upstream gateways announce). MODE is what its resolve handler does:
- `silent`: reads the request and never answers;
- `wrong-path`: answers at once with a NAR narinfo for another store path (or, for an archive, a raw root);
- `bad-manifest`: serves a real archive of its own over bitswap and answers its root — for a Nix path
  with a narinfo that claims a made-up NarHash, for an archive under a hash it does not have.
Prints one JSON line ({"peers": [...]}) once every host has announced, then runs until killed.
"""

import json
import os
import sys
from pathlib import Path

import trio

from p2pcache.content.cid import CID, DAG_CBOR, RAW
from p2pcache.http.nix import GATEWAY_MARKER
from p2pcache.net.bitswap import BitswapExchange, RepoBlockSource
from p2pcache.net.host import HostConfig, NodeHost
from p2pcache.routing import DHT, DHTConfig, NarInfoFields, ResolveAnswer, ResolveServer, dht_key
from p2pcache.store.repo import Repo

OTHER_PATH = "/nix/store/" + "1" * 32 + "-someone-else"
MADE_UP_NAR_HASH = "sha256:" + "ab" * 32


def _lookup(mode: str, root: CID | None):
    async def lookup(alias: str):
        if mode == "silent":
            await trio.sleep_forever()
        nix = alias.startswith("nix:")
        if mode == "wrong-path":
            if not nix:
                return ResolveAnswer(CID.for_block(RAW, b"not a manifest"), "archive", 1)
            return ResolveAnswer(CID.for_block(DAG_CBOR, b"x"), "nar", 1, NarInfoFields(
                store_path=OTHER_PATH, nar_hash=MADE_UP_NAR_HASH, nar_size=1, references=(), deriver="",
                system="", ca="", sigs=()))
        assert mode == "bad-manifest" and root is not None
        if not nix:
            return ResolveAnswer(root, "archive", 65536)
        return ResolveAnswer(root, "nar", 65536, NarInfoFields(
            store_path=f"/nix/store/{alias[4:]}-lie", nar_hash=MADE_UP_NAR_HASH, nar_size=65536, references=(),
            deriver="", system="", ca="", sigs=()))
    return lookup


async def liar(workdir: Path, i: int, bootstrap: str, alias: str, mode: str, ready: trio.MemorySendChannel) -> None:
    host = NodeHost(HostConfig(identity=workdir / f"liar{i}.key", listen=("/ip4/127.0.0.1/tcp/0",)))
    dht = DHT(host, DHTConfig())
    repo = Repo.init(workdir / f"liar{i}-repo")
    root = None
    if mode == "bad-manifest":
        root = repo.add_stream([os.urandom(65536)], name="decoy").root
    ResolveServer(lookup=_lookup(mode, root)).register(host)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        if mode == "bad-manifest":
            await nursery.start(BitswapExchange(host, RepoBlockSource(repo)).run)
        await host.connect(bootstrap)
        await nursery.start(dht.run)
        key = dht_key(str(GATEWAY_MARKER) if alias == "gateway" else alias)
        for _ in range(50):
            if await dht.provide_key(key):
                break
            await trio.sleep(0.1)
        await ready.send(host.peer_id.to_base58())


async def main(workdir: Path, bootstrap: str, specs: list[str]) -> None:
    send, recv = trio.open_memory_channel(len(specs))
    async with trio.open_nursery() as nursery:
        for i, spec in enumerate(specs):
            alias, mode = spec.rsplit(":", 1)
            # announce one after another, in the order given: the first announced is the first listed
            nursery.start_soon(liar, workdir, i, bootstrap, alias, mode, send)
            peer = await recv.receive()
            print(json.dumps({"announced": peer, "spec": spec}), file=sys.stderr, flush=True)
        print(json.dumps({"peers": len(specs)}), flush=True)


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
