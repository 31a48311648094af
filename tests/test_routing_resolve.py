"""The resolve protocol: pure message tests (framing, limits, validation), then two real hosts on loopback."""

from contextlib import asynccontextmanager

import pytest
import trio
from libp2p.network.stream.exceptions import StreamEOF, StreamReset

from p2pcache.content.cid import CID, DAG_CBOR
from p2pcache.net.host import HostConfig, NodeHost
from p2pcache.routing import (
    RESOLVE_PROTOCOL,
    NarInfoFields,
    ResolveAnswer,
    ResolveProtocolError,
    ResolveServer,
    ResolveUnavailable,
    RoutingUsageError,
    resolve,
)
from p2pcache.routing.pb import p2pcache_pb2 as pb
from p2pcache.routing.resolve_wire import (
    MAX_KEY,
    MAX_REFERENCES,
    MAX_REQUEST,
    MAX_RESPONSE,
    MAX_ROOT_BLOCK,
    FrameReader,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    frame,
)

ROOT = CID.for_block(DAG_CBOR, b"manifest")
ARCHIVE = ResolveAnswer(ROOT, "archive", 123456)
NAR = ResolveAnswer(
    CID.for_block(DAG_CBOR, b"nar manifest"), "nar", 4096,
    NarInfoFields(
        store_path="/nix/store/7h5mcfhx2cmdddb8lgg8z16p0w3zmxp5-hello-2.12",
        nar_hash="sha256:1yqy9ds0p8sfmxrl8whpbs9kkyvqmsl7zmn8j2fikkm4k94qy5zl",
        nar_size=4096,
        references=("7h5mcfhx2cmdddb8lgg8z16p0w3zmxp5-hello-2.12", "9krlzvny65gdc8s7kpb6lkx8cd02c25b-glibc-2.37"),
        deriver="b2wbm2l2b6c6fkgnh9xbbhyxyl5sd2v6-hello-2.12.drv",
        system="x86_64-linux",
        ca="",
        sigs=("cache.example-1:" + "A" * 86 + "==",),
    ),
)


def read_one(data: bytes, limit: int) -> bytes:
    payload = FrameReader(limit).feed(data)
    assert payload is not None
    return payload


# -- messages ------------------------------------------------------------------------------------


@pytest.mark.parametrize("alias", ["sha256:" + "ab" * 32, str(ROOT), "nix:7h5mcfhx2cmdddb8lgg8z16p0w3zmxp5",
                                   "blake3:some-future-kind"])
def test_request_roundtrip(alias):
    assert decode_request(read_one(encode_request(alias), MAX_REQUEST)) == alias


@pytest.mark.parametrize("answer", [ARCHIVE, NAR, None])
def test_response_roundtrip(answer):
    assert decode_response(read_one(encode_response(answer), MAX_RESPONSE)) == answer


def test_a_root_block_goes_with_the_answer_unless_it_would_not_fit():
    """The manifest root's bytes ride in the answer (the asker needs no round trip to fetch them), checked only
    for size here: the asker verifies them against the root. Where the answer would then pass MAX_RESPONSE (a
    NAR with thousands of references) the hint is left out and the answer still goes."""
    block = b"m" * MAX_ROOT_BLOCK
    with_block = ResolveAnswer(NAR.root, "nar", NAR.size, NAR.narinfo, block)
    assert decode_response(read_one(encode_response(with_block), MAX_RESPONSE)) == with_block
    assert decode_response(read_one(encode_response(NAR), MAX_RESPONSE)).root_block is None
    assert NAR.narinfo is not None
    many = NarInfoFields(NAR.narinfo.store_path, NAR.narinfo.nar_hash, 1, ("r" * 60,) * 5000)
    crowded = decode_response(read_one(encode_response(ResolveAnswer(NAR.root, "nar", 1, many, block)), MAX_RESPONSE))
    assert crowded == ResolveAnswer(NAR.root, "nar", 1, many)
    with pytest.raises(RoutingUsageError):
        encode_response(ResolveAnswer(NAR.root, "nar", 1, None, block + b"x"))
    with pytest.raises(ResolveProtocolError, match="root block of"):
        decode_response(bad_response(root_block=block + b"x"))
    with pytest.raises(ResolveProtocolError, match="says 'not found' but carries"):
        decode_response(pb.ResolveResponse(found=False, root_block=b"x").SerializeToString())


