"""Applying the engines' actions: one dispatch over the action vocabulary for every driver.

Owns `apply_actions(actions, handler)`, which hands each action of `BitswapClient.handle` /
`BitswapServer.handle` to the `ActionHandler` method for its type, in order. A driver (the libp2p one,
`net.bitswap.BitswapExchange`, and simnet's `simnet.exchange.BitswapNode`) implements the handler: what a
`Send` or a `SetTimer` means over its transport is its business, which action goes where is not. An action
type added to `events.Action` without a handler method fails `make typecheck` (`assert_never`), so no
driver can drop one silently.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, assert_never

from .events import Action, Deliver, FetchFailed, PeerId, PenalisePeer, Send, SetTimer

__all__ = ["ActionHandler", "apply_actions"]


class ActionHandler(Protocol):
    def on_send(self, action: Send) -> None: ...

    def on_deliver(self, action: Deliver) -> None: ...

    def on_fetch_failed(self, action: FetchFailed) -> None: ...

    def on_timer(self, at: float) -> None: ...  # the engines want a `Tick` at `at` (or earlier)

    def on_penalise(self, peer: PeerId, why: str) -> None: ...


def apply_actions(actions: Iterable[Action], handler: ActionHandler) -> None:
    for a in actions:
        if isinstance(a, Send):
            handler.on_send(a)
        elif isinstance(a, Deliver):
            handler.on_deliver(a)
        elif isinstance(a, FetchFailed):
            handler.on_fetch_failed(a)
        elif isinstance(a, SetTimer):
            handler.on_timer(a.at)
        elif isinstance(a, PenalisePeer):
            handler.on_penalise(a.peer, a.why)
        else:
            assert_never(a)
