"""The budget for bitswap messages that carry nothing (pure), and the frame decoder handing them out one
at a time (so a reader can stop at the first message over budget)."""

import pytest

from p2pcache.exchange import FrameDecoder, ProtocolViolation, decode
from p2pcache.exchange.budget import EmptyMessageBudget


def test_burst_then_refill_per_second():
    budget = EmptyMessageBudget(burst=3, per_second=2.0)
    assert [budget.charge("p", 0.0) for _ in range(4)] == [True, True, True, False]
    assert budget.charge("q", 0.0)  # per peer
    assert budget.charge("p", 0.5) and not budget.charge("p", 0.5)  # 0.5 s earned one
    assert budget.remaining("p", 100.0) == 3  # never more than the burst


def test_budget_remembers_a_bounded_number_of_peers():
    budget = EmptyMessageBudget(burst=1, per_second=0.0, max_peers=2)
    for peer in "abc":
        budget.charge(peer, 0.0)
    assert budget.remaining("a", 0.0) == 1  # the oldest was forgotten
    with pytest.raises(ValueError):
        EmptyMessageBudget(burst=0)


def test_frames_come_out_one_at_a_time_and_empty_ones_decode_to_nothing():
    decoder = FrameDecoder()
    decoder.push(b"\x00" * 1_000_000)  # a megabyte of empty frames
    first = decoder.next_frame()
    assert first == b"" and decode(first).is_empty()
    assert decoder.buffered == 999_999
    count = 1
    while decoder.next_frame() is not None:
        count += 1
    assert count == 1_000_000 and decoder.buffered == 0


def test_split_prefixes_and_overlong_prefixes():
    decoder = FrameDecoder(max_size=300)
    decoder.push(b"\xac")  # 300 = 0xac 0x02, split across pushes
    assert decoder.next_frame() is None
    decoder.push(b"\x02" + b"x" * 299)
    assert decoder.next_frame() is None
    decoder.push(b"x")
    assert decoder.next_frame() == b"x" * 300
    with pytest.raises(ProtocolViolation):
        FrameDecoder().feed(b"\xff" * 10)
    with pytest.raises(ProtocolViolation):
        FrameDecoder(max_size=10).feed(b"\x0b")
