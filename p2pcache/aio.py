"""Bridges between trio and blocking code in worker threads, with backpressure both ways.

Which threads: every call here takes a `limiter` (a `trio.CapacityLimiter`); without one, the limiter
set for the current request with `thread_pool(...)` applies, else trio's default one (40 threads,
shared by everything else the node does in threads). Streams and uploads run in pools of their own so
that slow clients cannot starve `add`, narinfo lookups or the repo.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, AsyncIterator, Callable, Iterator

import trio

_pool: contextvars.ContextVar[trio.CapacityLimiter | None] = contextvars.ContextVar("p2pcache_thread_pool",
                                                                                      default=None)
_DONE = object()
BATCH_BYTES = 1 << 20  # drain_thread makes (feed_thread gathers) this much per thread hop
BUFFERED_PIECES = 16  # … and keeps up to this many pieces made ahead (what a stalled reader holds)


@contextlib.contextmanager
def thread_pool(limiter: trio.CapacityLimiter) -> Iterator[None]:
    """Inside this block (this task and the tasks it starts), `drain_thread` and `feed_thread` take their
    threads from `limiter`."""
    token = _pool.set(limiter)
    try:
        yield
    finally:
        _pool.reset(token)


def _limiter(given: trio.CapacityLimiter | None) -> trio.CapacityLimiter | None:
    return given if given is not None else _pool.get()


async def drain_thread(make_iter: Callable[[], Iterator[bytes]], deliver: Callable[[bytes], Any],
                       limiter: trio.CapacityLimiter | None = None) -> None:
    """Pull pieces from a blocking iterator in worker threads and `await deliver(piece)` each, about
    `BATCH_BYTES` made ahead; an exception from the iterator is raised here, as itself.

    A thread is held only while a batch of pieces is being made, never while `deliver` waits (a client
    that stops reading holds a coroutine and `BUFFERED_PIECES` pieces plus a batch, not a thread). The iterator is closed (in a thread) however the
    transfer ends."""
    limiter = _limiter(limiter)
    send_ch, recv_ch = trio.open_memory_channel[tuple[Any, Exception | None]](BUFFERED_PIECES)
    holder: list[Iterator[bytes]] = []
    exhausted: list[bool] = []  # the iterator ran to its end: closing it is a no-op, not worth a thread hop

    def start() -> Iterator[bytes]:
        it = iter(make_iter())
        holder.append(it)
        return it

    def batch(it: Iterator[bytes]) -> tuple[list[bytes], bool]:
        """Pieces up to BATCH_BYTES (one thread hop for several), and whether the iterator ended."""
        out: list[bytes] = []
        size = 0
        while size < BATCH_BYTES:
            piece = next(it, _DONE)
            if piece is _DONE:
                return out, True
            out.append(piece)  # type: ignore[arg-type]
            size += len(piece)  # type: ignore[arg-type]
        return out, False

    async def produce() -> None:
        async with send_ch:
            try:
                # the first batch in the same thread hop as making the iterator: a small NAR or archive is
                # one hop, not two
                pieces, ended = await trio.to_thread.run_sync(lambda: batch(start()), limiter=limiter)
                while True:
                    for piece in pieces:
                        await send_ch.send((piece, None))
                    if ended:
                        exhausted.append(True)
                        return
                    pieces, ended = await trio.to_thread.run_sync(batch, holder[0], limiter=limiter)
            except trio.BrokenResourceError:
                return  # the consumer stopped (client went away)
            except Exception as e:  # handed over as itself, not wrapped in the nursery's group
                await send_ch.send((None, e))

    failure: Exception | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            async with recv_ch:
                try:
                    async for piece, error in recv_ch:
                        if error is not None:
                            failure = error
                            break
                        await deliver(piece)
                except Exception as e:  # delivery failed (client gone): stop making pieces
                    failure = e
                    nursery.cancel_scope.cancel()
        if failure is not None:  # raised out here, as itself: a nursery would wrap it in a group
            raise failure
    finally:
        close = getattr(holder[0], "close", None) if holder and not exhausted else None
        if close is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(close, limiter=limiter)


FEED_AHEAD = 4  # feed_thread: batches of BATCH_BYTES read ahead of the consuming thread


async def feed_thread(source: AsyncIterator[bytes], consume: Callable[[Iterator[bytes]], Any],
                      limiter: trio.CapacityLimiter | None = None) -> Any:
    """Run `consume(iterator)` in a worker thread, its iterator pulling pieces from the async `source`; an
    exception from `source` is raised in the thread's iterator (at its place in the stream), and whatever
    `consume` raises is raised here, as itself. The thread is held for the whole call: bound how long `source`
    may stall (request bodies are, by `http.asgi.bounded_bodies`).

    A task reads `source` ahead of the thread, up to `FEED_AHEAD` batches of about `BATCH_BYTES` (a request
    body comes in pieces of 64 KiB or less), so receiving the next bytes overlaps with the thread's work on the
    last ones instead of waiting for its next ask. The thread takes every batch read ahead in one hop, so at
    most 2 × `FEED_AHEAD` + 2 batches are in memory (those it holds — the channel's and the one a blocked send
    hands over as the channel drains — and those read ahead meanwhile, one more waiting to be sent)."""
    send_ch, recv_ch = trio.open_memory_channel[tuple[Any, Exception | None]](FEED_AHEAD)

    async def produce() -> None:
        async with send_ch:
            try:
                while True:
                    parts: list[bytes] = []
                    size = 0
                    ended = False
                    while size < BATCH_BYTES:
                        try:
                            piece = await source.__anext__()
                        except StopAsyncIteration:
                            ended = True
                            break
                        parts.append(piece)
                        size += len(piece)
                    if parts:
                        await send_ch.send((parts[0] if len(parts) == 1 else b"".join(parts), None))
                    if ended:
                        return
            except trio.BrokenResourceError:
                return  # the consumer stopped reading
            except Exception as e:  # raised in the consumer's iterator, as itself
                with contextlib.suppress(trio.BrokenResourceError):
                    await send_ch.send((None, e))

    async def ready_batches() -> list[tuple[Any, Exception | None]]:
        """The next batch (waiting for it) and every other one read ahead already: one thread hop for all of
        them. A hop costs the thread a turn of the trio loop (≈ 2 ms under load, with the hashing threads
        wanting the GIL too); one per batch made a 108 MiB NAR upload's ingest thread wait ~0.2 s for input
        while the reading task sat blocked on a full channel."""
        try:
            out = [await recv_ch.receive()]
        except trio.EndOfChannel:
            return [(_DONE, None)]
        while out[-1][1] is None:
            try:
                out.append(recv_ch.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):  # the end is seen by the next call's receive
                break
        return out

    def pieces() -> Iterator[bytes]:
        while True:
            for piece, error in trio.from_thread.run(ready_batches):
                if error is not None:
                    raise error
                if piece is _DONE:
                    return
                yield piece

    outcome: list[Any] = []
    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        try:
            outcome.append(await trio.to_thread.run_sync(consume, pieces(), limiter=_limiter(limiter)))
        except Exception as e:  # raised below, as itself: the nursery would wrap it in a group
            failure = e
        finally:
            nursery.cancel_scope.cancel()
            recv_ch.close()
    if failure is not None:
        raise failure
    return outcome[0]
