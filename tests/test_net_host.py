"""The libp2p host: real py-libp2p hosts on loopback (TCP + Noise + Yamux), private networks, allowlist."""

import hashlib
import os
import stat
from contextlib import asynccontextmanager

import nacl.bindings
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcache.errors import InvalidKey
from p2pcache.net.host import (HostConfig, HostError, NodeHost, PeerEvent, load_identity, new_swarm_key_file, open_host,
                               select_protocol)
from p2pcache.net import pnet
from p2pcache.net.pnet import format_swarm_key, hsalsa20, parse_swarm_key, read_swarm_key, xsalsa20

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


def cfg(tmp_path, name, **kw):
    kw.setdefault("listen", LOOPBACK)
    kw.setdefault("handshake_timeout", 2.0)
    return HostConfig(identity=tmp_path / f"{name}.key", **kw)


async def echo(stream):
    data = await stream.read(1024)
    await stream.write(data[::-1])
    await stream.close()


async def roundtrip(a: NodeHost, b: NodeHost) -> bytes:
    b.set_stream_handler("/test/echo/1", echo)
    s = await a.new_stream(b.peer_id, ["/test/echo/1"])
    await s.write(b"hello")
    return await s.read(1024)


# -- pnet primitives -----------------------------------------------------------------------------


XSALSA20_IMPLEMENTATIONS = [pnet.PycryptodomeXSalsa20, pnet.SodiumXSalsa20]


@pytest.mark.parametrize("impl", XSALSA20_IMPLEMENTATIONS, ids=lambda c: c.__name__)
def test_xsalsa20_matches_libsodium_secretbox(impl):
    # secretbox is XSalsa20-Poly1305: ciphertext[16:] is the message XOR keystream[32:] (PyNaCl's own libsodium)
    key, nonce, msg = os.urandom(32), os.urandom(24), os.urandom(3000)
    boxed = nacl.bindings.crypto_secretbox(msg, nonce, key)
    stream = impl(key, nonce).xor(bytes(32 + len(msg)))
    assert bytes(m ^ k for m, k in zip(msg, stream[32:])) == boxed[16:]


@pytest.mark.parametrize("impl", XSALSA20_IMPLEMENTATIONS, ids=lambda c: c.__name__)
def test_xsalsa20_known_answers(impl):
    # NaCl's tests/stream3.c and tests/stream.c (crypto_stream_xsalsa20): the first 32 bytes, and the
    # sha256 of the first 4 MiB, of the keystream for this key and nonce
    key = bytes.fromhex("1b27556473e985d462cd51197a9a46c76009549eac6474f206c4ee0844f68389")
    nonce = bytes.fromhex("69696ee955b62b73cd62bda875fc73d68219e0036b7a0b37")
    assert bytes(impl(key, nonce).xor(bytes(32))).hex() == \
        "eea6a7251c1e72916d11c2cb214d3c252539121d8e234e652d651fa4c8cff880"
    assert hashlib.sha256(impl(key, nonce).xor(bytes(4 << 20))).hexdigest() == \
        "662b9d0e3463029156069b12f918691a98f7dfb2ca0393c96bbfc6b1fbd630a2"


def test_the_system_libsodium_is_what_pnet_uses():
    # scripts/install-system-deps.sh installs libsodium23; without it pnet falls back to pycryptodome (slower)
    assert isinstance(xsalsa20(os.urandom(32), os.urandom(24)), pnet.SodiumXSalsa20)


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(0, 3000), max_size=40), into=st.booleans(), slack=st.integers(0, 70))
def test_libsodium_keystream_carries_across_calls_as_the_old_cipher_does(cuts, into, slack):
    """libsodium's xor_ic starts at a 64-byte block: the offset kept between calls must give the same bytes
    as pycryptodome's stateful cipher (the old implementation, the oracle) whatever the call sizes."""
    key, nonce = b"k" * 32, b"n" * 24
    data = bytes(range(256)) * 12
    oracle = pnet.PycryptodomeXSalsa20(key, nonce).xor(data)
    ours, got, at = pnet.SodiumXSalsa20(key, nonce), b"", 0
    for end in sorted(cuts) + [len(data)]:
        piece = data[at:end]
        if into:  # into a reused buffer longer than the piece: only its first len(piece) bytes are written
            out = bytearray(b"\xee" * (len(piece) + slack))
            ours.xor_into(piece, out)
            assert out[len(piece):] == b"\xee" * slack
            got += bytes(out[:len(piece)])
        else:
            got += bytes(ours.xor(piece))
        at = max(at, end)
    assert got == oracle


