"""Deadlines by key, in a heap with lazy removal: the shape of trio's own `Deadlines` (its run loop's
cancel-scope deadlines), shared by the client's want-block timeouts and the server's super-seeding windows.

Owns one current deadline per key. `add` (re)sets a key's deadline, `remove` forgets it, both without
searching the heap: an entry whose key has another deadline now, or none, is stale and dropped when it
reaches the top (trio prunes the same way). `next_deadline()` is the earliest live deadline, `expire(now)`
takes every key whose deadline has passed, earliest first (ties in the order they were added).
No clock: the engine passes `now`.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["Deadlines"]

K = TypeVar("K", bound=Hashable)


class Deadlines(Generic[K]):
    __slots__ = ("_heap", "_live", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []  # (deadline, push number, key), some stale
        self._live: dict[K, float] = {}  # key -> its current deadline
        self._seq = 0

    def add(self, deadline: float, key: K) -> None:
        """`key` is due at `deadline` (replacing any deadline it had)."""
        self._live[key] = deadline
        self._seq += 1
        heapq.heappush(self._heap, (deadline, self._seq, key))

    def remove(self, key: K) -> None:
        """`key` is due no more (a no-op if it was not)."""
        self._live.pop(key, None)

    def deadline(self, key: K) -> float | None:
        return self._live.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._live

    def __len__(self) -> int:
        return len(self._live)

    def _prune(self) -> None:
        heap, live = self._heap, self._live
        while heap and live.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)

    def next_deadline(self) -> float | None:
        """The earliest live deadline, or None."""
        heap = self._heap
        if not heap:
            return None
        top = heap[0]
        if self._live.get(top[2]) == top[0]:
            return top[0]  # live at the top (asked on every step of an engine): nothing to prune
        self._prune()
        return heap[0][0] if heap else None

    def expire(self, now: float) -> list[K]:
        """Every key due at or before `now`, earliest first; they are due no more."""
        out: list[K] = []
        heap, live = self._heap, self._live
        while True:
            self._prune()
            if not heap or heap[0][0] > now:
                return out
            _, _, key = heapq.heappop(heap)
            del live[key]
            out.append(key)
