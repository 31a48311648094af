"""Which peers a driver refuses, and until when. Pure: the caller passes `now`.

Owns only the bookkeeping of bans: `ban(peer, now)` refuses a peer for `seconds`, `is_banned(peer, now)`
says whether it is still refused (an expired ban is forgotten when it is next asked about). Why a peer is
banned and what a ban does (drop its connections, reset its streams, tell the engines) is the driver's
decision; the libp2p driver (`net.bitswap.BitswapExchange`) and simnet's (`simnet.exchange.BitswapNode`)
both keep their bans here.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

from .errors import ExchangeUsageError

__all__ = ["BanList"]

P = TypeVar("P", bound=Hashable)


class BanList(Generic[P]):
    def __init__(self, seconds: float) -> None:
        if seconds < 0:
            raise ExchangeUsageError(f"a ban lasts >= 0 seconds, not {seconds}")
        self.seconds = seconds
        self._until: dict[P, float] = {}

    def ban(self, peer: P, now: float) -> None:
        """Refuse `peer` from `now` for `seconds` (a peer banned again is refused from the later ban)."""
        self._until[peer] = now + self.seconds

    def is_banned(self, peer: P, now: float) -> bool:
        until = self._until.get(peer)
        if until is None:
            return False
        if now >= until:
            del self._until[peer]
            return False
        return True

    def __len__(self) -> int:
        """Bans held (expired ones included until they are asked about)."""
        return len(self._until)