def test_xor_into_refuses_a_short_buffer():
    with pytest.raises(ValueError):
        pnet.SodiumXSalsa20(b"k" * 32, b"n" * 24).xor_into(b"abc", bytearray(2))


@pytest.mark.trio
@pytest.mark.parametrize("private", [True, False], ids=["pnet", "open"])
async def test_psk_stream_reads_ahead_and_hands_out_exactly_what_is_asked(private):
    """PskStream (and ReadAheadStream, what an open network's connections run in) reads big chunks off the
    socket (and decrypts them at once); the reader above it (Noise: a 2-byte length, then the body) still
    gets the plaintext in order, in the pieces it asks for."""
    import random

    import trio.testing

    from p2pcache.net.pnet import PskStream, ReadAheadStream

    class Adapter:  # py-libp2p's raw stream interface over a trio stream
        def __init__(self, s):
            self.s, self.reads = s, 0

        async def read(self, n=None):
            self.reads += 1
            return await self.s.receive_some(n)

        async def write(self, data):
            await self.s.send_all(data)

    key = os.urandom(32)
    left, right = trio.testing.memory_stream_pair()
    socket = Adapter(right)
    if private:
        writer, reader = PskStream(Adapter(left), key), PskStream(socket, key)
    else:
        writer, reader = ReadAheadStream(Adapter(left)), ReadAheadStream(socket)
    rng = random.Random(1)
    frames = [rng.randbytes(rng.choice([1, 30, 1000, 65535])) for _ in range(60)]
    with trio.fail_after(10):
        await _psk_roundtrip(writer, reader, frames)
    # at most one socket read per frame written (plus the nonce's), where reading each piece asked for
    # (length, then body) took two or more
    assert socket.reads <= len(frames) + 2


async def _psk_roundtrip(writer, reader, frames):
    async with trio.open_nursery() as nursery:
        async def send():
            for f in frames:
                await writer.write(len(f).to_bytes(2, "big") + f)

        nursery.start_soon(send)
        got = []
        for _ in frames:
            head = await reader.read(2)
            while len(head) < 2:
                head += await reader.read(2 - len(head))
            assert len(head) == 2
            assert await reader.read(0) == b""  # asks for nothing, takes nothing
            want, body = int.from_bytes(head, "big"), b""
            while len(body) < want:
                piece = await reader.read(want - len(body))
                assert 0 < len(piece) <= want - len(body)
                body += piece
            got.append(body)
    assert got == frames


def test_hsalsa20_rejects_bad_lengths():
    with pytest.raises(ValueError):
        hsalsa20(b"k" * 31, b"n" * 16)


def test_swarm_key_file_roundtrip_and_format(tmp_path):
    path = tmp_path / "swarm.key"
    key = new_swarm_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert text.splitlines() == ["/key/swarm/psk/1.0.0/", "/base16/", key.hex()]
    assert read_swarm_key(path) == key
    with pytest.raises(InvalidKey, match="already exists"):
        new_swarm_key_file(path)
    assert parse_swarm_key(format_swarm_key(b"\x01" * 32)) == b"\x01" * 32


@pytest.mark.parametrize("text", ["", "/key/swarm/psk/1.0.0/\n/base16/\nabc\n",
                                  "/key/swarm/psk/1.0.0/\n/base64/\n" + "a" * 64,
                                  "/key/other/\n/base16/\n" + "a" * 64])
def test_bad_swarm_keys_are_refused(text):
    with pytest.raises(InvalidKey):
        parse_swarm_key(text)


# -- identity ------------------------------------------------------------------------------------


def test_identity_is_created_private_and_stable(tmp_path):
    path = tmp_path / "sub" / "identity.key"
    first = load_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_identity(path)
    assert again.private_key.to_bytes() == first.private_key.to_bytes()
    assert NodeHost(HostConfig(identity=path, listen=LOOPBACK)).peer_id == NodeHost(
        HostConfig(identity=path, listen=LOOPBACK)).peer_id


def test_identity_garbage_is_one_clear_error(tmp_path):
    path = tmp_path / "identity.key"
    path.write_bytes(b"not a key")
    with pytest.raises(InvalidKey, match="not a libp2p private key"):
        load_identity(path)


@pytest.mark.trio
async def test_peer_id_persists_across_restarts(tmp_path):
    async with open_host(cfg(tmp_path, "a")) as a:
        first = a.peer_id
    async with open_host(cfg(tmp_path, "a")) as a:
        assert a.peer_id == first
        assert str(a.addrs()[0]).endswith(f"/p2p/{first.to_base58()}")


