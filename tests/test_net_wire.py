"""Our Noise transport messages and Yamux (`net.wire`) over an in-memory pipe, with a real Noise XX handshake
(py-libp2p's, real ed25519 identities and x25519 keys) in front: streams arrive whole and in order, a forged
or cut Noise message delivers nothing and resets every stream, the receive window bounds a writer whose
reader does not read, a peer that floods pings or SYNs and does not read the answers cannot grow what waits
for it, and py-libp2p's own Noise + Yamux on the other end interoperates."""

from __future__ import annotations

import hashlib
import logging
import os
import random
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519
from libp2p.peer.id import ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.exceptions import MuxedStreamEOF, MuxedStreamReset
from libp2p.stream_muxer.yamux.yamux import Yamux

from p2pcache.net.wire import (
    FLAG_ACK,
    FLAG_RST,
    FLAG_SYN,
    HEADER_SIZE,
    KEEPALIVE_INTERVAL,
    KEEPALIVE_TIMEOUT,
    MAX_CONTROL_BACKLOG,
    MAX_INBOUND_STREAMS,
    MAX_PENDING_PONGS,
    STREAM_WINDOW,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    FramedNoiseTransport,
    YamuxConnection,
    _HEADER,
)

MiB = 1 << 20


class Pipe:
    """One end of an in-memory byte pipe with the read(n)/write a py-libp2p raw connection has."""

    def __init__(self, stream, initiator: bool) -> None:
        self.stream, self.is_initiator = stream, initiator
        self.buf = b""

    async def read(self, n=None):
        if not self.buf:
            try:
                self.buf = await self.stream.receive_some(1 << 18)
            except trio.ClosedResourceError:
                return b""
        n = len(self.buf) if n is None or n < 0 else n
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    async def write(self, data):
        await self.stream.send_all(data)

    async def close(self):
        await self.stream.aclose()

    def get_remote_address(self):
        return None


def _transport(ours: bool):
    pair = create_new_key_pair()
    noise = (FramedNoiseTransport(pair, new_x25519().private_key) if ours
             else NoiseTransport(pair, noise_privkey=new_x25519().private_key))
    return noise, ID.from_pubkey(pair.public_key)


async def handshake(a_pipe: Pipe, b_pipe: Pipe, a_ours: bool = True, b_ours: bool = True):
    """A real Noise XX handshake over the pipe (a dials b); returns (a's secured conn, b's, a's id, b's id)."""
    (a_noise, a_id), (b_noise, b_id) = _transport(a_ours), _transport(b_ours)
    secured = {}

    async def dial():
        secured["a"] = await a_noise.secure_outbound(a_pipe, b_id)

    async def listen():
        secured["b"] = await b_noise.secure_inbound(b_pipe)

    async with trio.open_nursery() as n:
        n.start_soon(dial)
        n.start_soon(listen)
    assert secured["a"].get_remote_peer() == b_id and secured["b"].get_remote_peer() == a_id
    return secured["a"], secured["b"], a_id, b_id


@asynccontextmanager
async def connected(a_ours: bool = True, b_ours: bool = True):
    """Two muxed connections over one memory pipe (a dials b); yields (a, b, a's raw pipe end)."""
    left, right = trio.testing.memory_stream_pair()
    a_pipe, b_pipe = Pipe(left, True), Pipe(right, False)
    a_conn, b_conn, a_id, b_id = await handshake(a_pipe, b_pipe, a_ours, b_ours)

    def mux(conn, peer, ours, initiator):
        return YamuxConnection(conn, peer, initiator) if ours else Yamux(conn, peer, is_initiator=initiator)

    a = mux(a_conn, b_id, a_ours, True)
    b = mux(b_conn, a_id, b_ours, False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.start)
        nursery.start_soon(b.start)
        await a.event_started.wait()
        await b.event_started.wait()
        yield a, b, a_pipe
        nursery.cancel_scope.cancel()


async def read_all(stream) -> bytes:
    out = bytearray()
    while True:
        try:
            out += await stream.read(random.choice((None, 1000, 65536, 1 << 20)))
        except MuxedStreamEOF:
            return bytes(out)


