"""net/peers.py: the peer-event fan-out and the bootstrap redial loop both hosts (NodeHost, SimHost) run."""

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from p2pcache.net.peers import PeerEvent, PeerEvents, keep_connected


def _peer(seed: int) -> ID:
    return ID.from_pubkey(create_new_key_pair(bytes([seed]) * 32).public_key)


@pytest.mark.trio
async def test_subscribers_get_the_peers_up_now_then_every_event_and_a_closed_one_is_dropped():
    a, b = _peer(1), _peer(2)
    events = PeerEvents()
    first = events.subscribe([a])
    second = events.subscribe([])
    changed = events.changed
    events.publish(PeerEvent(b, True))
    assert changed.is_set() and not events.changed.is_set()  # a fresh event for the next change
    assert [first.receive_nowait(), first.receive_nowait()] == [PeerEvent(a, True), PeerEvent(b, True)]
    assert second.receive_nowait() == PeerEvent(b, True)
    await second.aclose()
    events.publish(PeerEvent(b, False))  # the closed subscriber is dropped, the other still hears it
    assert first.receive_nowait() == PeerEvent(b, False)
    events.close()
    async with first:
        assert [e async for e in first] == []


@pytest.mark.trio
async def test_keep_connected_backs_off_exponentially_then_redials_when_the_peer_is_lost(autojump_clock):
    peer = _peer(3)
    events = PeerEvents()
    connected: set[ID] = set()
    dials: list[float] = []
    heard: list[tuple[str, float]] = []

    async def dial() -> None:
        dials.append(trio.current_time())
        if len(dials) <= 3:
            raise OSError("refused")
        connected.add(peer)
        events.publish(PeerEvent(peer, True))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: keep_connected(
            peer, dial, lambda p: p in connected, events, initial=1.0, maximum=3.0,
            uniform=lambda lo, hi: hi, failure=OSError, on_failure=lambda e, d: heard.append((str(e), d))))
        await trio.sleep(100)
        assert dials == pytest.approx([0.0, 1.2, 3.6, 7.2])  # waits 1, 2, then 3 (the maximum), times the jitter 1.2
        assert heard == [("refused", 1.0), ("refused", 2.0), ("refused", 3.0)]
        connected.discard(peer)
        events.publish(PeerEvent(peer, False))  # lost: redialled at once
        await trio.sleep(1)
        assert dials[4:] == pytest.approx([100.0]) and peer in connected
        nursery.cancel_scope.cancel()