# -- connecting ----------------------------------------------------------------------------------


@pytest.mark.trio
async def test_two_hosts_connect_and_exchange_bytes(tmp_path):
    async with open_host(cfg(tmp_path, "a")) as a, open_host(cfg(tmp_path, "b")) as b:
        events = b.subscribe()
        with trio.fail_after(10):
            assert await a.connect(b.addrs()[0]) == b.peer_id
            assert await events.receive() == PeerEvent(a.peer_id, True)
            assert await roundtrip(a, b) == b"olleh"
            assert b.is_connected(a.peer_id) and a.peer_id in b.connected_peers()
            await a.disconnect(b.peer_id)
            assert await events.receive() == PeerEvent(a.peer_id, False)


class _Wire:
    """One end of an in-memory byte stream with the read/write a libp2p stream has."""

    def __init__(self, stream):
        self.stream, self.buf = stream, b""
        self.sends = 0

    async def write(self, data):
        self.sends += 1
        await self.stream.send_all(data)

    async def read(self, n=-1):
        if not self.buf:
            self.buf = await self.stream.receive_some(65536)
        n = len(self.buf) if n < 0 else n
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def _delim(text):
    body = text.encode() + b"\n"
    return bytes([len(body)]) + body


async def _read_delim(wire):
    n = (await wire.read(1))[0]
    body = b""
    while len(body) < n:
        body += await wire.read(n - len(body))
    return body[:-1].decode()


@pytest.mark.trio
async def test_a_stream_proposes_its_protocol_with_the_multistream_header_in_one_round_trip():
    # A listener that answers nothing before the proposal has arrived: an initiator that waits for the
    # header's echo before proposing (py-libp2p's own, two round trips) would wait forever here.
    client, server = trio.testing.memory_stream_pair()
    wire, peer = _Wire(client), _Wire(server)

    async def listener():
        assert await _read_delim(peer) == "/multistream/1.0.0"
        assert await _read_delim(peer) == "/p2pcache/dag/1.0.0"
        await peer.write(_delim("/multistream/1.0.0") + _delim("/p2pcache/dag/1.0.0"))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listener)
            assert await select_protocol(wire, ["/p2pcache/dag/1.0.0"]) == "/p2pcache/dag/1.0.0"
    assert wire.sends == 1


@pytest.mark.trio
async def test_a_refused_first_protocol_falls_back_to_the_next_and_none_is_one_host_error(tmp_path):
    async with open_host(cfg(tmp_path, "a")) as a, open_host(cfg(tmp_path, "b")) as b:
        b.set_stream_handler("/test/echo/1", echo)
        with trio.fail_after(10):
            await a.connect(b.addrs()[0])
            s = await a.new_stream(b.peer_id, ["/test/unknown/1", "/test/echo/1"])
            assert s.get_protocol() == "/test/echo/1"
            await s.write(b"hello")
            assert await s.read(1024) == b"olleh"
            with pytest.raises(HostError, match="speaks none of /test/unknown/1"):
                await a.new_stream(b.peer_id, ["/test/unknown/1"])
            assert await roundtrip(a, b) == b"olleh"  # the connection is still good


@pytest.mark.trio
async def test_the_next_stream_of_a_protocol_the_peer_chose_proposes_it_in_its_first_write(tmp_path):
    async with open_host(cfg(tmp_path, "a")) as a, open_host(cfg(tmp_path, "b")) as b:
        served = []

        async def counting_echo(stream):
            served.append(stream)
            await echo(stream)

        b.set_stream_handler("/test/echo/1", counting_echo)
        with trio.fail_after(10):
            await a.connect(b.addrs()[0])
            first = await a.new_stream(b.peer_id, ["/test/echo/1"])
            await trio.sleep(0.2)
            assert len(served) == 1  # negotiated inside new_stream: B is serving it already
            await first.write(b"one")
            assert await first.read(1024) == b"eno"
            second = await a.new_stream(b.peer_id, ["/test/echo/1"])
            assert second.get_protocol() == "/test/echo/1"
            await trio.sleep(0.2)
            assert len(served) == 1  # nothing sent yet: the proposal waits for the request
            await second.write(b"two")
            assert await second.read(1024) == b"owt"  # the answer to the proposal was read first
            assert len(served) == 2
            # B stops speaking it: the proposal is refused, and the first read says so in one line
            b.libp2p.get_mux().remove_handler("/test/echo/1")
            third = await a.new_stream(b.peer_id, ["/test/echo/1"])
            await third.write(b"three")
            with pytest.raises(HostError, match="no longer speaks /test/echo/1"):
                await third.read(1024)
            await third.reset()
            b.set_stream_handler("/test/echo/1", counting_echo)
            assert await roundtrip(a, b) == b"olleh"  # the connection is still good