def test_frames_reassemble_byte_by_byte():
    data = encode_response(NAR)
    reader = FrameReader(MAX_RESPONSE)
    results = [reader.feed(data[i:i + 1]) for i in range(len(data))]
    assert results[:-1] == [None] * (len(data) - 1)
    assert decode_response(results[-1]) == NAR
    reader.eof()  # a whole message arrived: fine


def test_oversized_length_is_refused_before_the_payload():
    reader = FrameReader(MAX_REQUEST, "request")
    with pytest.raises(ResolveProtocolError, match="over the 1024-byte limit"):
        reader.feed(bytes([0x81, 0x08]))  # 1025, nothing of the payload sent yet


@pytest.mark.parametrize("data, match", [
    (b"\xff" * 10, "overlong length prefix"),
    (b"\x80\x00", "non-minimal length prefix"),
    (frame(b"\x0a\x01a") + b"junk", "bytes after the message"),
])
def test_bad_frames(data, match):
    with pytest.raises(ResolveProtocolError, match=match):
        FrameReader(MAX_REQUEST).feed(data)


def test_stream_ending_mid_message_is_a_violation():
    reader = FrameReader(MAX_REQUEST)
    assert reader.feed(frame(b"\x0a\x05hello")[:4]) is None
    with pytest.raises(ResolveProtocolError, match="stream ended"):
        reader.eof()


@pytest.mark.parametrize("payload, match", [
    (b"", "empty key"),
    (pb.ResolveRequest(key="a\nb").SerializeToString(), "control characters"),
    (pb.ResolveRequest(key="k" * (MAX_KEY + 1)).SerializeToString(), "over the 512-byte limit"),
    (b"\x0a\x05ab", "not a valid ResolveRequest"),
    (b"\x0a\x02\xff\xfe", "not a valid ResolveRequest"),  # a string field that is not UTF-8
    (b"x" * (MAX_REQUEST + 1), "over the 1024-byte limit"),
])
def test_bad_requests(payload, match):
    with pytest.raises(ResolveProtocolError, match=match):
        decode_request(payload)


def bad_response(**fields) -> bytes:
    msg = pb.ResolveResponse(found=True, root=ROOT.buffer, kind="archive", size=1)
    narinfo = fields.pop("narinfo", None)
    for k, v in fields.items():
        setattr(msg, k, v)
    if narinfo is not None:
        msg.narinfo.CopyFrom(narinfo)
    return msg.SerializeToString()


@pytest.mark.parametrize("payload, match", [
    (bad_response(root=b"\x01\x71\x12\x20short"), "root is not a binary CID"),
    (bad_response(root=b""), "root is not a binary CID"),
    (bad_response(kind="tarball"), "kind 'tarball' is not one of"),
    (bad_response(narinfo=pb.NarInfo(store_path="/nix/store/x", nar_hash="sha256:y")), "only a 'nar' has them"),
    (bad_response(kind="nar", narinfo=pb.NarInfo(store_path="/nix/store/x")), "nar_hash is empty"),
    (bad_response(kind="nar", narinfo=pb.NarInfo(store_path="/nix/store/x", nar_hash="h", system="a\nb")),
     "line break"),
    (bad_response(kind="nar", narinfo=pb.NarInfo(store_path="/x", nar_hash="h", references=["r"] * (MAX_REFERENCES + 1))),
     "references, over the limit"),
    (pb.ResolveResponse(found=False, kind="archive").SerializeToString(), "says 'not found' but carries"),
    (b"\x12\xff", "not a valid ResolveResponse"),
    (b"\x00" * (MAX_RESPONSE + 1), "over the 524288-byte limit"),
])
def test_bad_responses(payload, match):
    with pytest.raises(ResolveProtocolError, match=match):
        decode_response(payload)


def test_encoding_what_the_protocol_forbids_is_our_bug():
    with pytest.raises(RoutingUsageError):
        encode_response(ResolveAnswer(ROOT, "tarball", 1))
    with pytest.raises(RoutingUsageError):
        encode_request("")
    with pytest.raises(RoutingUsageError):
        encode_response(ResolveAnswer(ROOT, "nar", 1, NarInfoFields("/nix/store/x", "h", 1, ("r" * 60,) * 9000)))


# -- over libp2p ---------------------------------------------------------------------------------

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


