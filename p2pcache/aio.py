"""Bridges between trio and blocking code in worker threads, with backpressure both ways."""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable, Iterator

import trio


async def drain_thread(make_iter: Callable[[], Iterator[bytes]], deliver: Callable[[bytes], Any]) -> None:
    """Run a blocking iterator in a worker thread and `await deliver(piece)` for each piece, with
    backpressure; an exception from the iterator is raised here."""
    send_ch, recv_ch = trio.open_memory_channel[bytes](4)

    def worker() -> None:
        try:
            for piece in make_iter():
                trio.from_thread.run(send_ch.send, piece)
        except trio.BrokenResourceError:
            pass  # the consumer stopped (client went away)
        finally:
            trio.from_thread.run_sync(send_ch.close)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, worker)
        try:
            async with recv_ch:
                async for piece in recv_ch:
                    await deliver(piece)
        except BaseException:
            recv_ch.close()
            raise


async def feed_thread(source: AsyncIterator[bytes], consume: Callable[[Iterator[bytes]], Any]) -> Any:
    """Run `consume(iterator)` in a worker thread, its iterator pulling pieces from the async `source`."""
    done = object()

    async def next_piece() -> Any:
        try:
            return await source.__anext__()
        except StopAsyncIteration:
            return done

    def pieces() -> Iterator[bytes]:
        while True:
            piece = trio.from_thread.run(next_piece)
            if piece is done:
                return
            yield piece

    return await trio.to_thread.run_sync(consume, pieces())