@pytest.mark.trio
async def test_a_refused_proposal_fails_later_writes_and_the_next_stream_negotiates_again(tmp_path):
    async with open_host(cfg(tmp_path, "a")) as a, open_host(cfg(tmp_path, "b")) as b:
        b.set_stream_handler("/test/echo/1", echo)
        with trio.fail_after(10):
            await a.connect(b.addrs()[0])
            assert await roundtrip(a, b) == b"olleh"  # B chose it on this connection: the next is proposed
            b.libp2p.get_mux().remove_handler("/test/echo/1")
            refused = await a.new_stream(b.peer_id, ["/test/echo/1"])
            await refused.write(b"one")
            with pytest.raises(HostError, match="no longer speaks /test/echo/1"):
                await refused.read(1024)
            # a writer does not go on into a stream nobody serves
            with pytest.raises(HostError, match="no longer speaks /test/echo/1"):
                await refused.write(b"two")
            # the connection forgot that B speaks it: the next stream asks before it is handed out
            with pytest.raises(HostError, match="speaks none of /test/echo/1"):
                await a.new_stream(b.peer_id, ["/test/echo/1"])
            b.set_stream_handler("/test/echo/1", echo)
            assert await roundtrip(a, b) == b"olleh"


@pytest.mark.trio
async def test_private_network_same_key_connects(tmp_path):
    key = os.urandom(32)
    async with open_host(cfg(tmp_path, "a", swarm_key=key)) as a, open_host(cfg(tmp_path, "b", swarm_key=key)) as b:
        with trio.fail_after(10):
            await a.connect(b.addrs()[0])
            assert await roundtrip(a, b) == b"olleh"


async def assert_cannot_connect(a: NodeHost, b: NodeHost) -> None:
    with trio.fail_after(10):
        with pytest.raises(HostError):
            await a.connect(b.addrs()[0])
    assert not a.is_connected(b.peer_id)
    assert not b.is_connected(a.peer_id)


@pytest.mark.trio
async def test_private_network_keeps_out_other_keys_and_no_key(tmp_path):
    k1, k2 = os.urandom(32), os.urandom(32)
    async with (
        open_host(cfg(tmp_path, "p1", swarm_key=k1)) as p1,
        open_host(cfg(tmp_path, "p2", swarm_key=k2)) as p2,
        open_host(cfg(tmp_path, "open")) as open_,
    ):
        await assert_cannot_connect(p1, open_)  # key -> no key
        await assert_cannot_connect(open_, p1)  # no key -> key
        await assert_cannot_connect(p1, p2)  # different keys
        await assert_cannot_connect(p2, p1)


@pytest.mark.trio
async def test_allowlist_closes_other_peers(tmp_path):
    friend_cfg, stranger_cfg = cfg(tmp_path, "friend"), cfg(tmp_path, "stranger")
    friend_id = NodeHost(friend_cfg).peer_id.to_base58()
    guarded_cfg = cfg(tmp_path, "guarded", allow_peers=frozenset({friend_id}))
    async with open_host(guarded_cfg) as guarded, open_host(friend_cfg) as friend, open_host(stranger_cfg) as stranger:
        events = guarded.subscribe()
        with trio.fail_after(15):
            await friend.connect(guarded.addrs()[0])
            assert await roundtrip(friend, guarded) == b"olleh"
            assert await events.receive() == PeerEvent(friend.peer_id, True)
            # The stranger completes the handshake (its ID is only known then) but is cut off at once:
            # no stream of it is served and the connection goes away.
            try:
                await stranger.connect(guarded.addrs()[0])
                await roundtrip(stranger, guarded)
                raise AssertionError("a peer off the allowlist was served")
            except AssertionError:
                raise
            except Exception:
                pass
            while guarded.libp2p.get_network().connections.get(stranger.peer_id):
                await trio.sleep(0.01)
            assert not guarded.is_connected(stranger.peer_id)
            # and the guarded host refuses to dial it
            with pytest.raises(HostError, match="allowlist"):
                await guarded.connect(stranger.addrs()[0])
            assert friend.is_connected(guarded.peer_id)


