"""A faster `__init__` for the exchange's frozen, slotted dataclasses (events, actions, messages).

Owns `fast_init`, a class decorator applied on top of `@dataclass(frozen=True, slots=True)`: it replaces the
generated `__init__`, which sets each field through `object.__setattr__` (a name lookup and two calls per
field, since a frozen class's own `__setattr__` refuses), with one that calls each field's slot descriptor
directly. Same signature, defaults and values; the class stays frozen (assignment still raises
`FrozenInstanceError`), equal, hashable and `dataclasses.replace`-able. Half the cost per object: the
engines build several of these for every message (a fleet simulation, millions).

It must not change what a class is: fields with `default_factory`, `init=False`, keyword-only fields or a
`__post_init__` are refused (none of ours has them), so the generated `__init__` is never silently outdone.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

__all__ = ["fast_init"]

T = TypeVar("T", bound=type)


def fast_init(cls: T) -> T:
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"fast_init is for frozen dataclasses, not {cls.__name__}")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__} has a __post_init__: keep the generated __init__")
    namespace: dict[str, object] = {}
    params, lines = [], []
    for f in dataclasses.fields(cls):
        if not f.init or f.kw_only or f.default_factory is not dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: fast_init takes plain fields only")
        slot = cls.__dict__.get(f.name)
        if slot is None or not hasattr(slot, "__set__"):
            raise TypeError(f"{cls.__name__} is not slotted: fast_init needs slots=True")
        namespace[f"_set_{f.name}"] = slot.__set__
        if f.default is dataclasses.MISSING:
            params.append(f.name)
        else:
            namespace[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        lines.append(f"    _set_{f.name}(self, {f.name})")
    source = f"def __init__(self, {', '.join(params)}):\n" + ("\n".join(lines) or "    pass") + "\n"
    exec(source, namespace)  # noqa: S102 - our own field names, as dataclasses does
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"  # type: ignore[attr-defined]
    init.__doc__ = cls.__init__.__doc__
    setattr(cls, "__init__", init)
    return cls
