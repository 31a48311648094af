"""QuotaKeeper's exclusion between gc and operations that hold unclaimed blocks (in virtual time)."""

from types import SimpleNamespace

import pytest
import trio

from p2pcache.config import NodeConfig
from p2pcache.node import QuotaKeeper


def _keeper() -> QuotaKeeper:
    return QuotaKeeper(SimpleNamespace(config=NodeConfig(), repo=None))


@pytest.mark.trio
async def test_gc_waits_for_running_operations_and_new_ones_wait_for_gc(autojump_clock):
    keeper, order = _keeper(), []

    async def operation(name: str, start: float, length: float) -> None:
        await trio.sleep(start)
        async with keeper.working():
            order.append((f"{name} start", trio.current_time()))
            await trio.sleep(length)
            order.append((f"{name} end", trio.current_time()))

    async def gc(start: float) -> None:
        await trio.sleep(start)
        async with keeper.exclusive():
            order.append(("gc start", trio.current_time()))
            await trio.sleep(1)
            order.append(("gc end", trio.current_time()))

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(operation, "a", 0, 2)
        nursery.start_soon(gc, 0.5)
        nursery.start_soon(operation, "b", 1, 1)
    assert [(what, round(t - t0, 3)) for what, t in order] == [
        ("a start", 0), ("a end", 2), ("gc start", 2), ("gc end", 3), ("b start", 3), ("b end", 4)]


@pytest.mark.trio
async def test_a_failed_operation_does_not_hold_gc_off(autojump_clock):
    keeper = _keeper()
    with pytest.raises(RuntimeError):
        async with keeper.working(clean_up_on_error=True):
            raise RuntimeError("disk went away")
    with trio.fail_after(0.001):  # no operation is counted as running any more
        async with keeper.exclusive():
            pass