@pytest.mark.trio
async def test_bootstrap_peer_is_dialled_and_redialled(tmp_path):
    async with open_host(cfg(tmp_path, "boot")) as boot:
        node_cfg = cfg(tmp_path, "node", bootstrap=(str(boot.addrs()[0]),), backoff_initial=0.05, backoff_max=0.2)
        events = boot.subscribe()
        async with open_host(node_cfg) as node:
            with trio.fail_after(15):
                assert await events.receive() == PeerEvent(node.peer_id, True)
                await boot.disconnect(node.peer_id)
                assert await events.receive() == PeerEvent(node.peer_id, False)
                assert await events.receive() == PeerEvent(node.peer_id, True)  # redialled


@pytest.mark.trio
async def test_bootstrap_backs_off_until_the_peer_appears(tmp_path):
    # pick a port, then free it: the node dials a dead address first
    async with open_host(cfg(tmp_path, "probe")) as probe:
        port = str(probe.addrs()[0]).split("/tcp/")[1].split("/")[0]
    boot_id = NodeHost(cfg(tmp_path, "boot")).peer_id.to_base58()
    addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{boot_id}"
    node_cfg = cfg(tmp_path, "node", bootstrap=(addr,), backoff_initial=0.05, backoff_max=0.2)
    async with open_host(node_cfg) as node:
        await trio.sleep(0.3)  # a few failed dials
        assert not node.connected_peers()
        boot_cfg = cfg(tmp_path, "boot", listen=(f"/ip4/127.0.0.1/tcp/{port}",))
        async with open_host(boot_cfg) as boot:
            with trio.fail_after(15):
                while not node.is_connected(boot.peer_id):
                    await trio.sleep(0.02)


@pytest.mark.trio
@pytest.mark.parametrize("private", [True, False], ids=["pnet", "open"])
async def test_writes_cut_by_cancels_leave_the_connection_working(tmp_path, private):
    """A write cancelled once its frame has begun (a deadline, a race's loser) must not leave the peer's
    decryption out of step: before, the peer read a garbage frame length and every later stream on the
    connection hung (cold `nix copy` copies failing with 503s and cut NARs)."""
    import random

    key = os.urandom(32) if private else None
    rng = random.Random(5)
    async with open_host(cfg(tmp_path, "a", swarm_key=key)) as a, open_host(cfg(tmp_path, "b", swarm_key=key)) as b:

        async def sink(stream):
            try:
                while await stream.read(1 << 16):
                    pass
            except Exception:
                pass

        b.set_stream_handler("/test/sink/1", sink)
        with trio.fail_after(10):
            await a.connect(b.addrs()[0])
        cut = 0

        async def writer() -> None:
            nonlocal cut
            s = await a.new_stream(b.peer_id, ["/test/sink/1"])
            for _ in range(40):
                with trio.move_on_after(rng.uniform(0, 0.004)) as scope:
                    await s.write(os.urandom(rng.choice((200, 5000, 70000))))
                cut += scope.cancelled_caught

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(writer)
        assert cut > 20  # the cancels did land mid-write
        with trio.fail_after(5):  # a new stream on the same connection still gets its answer
            assert await roundtrip(a, b) == b"olleh"
        assert a.is_connected(b.peer_id)


@pytest.mark.trio
@pytest.mark.parametrize("private", [True, False], ids=["pnet", "open"])
@pytest.mark.parametrize("stock", [(False, False), (False, True), (True, False)], ids=["ours", "ours-stock", "stock-ours"])
async def test_our_data_path_carries_streams_and_speaks_to_the_stock_one(tmp_path, private, stock):
    """Every stream runs on our own Noise messages and Yamux (`net.wire`) unless `stock_data_path`, and
    either end speaks to the other, in a private network too: 3 MiB each way on 4 streams at once, whole."""
    from libp2p.stream_muxer.yamux.yamux import Yamux

    from p2pcache.net.wire import NoiseSession, YamuxConnection

    key = os.urandom(32) if private else None
    blobs = [os.urandom(3 << 20) for _ in range(4)]
    async with open_host(cfg(tmp_path, "a", swarm_key=key, stock_data_path=stock[0])) as a, \
            open_host(cfg(tmp_path, "b", swarm_key=key, stock_data_path=stock[1])) as b:

        async def sha(stream):
            from libp2p.network.stream.exceptions import StreamEOF

            h = hashlib.sha256()
            try:
                while data := await stream.read(1 << 20):
                    h.update(data)
            except StreamEOF:
                pass
            await stream.write(h.digest())
            await stream.close()

        b.set_stream_handler("/test/sha/1", sha)

        async def send(blob):
            s = await a.new_stream(b.peer_id, ["/test/sha/1"])
            for off in range(0, len(blob), 300_000):
                await s.write(blob[off:off + 300_000])
            await s.close_write()
            assert await s.read(64) == hashlib.sha256(blob).digest()

        with trio.fail_after(60):
            await a.connect(b.addrs()[0])
            async with trio.open_nursery() as nursery:
                for blob in blobs:
                    nursery.start_soon(send, blob)
        for host, is_stock in ((a, stock[0]), (b, stock[1])):
            (conn,) = host.libp2p.get_network().connections[(b if host is a else a).peer_id]
            muxed = conn.muxed_conn
            if is_stock:
                assert isinstance(muxed, Yamux) and not isinstance(muxed.secured_conn, NoiseSession)
            else:
                assert isinstance(muxed, YamuxConnection) and isinstance(muxed.secured_conn, NoiseSession)