@pytest.mark.trio
@pytest.mark.parametrize("ours", [(True, True), (True, False), (False, True)], ids=["ours", "ours-stock", "stock-ours"])
async def test_concurrent_streams_arrive_whole_and_in_order(ours):
    """20 streams at once, each way, writes of 0 B to 3 MiB in pieces of every size: every stream's bytes
    arrive whole and in order on the other end. Against py-libp2p's own Noise + Yamux too, each way."""
    rng = random.Random(7)
    payloads = [os.urandom(rng.choice((0, 1, 12, 65507, 65508, 200_000, 1_000_000, 3 * MiB))) for _ in range(20)]
    got: dict[int, bytes] = {}
    async with connected(*ours) as (a, b, _):

        async def serve(stream):
            data = await read_all(stream)
            got[len(got)] = data
            await stream.write(hashlib.sha256(data).digest())  # an answer after the peer's FIN
            await stream.close()

        async def accept():
            async with trio.open_nursery() as n:
                for _ in payloads:
                    n.start_soon(serve, await b.accept_stream())

        async def send(data):
            s = await a.open_stream()
            view, pos = memoryview(data), 0
            while pos < len(data):
                step = rng.choice((1, 100, 65536, 300_000, 2 * MiB))
                await s.write(bytes(view[pos:pos + step]))
                pos += step
            await s.close()
            assert await read_all(s) == hashlib.sha256(data).digest()

        with trio.fail_after(60):
            async with trio.open_nursery() as n:
                n.start_soon(accept)
                for p in payloads:
                    n.start_soon(send, p)
    assert sorted(got.values()) == sorted(payloads)


@pytest.mark.trio
async def test_a_forged_noise_message_resets_every_stream_and_delivers_nothing(caplog):
    async with connected() as (a, b, a_pipe):
        s = await a.open_stream()
        await s.write(b"first")
        t = await b.accept_stream()
        assert await t.read() == b"first"
        # a message of the right shape that nobody with the key made, then a real one behind it
        await a_pipe.write(len(os.urandom(40)).to_bytes(2, "big") + os.urandom(40))
        with caplog.at_level(logging.WARNING, logger="p2pcache.net.wire"):
            await s.write(b"after the forgery")
            with trio.fail_after(10), pytest.raises(MuxedStreamReset):
                await t.read()
            await b.event_closed.wait()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "p2pcache.net.wire"]
    assert len(warnings) == 1 and "does not authenticate" in warnings[0].getMessage()


@pytest.mark.trio
async def test_a_connection_cut_inside_a_noise_message_is_refused_not_an_end(caplog):
    async with connected() as (a, b, a_pipe):
        s = await a.open_stream()
        await s.write(b"x" * 1000)
        t = await b.accept_stream()
        assert await t.read(1000) == b"x" * 1000
        # the start of a message (its length says 1,000 bytes), then the pipe closes
        with caplog.at_level(logging.WARNING, logger="p2pcache.net.wire"):
            await a_pipe.write((1000).to_bytes(2, "big") + os.urandom(300))
            await a_pipe.stream.aclose()
            with trio.fail_after(10), pytest.raises(MuxedStreamReset):
                await t.read()
    assert any("ended inside a Noise message" in r.getMessage() for r in caplog.records)


@pytest.mark.trio
async def test_a_reader_that_does_not_read_bounds_what_the_writer_sends_to_its_window():
    async with connected() as (a, b, _):
        s = await a.open_stream()
        sent = 0

        async def writer():
            nonlocal sent
            for _ in range(64):
                await s.write(bytes(128 << 10))
                sent += 128 << 10
            await s.close()

        async with trio.open_nursery() as n:
            n.start_soon(writer)
            t = await b.accept_stream()
            await trio.testing.wait_all_tasks_blocked()
            assert STREAM_WINDOW - (128 << 10) <= sent <= STREAM_WINDOW  # the writer waits on the window
            assert t._buffered == sent
            with trio.fail_after(30):
                assert len(await read_all(t)) == 8 * MiB  # reading lets it all through


@pytest.mark.trio
async def test_reset_fin_and_goaway_as_the_spec_says():
    async with connected() as (a, b, _):
        s = await a.open_stream()
        await s.write(b"hello")
        t = await b.accept_stream()
        await t.reset()
        with trio.fail_after(10):
            while s.reset_by is None:
                await trio.sleep(0.001)
        with pytest.raises(MuxedStreamReset):
            await s.write(b"more")
        # a half-closed stream still carries the answer
        s2 = await a.open_stream()
        await s2.write(b"ask")
        await s2.close()
        t2 = await b.accept_stream()
        assert await read_all(t2) == b"ask"
        await t2.write(b"answer")
        await t2.close()
        assert await read_all(s2) == b"answer"
        assert not a.streams and not b.streams
        # GoAway: the peer opens no more streams here, and the connection ends
        await b.close()
        with trio.fail_after(10):
            await a.event_closed.wait()
        with pytest.raises(Exception):
            await a.open_stream()


