"""`fast_init`: the exchange's frozen dataclasses keep their signature, defaults, equality and frozenness."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from p2pcache.exchange.events import Deliver, MessageReceived, Send, SetTimer, Tick
from p2pcache.exchange.frozen import fast_init
from p2pcache.exchange.message import Message, Presence, WantEntry, WantType


@dataclasses.dataclass(frozen=True, slots=True)
class _Plain:
    a: int
    b: tuple = ()
    c: bool = False


_Fast = fast_init(dataclasses.make_dataclass("_Fast", [("a", int), ("b", tuple, dataclasses.field(default=())),
                                                       ("c", bool, dataclasses.field(default=False))],
                                             frozen=True, slots=True))


def test_same_values_as_the_generated_init():
    for args, kw in (((1,), {}), ((1, (2,)), {}), ((1,), {"c": True}), ((), {"a": 3, "b": (4,), "c": True})):
        plain, fast = _Plain(*args, **kw), _Fast(*args, **kw)
        assert dataclasses.astuple(plain) == dataclasses.astuple(fast)
    assert str(inspect.signature(_Fast)) == "(a, b=(), c=False)"


def test_still_frozen_equal_hashable_and_replaceable():
    w = WantEntry(object(), WantType.HAVE, 7, False, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.priority = 1  # type: ignore[misc]
    assert w == dataclasses.replace(w) and hash(w) == hash(dataclasses.replace(w))
    assert dataclasses.replace(w, priority=9).priority == 9
    assert WantEntry(w.cid) == WantEntry(w.cid, WantType.BLOCK, 1, False, False)
    assert Message() == Message((), False, (), (), 0)
    assert Message(wants=(w,), pending_bytes=3).pending_bytes == 3
    assert Send("p", Message()) == Send("p", Message(), 0) != Send("p", Message(), 1)
    assert MessageReceived("p", Message()).peer == "p" and Tick() == Tick()
    assert Presence(w.cid, True) != Presence(w.cid, False)
    assert SetTimer(1.5).at == 1.5
    assert "data" not in repr(Deliver("s", w.cid, b"x"))  # the fields' own options stay


def test_refuses_what_it_cannot_copy():
    with pytest.raises(TypeError):
        fast_init(dataclasses.make_dataclass("Mutable", [("a", int)], slots=True))
    with pytest.raises(TypeError):
        fast_init(dataclasses.make_dataclass("Unslotted", [("a", int)], frozen=True))
    with pytest.raises(TypeError):
        fast_init(dataclasses.make_dataclass("Factory", [("a", list, dataclasses.field(default_factory=list))],
                                             frozen=True, slots=True))
