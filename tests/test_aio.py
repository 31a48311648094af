"""aio.py's bridges between trio and worker threads: `feed_thread` reads its source ahead of the thread (bounded),
hands a source's error to the thread at its place in the stream, and raises what the thread raised as itself."""

from __future__ import annotations

import pytest
import trio

from p2pcache import aio

MiB = 1 << 20


class Source:
    """An async iterator of 64 KiB pieces that counts what it made (and can fail after some)."""

    def __init__(self, pieces: int, fail_after: int | None = None):
        self.left = pieces
        self.made = 0
        self.fail_after = fail_after

    def __aiter__(self) -> "Source":
        return self

    async def __anext__(self) -> bytes:
        await trio.sleep(0)
        if self.fail_after is not None and self.made == self.fail_after:
            raise ValueError("source broke")
        if not self.left:
            raise StopAsyncIteration
        self.left -= 1
        self.made += 1
        return bytes([self.made % 256]) * (64 << 10)


def test_the_thread_gets_every_piece_in_order_in_batches():
    src = Source(40)  # 2.5 MiB: batches of about 1 MiB

    def consume(it):
        return [bytes(p) for p in it]

    got = trio.run(aio.feed_thread, src, consume)
    assert b"".join(got) == b"".join(bytes([i % 256]) * (64 << 10) for i in range(1, 41))
    assert len(got) == 3 and all(len(p) >= aio.BATCH_BYTES for p in got[:-1])


def test_the_source_is_read_ahead_of_the_thread_but_bounded():
    src = Source(200)  # 12.5 MiB
    seen = []

    def consume(it):
        first = next(it)
        # While the thread holds its first batch, the trio side keeps reading (up to FEED_AHEAD batches more).
        import time
        deadline = time.monotonic() + 5
        while src.made < (aio.FEED_AHEAD + 1) * 16 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        seen.append(src.made)
        return len(first) + sum(len(p) for p in it)

    assert trio.run(aio.feed_thread, src, consume) == 200 * (64 << 10)
    # read ahead: more than the one batch asked for; bounded: the thread's first hop takes every batch ready (the
    # channel's and the one its producer was blocked sending, if the thread started late), then the channel
    # refills and one more waits to be sent
    assert 16 < seen[0] <= (2 * aio.FEED_AHEAD + 2) * 16 < 200


def test_a_source_error_reaches_the_thread_after_the_pieces_before_it_and_comes_out_as_itself():
    src = Source(100, fail_after=40)
    got = []

    def consume(it):
        for p in it:
            got.append(len(p))

    with pytest.raises(ValueError, match="source broke"):
        trio.run(aio.feed_thread, src, consume)
    assert sum(got) == 32 * (64 << 10)  # the two full batches before the failing one


def test_a_thread_that_stops_early_ends_the_feed_and_its_error_comes_out_as_itself():
    src = Source(10_000)

    def consume(it):
        next(it)
        raise KeyError("consumer gave up")

    with pytest.raises(KeyError):
        trio.run(aio.feed_thread, src, consume)
    assert src.made < 10_000  # the reader was stopped, not run to the end

    src2 = Source(10_000)
    assert trio.run(aio.feed_thread, src2, lambda it: len(next(it))) >= aio.BATCH_BYTES
    assert src2.made < 10_000


def _count_hops(monkeypatch) -> list[int]:
    """The number of batches each thread hop of feed_thread brought (one hop = one trio.from_thread.run)."""
    hops: list[int] = []
    real = trio.from_thread.run

    def counting(fn, *args, **kw):
        out = real(fn, *args, **kw)
        hops.append(len(out))
        return out

    monkeypatch.setattr(trio.from_thread, "run", counting)
    return hops


def _wait_for(cond) -> None:
    import time

    deadline = time.monotonic() + 5
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)


def test_the_thread_takes_every_batch_read_ahead_in_one_hop(monkeypatch):
    hops = _count_hops(monkeypatch)
    src = Source(16 * (aio.FEED_AHEAD + 1))  # FEED_AHEAD + 1 batches of 1 MiB

    def consume(it):
        first = next(it)
        _wait_for(lambda: not src.left)  # the rest is read ahead meanwhile
        return [bytes(first), *(bytes(p) for p in it)]

    got = trio.run(aio.feed_thread, src, consume)
    assert b"".join(got) == b"".join(bytes([i % 256]) * (64 << 10) for i in range(1, 16 * (aio.FEED_AHEAD + 1) + 1))
    # FEED_AHEAD + 1 batches and the end: the first hop takes what was read ahead by then (1 batch, or all of
    # them on a busy machine), the next every other one, then the end; one hop per batch would be 6 hops
    assert sum(hops) == aio.FEED_AHEAD + 2 and len(hops) <= 3, hops


def test_a_source_error_read_ahead_still_comes_after_the_pieces_before_it(monkeypatch):
    hops = _count_hops(monkeypatch)
    src = Source(100, fail_after=40)
    got = []

    def consume(it):
        got.append(len(next(it)))
        _wait_for(lambda: src.made >= 40)  # the next batch and the error wait in the channel
        for p in it:
            got.append(len(p))

    with pytest.raises(ValueError, match="source broke"):
        trio.run(aio.feed_thread, src, consume)
    assert sum(got) == 32 * (64 << 10)
    assert sum(hops) == 3 and len(hops) <= 2, hops  # the second batch and the error in one hop (the first too, if
    # the reader got that far before the thread's first hop)
