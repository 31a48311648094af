"""The simulator's heart: an event queue in trio's virtual time, and the run wrapper that owns the clock.

Owns: the one queue of timed callbacks every simulated component schedules on (link deliveries, engine
timers, churn, phases), and the rule that callbacks due at the same instant run in the order they were
scheduled. Time is `trio.current_time()` under `trio.testing.MockClock(autojump_threshold=0)`: the loop
sleeps until the next callback is due, trio jumps the clock straight there because every task is idle,
so simulated minutes cost only the Python work done in them.

It must not read a wall clock or the global `random`: every component takes a `random.Random` derived
from the run's seed (`Sim.rng_for(name)`), so one seed gives one history.
"""

from __future__ import annotations

import gc
import hashlib
import heapq
import random
from typing import Any, Awaitable, Callable

import trio
import trio.testing

__all__ = ["Sim", "Timer", "run_simulation"]


class Timer:
    """A handle on a scheduled callback; `cancel()` makes it a no-op."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Sim:
    """A queue of (time, order, callback). Runs inside trio; see `run_simulation`."""

    def __init__(self, seed: int, clock: trio.testing.MockClock | None = None) -> None:
        self.seed = seed
        # With the MockClock in hand, `run` moves virtual time with `clock.jump` instead of sleeping:
        # the same virtual time, without a trio scheduling round per instant (the cost of a big run).
        self.clock = clock
        self._queue: list[tuple[float, int, Timer | None, Callable[..., Any], tuple]] = []
        self._order = 0
        self._stop = False
        self.events_run = 0
        # The time of the callback running now (None between callbacks): a callback never awaits, so
        # the clock stands still while it runs, and reading it once per event saves the MockClock's
        # three calls on every `now()` and `at()` of a big run. Outside callbacks (trio tasks of
        # `node-fetch`) the clock is read.
        self._now: float | None = None

    def rng_for(self, name: str) -> random.Random:
        """A generator of its own for one component, so adding draws in one place leaves the others'
        sequences unchanged."""
        digest = hashlib.sha256(f"{self.seed}/{name}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    def now(self) -> float:
        now = self._now
        return trio.current_time() if now is None else now

    def at(self, when: float, fn: Callable[..., Any], *args: Any, cancellable: bool = False) -> Timer | None:
        timer = Timer() if cancellable else None
        self._order += 1
        now = self._now
        if now is None:
            now = trio.current_time()
        heapq.heappush(self._queue, (when if when > now else now, self._order, timer, fn, args))
        return timer

    def post(self, when: float, fn: Callable[..., Any], *args: Any) -> None:
        """`at` without a handle (the per-message path of the links)."""
        self._order += 1
        now = self._now
        if now is None:
            now = trio.current_time()
        heapq.heappush(self._queue, (when if when > now else now, self._order, None, fn, args))

    def after(self, delay: float, fn: Callable[..., Any], *args: Any, cancellable: bool = False) -> Timer | None:
        return self.at(self.now() + delay, fn, *args, cancellable=cancellable)

    def stop(self) -> None:
        """End `run` after the callback that is running now."""
        self._stop = True

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def run(self, until: float | None = None) -> None:
        """Run callbacks in time order until the queue is empty, `stop()` is called, or `until`."""
        q = self._queue
        pop = heapq.heappop
        clock = self.clock
        self._stop = False
        since_checkpoint = 0
        # Virtual time, read from trio only after an await (other tasks may have moved it): between
        # awaits nothing but `clock.jump` moves it, and the MockClock (rate 0) then reads exactly
        # `now + (when - now)`, so the clock's three calls per event are saved with identical times.
        now = trio.current_time()
        events = 0
        try:
            while q and not self._stop:
                when = q[0][0]
                if until is not None and when > until:
                    break
                if when > now:
                    if clock is not None and since_checkpoint < 256:
                        jump = when - now
                        clock.jump(jump)
                        now = now + jump
                        since_checkpoint += 1
                    else:
                        # Now and then a real sleep, so any other trio task (a driver under test) runs.
                        self._now = None
                        self.events_run += events  # counted for whoever reads it while we wait
                        events = 0
                        await trio.sleep_until(when)
                        now = trio.current_time()
                        since_checkpoint = 0
                _, _, timer, fn, args = pop(q)
                if timer is not None and timer.cancelled:
                    continue
                events += 1
                # `_now` stays set from one callback to the next (nothing else runs between them);
                # it is cleared before an await and when the loop ends.
                self._now = now
                fn(*args)
        finally:
            self._now = None
            self.events_run += events
        if until is not None and not self._stop and trio.current_time() < until:
            await trio.sleep_until(until)


# Cyclic-garbage collection while a simulation runs: young collections every 100,000 allocations instead
# of 700, full ones rarely. A big run keeps millions of objects alive (stored blocks, wants, ledgers)
# that CPython's default thresholds walk over and over for almost no garbage: in fleet-fanout
# 1,000 x 64 MiB they cost 13 % of the CPU, with the same peak memory.
GC_THRESHOLDS = (100_000, 50, 100)


def run_simulation(main: Callable[[Sim], Awaitable[Any]], seed: int) -> Any:
    """Run `main(sim)` under a fresh MockClock that jumps whenever every task waits."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    sim = Sim(seed, clock)

    async def wrapper() -> Any:
        return await main(sim)

    before = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        return trio.run(wrapper, clock=clock)
    finally:
        gc.set_threshold(*before)