@asynccontextmanager
async def hostile_peer():
    """Our YamuxConnection (the listener) and, on the other end of a lockstep pipe (a write waits until the
    other side reads it), a peer that finishes the Noise handshake and then writes yamux frames of its own
    making and reads only when told. Yields (ours, the peer's NoiseSession)."""
    left, right = trio.testing.lockstep_stream_pair()
    peer_conn, our_conn, peer_id, _ = await handshake(Pipe(left, True), Pipe(right, False))
    ours = YamuxConnection(our_conn, peer_id, False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ours.start)
        await ours.event_started.wait()
        yield ours, peer_conn
        nursery.cancel_scope.cancel()


async def send_frames(session, frames: list[bytes]) -> None:
    for i in range(0, len(frames), 4000):  # 4,000 frames of 12 bytes fit one Noise message
        await session.send_sealed(session.seal([tuple(frames[i:i + 4000])]))


async def frames_read(session, seconds: float) -> list[tuple[int, int, int, int]]:
    """(type, flags, stream id, length) of every frame the peer reads within `seconds`."""
    out, carry = [], b""
    with trio.move_on_after(seconds):
        while True:
            for message in await session.receive_messages():
                data, carry = carry + message, b""
                pos = 0
                while len(data) - pos >= HEADER_SIZE:
                    _, typ, flags, sid, length = _HEADER.unpack_from(data, pos)
                    pos += HEADER_SIZE + (length if typ == 0 else 0)
                    out.append((typ, flags, sid, length))
                carry = data[pos:]
    return out


@pytest.mark.trio
async def test_a_peer_flooding_pings_without_reading_gets_a_bounded_number_of_answers():
    """20,000 pings from a peer that does not read: at most two batches of MAX_PENDING_PONGS answers ever
    wait (one in the stalled write, one queued behind it); the rest go unanswered, and the connection
    still carries streams once the peer reads again."""
    async with hostile_peer() as (ours, peer):
        with trio.fail_after(30):
            await send_frames(peer, [_HEADER.pack(0, TYPE_PING, FLAG_SYN, 0, i) for i in range(20_000)])
            await trio.testing.wait_all_tasks_blocked()
            assert len(ours._control) <= MAX_PENDING_PONGS
            assert ours.pings_unanswered >= 20_000 - 2 * MAX_PENDING_PONGS
            got = await frames_read(peer, 2)
        pongs = [f for f in got if f[0] == TYPE_PING and f[1] & FLAG_ACK]
        assert MAX_PENDING_PONGS <= len(pongs) <= 2 * MAX_PENDING_PONGS
        assert ours.is_established
        # the peer opens a stream and our side takes it: the connection still works
        await send_frames(peer, [_HEADER.pack(0, TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0)])
        with trio.fail_after(10):
            stream = await ours.accept_stream()
        assert stream.stream_id == 1


@pytest.mark.trio
async def test_a_peer_flooding_syns_without_reading_is_disconnected_with_one_line(caplog):
    """10,000 new streams from a peer that does not read: the first ACCEPT_BACKLOG wait to be taken, the
    rest are refused (RST), and once MAX_CONTROL_BACKLOG answers wait for it the connection closes with
    one warning, instead of queueing an answer per SYN until the write timeout."""
    with caplog.at_level(logging.INFO, logger="p2pcache.net.wire"):
        async with hostile_peer() as (ours, peer):
            syns = [_HEADER.pack(0, TYPE_WINDOW_UPDATE, FLAG_SYN, 2 * i + 1, 0) for i in range(10_000)]
            with trio.fail_after(30):
                await send_frames(peer, syns)
                await ours.event_closed.wait()
            assert len(ours._control) == 0 and ours.streams_refused < 10_000
    lines = [r.getMessage() for r in caplog.records if r.name == "p2pcache.net.wire"]
    assert sum("control frames wait to go out" in line for line in lines) == 1, lines
    assert sum("refusing streams" in line for line in lines) == 1, lines
    assert f"{MAX_CONTROL_BACKLOG} control frames" in " ".join(lines)