# -- dialling a peer again after a failed dial ---------------------------------------------------


def test_dial_backoff_doubles_from_a_second_and_starts_again_after_a_quiet_spell():
    from p2pcache.net.host import DialBackoff

    now = [100.0]
    live: set[str] = set()
    backoff = DialBackoff(live.__contains__, initial=1.0, maximum=8.0, clock=lambda: now[0])
    assert not backoff.is_blocked("p")
    waits = []
    for _ in range(6):  # each failure as soon as the last block ends
        backoff.mark_failed("p")
        waits.append(backoff.blocked_for("p"))
        now[0] += waits[-1]
        assert not backoff.is_blocked("p")
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    backoff.mark_failed("p")
    live.add("p")  # it connected to us meanwhile: dialling it is no question of backoff
    assert not backoff.is_blocked("p")
    live.clear()
    assert backoff.is_blocked("p")
    now[0] += 8.0 + 8.0 + 0.1  # quiet for longer than `maximum` after the block: a new failure is a first one
    backoff.mark_failed("p")
    assert backoff.blocked_for("p") == 1.0
    backoff.evict("p")  # a dial that worked, or a sign the peer is back
    assert not backoff.is_blocked("p")


@pytest.mark.trio
async def test_a_newer_signed_record_from_the_dht_lifts_the_dial_backoff_of_a_restarted_peer(tmp_path):
    """B dialled provider A while it was down; A restarts on its old address and announces again. The DHT
    answer that names A carries A's new signed peer record, so B dials A at once instead of waiting out its
    backoff (py-libp2p's own cache refused A for 60 s)."""
    from p2pcache.routing.dht import DHT, DHTConfig
    from p2pcache.routing.keys import dht_key

    key = dht_key("sha256:" + "ab" * 32)
    async with open_host(cfg(tmp_path, "probe")) as probe:
        port = str(probe.addrs()[0]).split("/tcp/")[1].split("/")[0]
    a_cfg = cfg(tmp_path, "a", listen=(f"/ip4/127.0.0.1/tcp/{port}",))
    async with open_host(cfg(tmp_path, "h")) as h, open_host(cfg(tmp_path, "b")) as b, trio.open_nursery() as n:
        h_dht = DHT(h, DHTConfig(refresh=False))
        await n.start(h_dht.run)
        b_dht = DHT(b, DHTConfig(refresh=False))
        b.dial_backoff.initial = 300.0  # what an often-failed peer would have: only the sighting can lift it

        @asynccontextmanager
        async def a_announcing():
            async with open_host(a_cfg) as a:
                a_dht = DHT(a, DHTConfig(refresh=False))
                await a.connect(h.addrs()[0])
                await a_dht.add_providers(h.peer_id, [key])
                while not h_dht.local_providers(key):
                    await trio.sleep(0.02)
                yield a

        with trio.fail_after(30):
            async with a_announcing() as a:
                a_id = a.peer_id
            # A announced, then stopped
            await b.connect(h.addrs()[0])
            answer = await b_dht.ask_providers(h.peer_id, key)
            assert [p.peer_id for p in answer.providers] == [a_id]
            with pytest.raises(HostError):  # A is down
                await b.connect(answer.providers[0])
            assert b.dial_backoff.is_blocked(str(a_id))
            async with a_announcing():  # A restarted on its port and announced again: a newer record
                assert b.dial_backoff.is_blocked(str(a_id))
                answer = await b_dht.ask_providers(h.peer_id, key)
                assert not b.dial_backoff.is_blocked(str(a_id))
                await b.connect(answer.providers[0])
                assert b.is_connected(a_id)
        n.cancel_scope.cancel()