@asynccontextmanager
async def two_hosts(tmp_path):
    async with trio.open_nursery() as nursery:
        a = await nursery.start(NodeHost(HostConfig(identity=tmp_path / "a.key", listen=LOOPBACK)).run)
        b = await nursery.start(NodeHost(HostConfig(identity=tmp_path / "b.key", listen=LOOPBACK)).run)
        await a.connect(b.addrs()[0])
        yield a, b
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_resolve_over_loopback(tmp_path):
    table = {"sha256:" + "ab" * 32: ARCHIVE, "nix:7h5mcfhx2cmdddb8lgg8z16p0w3zmxp5": NAR}
    async with two_hosts(tmp_path) as (a, b):
        server = ResolveServer(table.get)
        server.register(b)
        with trio.fail_after(10):
            assert await resolve(a, b.peer_id, "sha256:" + "ab" * 32) == ARCHIVE
            assert await resolve(a, b.peer_id, "nix:7h5mcfhx2cmdddb8lgg8z16p0w3zmxp5") == NAR
            assert await resolve(a, b.peer_id, "sha256:" + "cd" * 32) is None
        assert (server.stats.requests, server.stats.found, server.stats.not_found) == (3, 2, 1)


@pytest.mark.trio
async def test_async_lookup_is_awaited(tmp_path):
    async def lookup(alias):
        await trio.sleep(0)
        return ARCHIVE if alias == str(ROOT) else None

    async with two_hosts(tmp_path) as (a, b):
        ResolveServer(lookup).register(b)
        with trio.fail_after(10):
            assert await resolve(a, b.peer_id, str(ROOT)) == ARCHIVE


@pytest.mark.trio
async def test_server_resets_a_misbehaving_client(tmp_path):
    async with two_hosts(tmp_path) as (a, b):
        server = ResolveServer(lambda alias: ARCHIVE)
        server.register(b)
        with trio.fail_after(10):
            stream = await a.new_stream(b.peer_id, [RESOLVE_PROTOCOL])
            await stream.write(bytes([0x80, 0x80, 0x04]))  # claims a 64 KiB request
            with pytest.raises((StreamReset, StreamEOF)):  # py-libp2p's Yamux shows a reset as EOF; never an answer
                await stream.read(100)
            # a well-behaved client on the same connection is still served
            assert await resolve(a, b.peer_id, str(ROOT)) == ARCHIVE
        assert server.stats.violations == 1
        assert server.stats.requests == 1


@pytest.mark.trio
async def test_client_refuses_a_malformed_answer(tmp_path):
    async def liar(stream):
        await stream.read(1024)
        bad = pb.ResolveResponse(found=True, root=b"not a cid", kind="archive", size=1).SerializeToString()
        await stream.write(frame(bad))
        await stream.close()

    async with two_hosts(tmp_path) as (a, b):
        b.set_stream_handler(RESOLVE_PROTOCOL, liar)
        with trio.fail_after(10), pytest.raises(ResolveProtocolError, match="root is not a binary CID"):
            await resolve(a, b.peer_id, str(ROOT))


@pytest.mark.trio
async def test_oversized_answer_is_refused_without_reading_it(tmp_path):
    async def flood(stream):
        await stream.read(1024)
        await stream.write(bytes([0x80, 0x80, 0x80, 0x01]))  # 2 MiB announced
        await stream.write(b"\x00" * 65536)
        await trio.sleep(5)

    async with two_hosts(tmp_path) as (a, b):
        b.set_stream_handler(RESOLVE_PROTOCOL, flood)
        with trio.fail_after(10), pytest.raises(ResolveProtocolError, match="over the 524288-byte limit"):
            await resolve(a, b.peer_id, str(ROOT))


@pytest.mark.trio
async def test_silent_or_absent_peers_are_unavailable_within_the_timeout(tmp_path):
    async def silent(stream):
        await trio.sleep(30)

    async with two_hosts(tmp_path) as (a, b):
        with trio.fail_after(10), pytest.raises(ResolveUnavailable):  # b does not speak resolve at all
            await resolve(a, b.peer_id, str(ROOT), timeout=5)
        b.set_stream_handler(RESOLVE_PROTOCOL, silent)
        with trio.fail_after(10), pytest.raises(ResolveUnavailable, match="did not answer"):
            await resolve(a, b.peer_id, str(ROOT), timeout=0.5)
