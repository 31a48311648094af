"""A nursery for the Nix cache's background work (remote lookups, NAR prefetches), opened by a task of the
node's (`run`, started before the API serves), so the work outlives the request that began it.

Owns nothing but the nursery; must not decide what runs in it."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import trio

__all__ = ["Background"]


class Background:
    def __init__(self, what: str) -> None:
        self.what = what  # for the error when nothing runs it
        self._nursery: trio.Nursery | None = None

    @property
    def running(self) -> bool:
        return self._nursery is not None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Background task (the node's nursery): the nursery the work runs in, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        if self._nursery is None:
            raise RuntimeError(f"{self.what}: its run() is not running, so there is no nursery for the work")
        self._nursery.start_soon(fn, *args)