async def _free_port(tmp_path) -> str:
    async with open_host(cfg(tmp_path, "probe")) as probe:
        return str(probe.addrs()[0]).split("/tcp/")[1].split("/")[0]


@pytest.mark.trio
async def test_a_stream_asked_during_a_dial_backoff_shorter_than_its_deadline_waits_it_out(tmp_path):
    """B's dial of A failed a moment ago (A was down), so A is in B's dial backoff; A is back. A stream B asks
    for patiently (`patient_dials`, as a resolve does) with time enough left waits the backoff out and gets
    through: it used to fail at once ("recently failed all addresses"), so a get asked then failed whatever
    its timeout. One whose deadline comes before the backoff ends, or one not asked patiently (a DHT walk's
    RPC), still fails at once, with one line, rather than sleeping into its deadline."""
    from p2pcache.net.host import patient_dials

    port = await _free_port(tmp_path)
    a_cfg = cfg(tmp_path, "a", listen=(f"/ip4/127.0.0.1/tcp/{port}",))
    async with open_host(cfg(tmp_path, "b")) as b:
        async with open_host(a_cfg) as a:
            a_id, a_addrs = a.peer_id, a.addrs()
        b.add_addrs(a_id, a_addrs)
        b.dial_backoff.initial = 1.5
        with trio.fail_after(10), pytest.raises(Exception):  # noqa: B017 (py-libp2p's SwarmDialAllFailedError)
            await b.new_stream(a_id, ["/test/echo/1"])  # A is down: the dial fails, A goes into the backoff
        assert b.dial_backoff.is_blocked(str(a_id))
        async with open_host(a_cfg) as a:
            a.set_stream_handler("/test/echo/1", echo)
            with trio.move_on_after(0.5), patient_dials(), pytest.raises(HostError, match="next is allowed in"):
                await b.new_stream(a_id, ["/test/echo/1"])  # the backoff outlasts this deadline: at once
            with trio.move_on_after(8), pytest.raises(HostError, match="next is allowed in"):
                await b.new_stream(a_id, ["/test/echo/1"])  # not asked patiently: at once
            assert b.dial_backoff.is_blocked(str(a_id))
            with trio.fail_after(8), patient_dials():  # time enough: the backoff is waited out, then A is dialled
                s = await b.new_stream(a_id, ["/test/echo/1"])
                await s.write(b"hello")
                assert await s.read(1024) == b"olleh"


@pytest.mark.trio
async def test_a_provider_in_dial_backoff_from_our_own_provider_store_is_looked_up_in_the_dht_too(tmp_path):
    """B holds A's provider record in its own provider store (A announced to B directly), A went down and B's
    dials failed until its backoff is long; A restarts on its port and announces to the hub only. B's lookup
    used to answer from its own store (the record it held, from before the failures) and never saw A's newer
    signed peer record, so the backoff held for up to a minute; now, with every provider it holds in backoff,
    the lookup asks the DHT as well, whose answer lifts it."""
    from p2pcache.routing.dht import DHT, DHTConfig
    from p2pcache.routing.finder import ProviderFinder
    from p2pcache.routing.keys import dht_key

    alias = "sha256:" + "cd" * 32
    key = dht_key(alias)
    port = await _free_port(tmp_path)
    a_cfg = cfg(tmp_path, "a", listen=(f"/ip4/127.0.0.1/tcp/{port}",))
    async with open_host(cfg(tmp_path, "h")) as h, open_host(cfg(tmp_path, "b")) as b, trio.open_nursery() as n:
        h_dht = DHT(h, DHTConfig(refresh=False))
        await n.start(h_dht.run)
        b_dht = DHT(b, DHTConfig(refresh=False))
        await n.start(b_dht.run)
        finder = ProviderFinder(b_dht, dialable=lambda peer: not b.dial_backoff.is_blocked(str(peer)))
        with trio.fail_after(30):
            async with open_host(a_cfg) as a:
                a_id = a.peer_id
                a_dht = DHT(a, DHTConfig(refresh=False))
                await a.connect(b.addrs()[0])
                await a_dht.add_providers(b.peer_id, [key])
                while not b_dht.local_providers(key):
                    await trio.sleep(0.02)
            await b.disconnect(a_id)  # (B may not have noticed A's close yet)
            b.dial_backoff.initial = 300.0  # what many failed dials in a row leave: only a sighting lifts it
            with pytest.raises(HostError):
                await b.connect(b_dht.local_providers(key)[0])
            assert b.dial_backoff.is_blocked(str(a_id))
            await b.connect(h.addrs()[0])
            async with open_host(a_cfg) as a:  # back on its port; announces to the hub only
                a_dht = DHT(a, DHTConfig(refresh=False))
                await a.connect(h.addrs()[0])
                await a_dht.add_providers(h.peer_id, [key])
                while not h_dht.local_providers(key):
                    await trio.sleep(0.02)
                assert not b.is_connected(a_id)
                found = await finder.find_providers(alias, timeout=5)
                assert [p.peer_id for p in found] == [a_id]
                assert not b.dial_backoff.is_blocked(str(a_id))
                await b.connect(found[0])
                assert b.is_connected(a_id)
        n.cancel_scope.cancel()


