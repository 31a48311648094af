"""A libp2p peer that connects to a daemon and speaks garbage bitswap: malformed protobuf, then a frame
announcing a 100 MiB message. Prints JSON: whether the daemon dropped us after each.

Usage: python tests/helpers/garbage_peer.py <daemon multiaddr> <workdir> [empty | wants]

With `empty`, instead: 4 MiB of empty bitswap frames (each a zero length prefix, a message that carries
nothing); prints whether the daemon dropped us and how many bytes it took. With `wants`: 100,000 wants
for blocks nobody has."""

import json
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from p2pcache.exchange.message import PROTOCOL_1_2_0
from p2pcache.net.host import HostConfig, NodeHost, parse_peer_addr


@asynccontextmanager
async def bitswap_stream(target: str, key_file: Path):
    """A fresh identity (the daemon bans a peer that broke the protocol) connected to `target`, with a
    bitswap stream open: yields (host, the daemon's peer ID, the stream)."""
    host = NodeHost(HostConfig(identity=key_file, listen=("/ip4/127.0.0.1/tcp/0",)))
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        peer = await host.connect(target)
        yield host, parse_peer_addr(target).peer_id, await host.new_stream(peer, [PROTOCOL_1_2_0])
        nursery.cancel_scope.cancel()


async def dropped_within(host, peer, seconds: float = 10) -> bool:
    with trio.move_on_after(seconds):
        while host.is_connected(peer):
            await trio.sleep(0.05)
        return True
    return False


async def attack_once(target: str, key_file: Path, payload: bytes) -> bool:
    """Send `payload` on a bitswap stream and report whether the daemon dropped us within 10 s."""
    async with bitswap_stream(target, key_file) as (host, peer, stream):
        try:
            await stream.write(payload)
            return await dropped_within(host, peer)
        except Exception:
            return True


async def attack(target: str, workdir: Path) -> dict:
    return {
        "malformed": await attack_once(target, workdir / "garbage1.key", b"\x05\xff\xff\xff\xff\xff"),
        # a uvarint length of 100 MiB: over the 4 MiB message limit before a byte of it arrives
        "oversized": await attack_once(target, workdir / "garbage2.key", b"\x80\x80\x80\x32" + b"\0" * 1024),
    }


async def flood_empty(target: str, workdir: Path) -> dict:
    sent = 0
    dropped = False
    async with bitswap_stream(target, workdir / "garbage-empty.key") as (host, peer, stream):
        start = trio.current_time()
        try:
            while sent < 4 << 20 and host.is_connected(peer):
                await stream.write(b"\0" * (64 << 10))
                sent += 64 << 10
            dropped = await dropped_within(host, peer)
        except Exception:
            dropped = True
        took = trio.current_time() - start
    return {"dropped": dropped, "sent": sent, "seconds": round(took, 3)}


async def many_wants(target: str, workdir: Path) -> dict:
    """100,000 wants for blocks nobody has, in messages under the size limit."""
    import hashlib

    from p2pcache.content.cid import CID, RAW
    from p2pcache.exchange import Message, WantEntry, WantType, encode_framed

    sent = 0
    async with bitswap_stream(target, workdir / "garbage-wants.key") as (host, peer, stream):
        try:
            while sent < 100_000:
                batch = [WantEntry(CID.for_block(RAW, hashlib.sha256(b"%d" % (sent + i)).digest()), WantType.BLOCK,
                                   send_dont_have=True) for i in range(20_000)]
                await stream.write(encode_framed(Message(wants=tuple(batch))))
                sent += len(batch)
            await trio.sleep(1)  # let the node work through them
        except Exception:
            pass
    return {"sent_wants": sent}


if __name__ == "__main__":
    if sys.argv[3:] == ["wants"]:
        print(json.dumps(trio.run(many_wants, sys.argv[1], Path(sys.argv[2]))))
    elif sys.argv[3:] == ["empty"]:
        print(json.dumps(trio.run(flood_empty, sys.argv[1], Path(sys.argv[2]))))
    else:
        print(json.dumps(trio.run(attack, sys.argv[1], Path(sys.argv[2]))))