async def open_streams(session, numbers) -> None:
    """SYNs for the peer's streams 2n + 1, 50 to a message, each message taken in by our side (and its
    streams by its taker) before the next goes."""
    sids = [2 * i + 1 for i in numbers]
    for i in range(0, len(sids), 50):
        await send_frames(session, [_HEADER.pack(0, TYPE_WINDOW_UPDATE, FLAG_SYN, sid, 0) for sid in sids[i:i + 50]])
        await trio.testing.wait_all_tasks_blocked()


@pytest.mark.trio
async def test_a_peer_gets_at_most_max_inbound_streams_open_at_once():
    """A peer opens 600 streams and keeps them open; our side takes every one it is given. The first
    MAX_INBOUND_STREAMS are acknowledged, the rest refused (RST); once our side resets ten of them, ten new
    ones are taken again."""
    async with hostile_peer() as (ours, peer):
        taken = []

        async def take():
            while True:
                taken.append(await ours.accept_stream())

        async with trio.open_nursery() as n:
            n.start_soon(take)
            with trio.fail_after(30):
                await open_streams(peer, range(600))
                got = await frames_read(peer, 3)
            acked = {sid for typ, flags, sid, _ in got if flags & FLAG_ACK}
            refused = {sid for typ, flags, sid, _ in got if flags & FLAG_RST}
            assert len(acked) == MAX_INBOUND_STREAMS == len(taken)
            assert refused == {2 * i + 1 for i in range(MAX_INBOUND_STREAMS, 600)}
            for stream in taken[:10]:
                await stream.reset()
            with trio.fail_after(30):
                await open_streams(peer, range(600, 620))
                got = await frames_read(peer, 3)
            acked = {sid for typ, flags, sid, _ in got if flags & FLAG_ACK and sid >= 1201}
            assert len(acked) == 10 and len(taken) == MAX_INBOUND_STREAMS + 10
            n.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_silent_peer_is_pinged_then_disconnected_and_a_live_idle_one_is_kept(autojump_clock, caplog):
    """Virtual time. A peer that says nothing and reads nothing after the handshake (a runner torn down under
    its socket): one keepalive ping after KEEPALIVE_INTERVAL, the connection closed KEEPALIVE_TIMEOUT later with
    one warning. Two live ends idle for ten intervals answer each other's pings and stay connected, and so
    does py-libp2p's own Yamux on the other end."""
    with caplog.at_level(logging.WARNING, logger="p2pcache.net.wire"):
        async with hostile_peer() as (ours, peer):
            t0 = trio.current_time()
            with trio.fail_after(KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT + 5):
                await ours.event_closed.wait()
            assert trio.current_time() - t0 >= KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT
    lines = [r.getMessage() for r in caplog.records if r.name == "p2pcache.net.wire"]
    assert len(lines) == 1 and "keepalive ping unanswered" in lines[0], lines
    for ends in ((True, True), (True, False)):  # and against py-libp2p's own Noise + Yamux
        async with connected(*ends) as (a, b, _):
            await trio.sleep(10 * KEEPALIVE_INTERVAL)
            assert a.pings_sent >= 5 and a.pongs_received >= a.pings_sent - 1
            assert a.is_established and not b.is_closed
            s = await a.open_stream()
            await s.write(b"still here")
            t = await b.accept_stream()
            assert await t.read() == b"still here"


def test_xor_in_place_is_the_same_keystream_as_xor():
    from p2pcache.net.pnet import PycryptodomeXSalsa20, SodiumXSalsa20, _SODIUM

    key, nonce = os.urandom(32), os.urandom(24)
    data = os.urandom(5000)
    for impl in ([PycryptodomeXSalsa20] + ([SodiumXSalsa20] if _SODIUM is not None else [])):
        whole = impl(key, nonce).xor(data)
        ks, buf, pos = impl(key, nonce), bytearray(b"\0" * 7 + data + b"\0" * 7), 7
        for cut in (1, 30, 63, 64, 65, 1000, 5000):
            end = min(7 + len(data), pos + cut)
            ks.xor_in_place(buf, pos, end)
            pos = end
        assert bytes(buf[7:-7]) == bytes(whole)