def test_a_provider_restarted_on_its_address_is_fetched_from_within_seconds(tmp_path, daemons):
    """Real daemons: B's fetch while provider A is down fails (its dial fails); A restarts where it was,
    and B's next fetch reaches it at once. With py-libp2p's flat 60 s dial cache B refused to dial A for a
    minute and the fetch failed with "none answered validly"."""
    import hashlib
    import time

    from .helpers.daemons import free_port, start_daemon

    data = os.urandom(1 << 20)
    src = tmp_path / "x.bin"
    src.write_bytes(data)
    hub = start_daemon(tmp_path / "hub")
    daemons.append(hub)
    listen = f"/ip4/127.0.0.1/tcp/{free_port()}"
    a = start_daemon(tmp_path / "a", bootstrap=[hub.addr], listen=listen)
    b = start_daemon(tmp_path / "b", bootstrap=[hub.addr])
    daemons += [a, b]
    a.cli("add", str(src))
    a.wait_announced(3)
    sha = "sha256:" + hashlib.sha256(data).hexdigest()
    a.kill()
    down = b.cli("get", sha, "-o", str(tmp_path / "o1"), check=False, timeout=60)
    assert down.returncode == 3 and "1 failed" in down.stderr.decode()
    failed_at = time.monotonic()
    # A comes back alone (no bootstrap: nobody hears of it), so only B's own dial can find it: B's backoff
    # doubles per failed dial in a row from 1 s (the failed get above dialled A a few times, so it may be
    # 4-8 s by now; a get asked while it lasts fails at once), never py-libp2p's flat 60 s
    a = start_daemon(tmp_path / "a", listen=listen)
    daemons.append(a)
    while True:
        got = b.cli("get", sha, "-o", str(tmp_path / "o2"), check=False, timeout=60)
        if got.returncode == 0 or time.monotonic() - failed_at > 20:
            break
        time.sleep(1)
    assert got.returncode == 0, got.stderr.decode()
    assert (tmp_path / "o2").read_bytes() == data
    assert time.monotonic() - failed_at < 20


@pytest.mark.trio
@pytest.mark.parametrize("batch", [1, 20_000], ids=["one-key", "long-batch"])
async def test_add_providers_to_a_peer_that_no_longer_serves_the_dht_fails_instead_of_losing_them(tmp_path, batch):
    """The second ADD_PROVIDER stream to B rides its proposal in the first write (B chose the protocol on
    this connection before). B has stopped serving the DHT since: the batch is not sent into nowhere and
    counted, it raises. With 20,000 keys the refusal arrives while A is still writing (B's receive window
    holds a small part of the batch): the same one-line HostError, not an exception group out of the
    batch's nursery."""
    from p2pcache.routing.dht import DHT, DHTConfig
    from p2pcache.routing.keys import dht_key

    key = dht_key("sha256:" + "ab" * 32)
    keys = [dht_key(f"sha256:{i:064x}") for i in range(batch)]
    async with open_host(cfg(tmp_path, "a")) as a, open_host(cfg(tmp_path, "b")) as b, trio.open_nursery() as n:
        b_dht = DHT(b, DHTConfig(refresh=False))
        await n.start(b_dht.run)
        a_dht = DHT(a, DHTConfig(refresh=False))
        with trio.fail_after(60):
            await a.connect(b.addrs()[0])
            await a_dht.add_providers(b.peer_id, [key])
            while not b_dht.local_providers(key):
                await trio.sleep(0.02)
            sent = a_dht.stats.add_providers
            b.libp2p.get_mux().remove_handler(b_dht.config.protocol_id)
            with pytest.raises(HostError, match="no longer speaks"):
                await a_dht.add_providers(b.peer_id, keys)
            assert a_dht.stats.add_providers == sent
        n.cancel_scope.cancel()
