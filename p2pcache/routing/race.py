"""Asking providers what they hold, as a sans-IO race: which provider to ask next, when, and what the
answers add up to.

Owns the one resolve-at-peers policy the node uses for every lookup that asks peers (a Nix narinfo,
an archive by hash): happy eyeballs over the providers a DHT lookup named — ask the best one at once,
the next after `stagger` seconds or as soon as an earlier ask failed, at most `max_in_flight` at a
time, all of them under one deadline; the first *valid* answer wins and the rest are cancelled.
What "valid" means (a manifest root that carries the asked hash) is the driver's business: it checks
before it calls `on_answer`, and reports a lie as `on_failure`.

`ProviderStanding` is the memory across races: a provider that failed, lied or timed out is demoted for
`demote_for` seconds, so the next race asks it after everyone else; one that answers is restored.

The outcome tells a true miss from a failed lookup: `MISS` only when every source of providers finished
(`source_failed` was never called: a DHT walk cut by its timeout is no "none") and every provider there
was answered that it holds nothing (or there were none), `FAILED` when some provider existed but failed,
lied or ran out of time, or a source could not finish — a caller must not remember that as "nobody has it".

Peers are any hashable values; nothing here awaits, sleeps or reads a clock: the driver passes `now`
(`race_providers` below is the trio driver; a simnet driver can pump the same machine).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import trio

from .errors import RoutingUsageError

__all__ = ["AskState", "NotHeld", "ProviderStanding", "RaceOutcome", "RaceStats", "ResolveRace", "race_providers"]

P = TypeVar("P", bound=Hashable)


class AskState(enum.Enum):
    QUEUED = "queued"  # known, not asked yet
    ASKING = "asking"
    ANSWERED = "answered"  # gave the valid answer that won
    EMPTY = "empty"  # answered that it holds nothing
    FAILED = "failed"  # could not be reached, broke the protocol, or its answer did not check out
    TIMED_OUT = "timed-out"  # still silent at the deadline, or outrun by a provider asked after it
    CANCELLED = "cancelled"  # still being asked when another won (not its fault)


class RaceOutcome(enum.Enum):
    FOUND = "found"
    MISS = "miss"  # every provider (possibly none) said it holds nothing: safe to remember as a miss
    FAILED = "failed"  # providers existed but none gave a valid answer in time: do not remember


class ProviderStanding(Generic[P]):
    """Which providers failed us lately. Bounded: at most `max_entries` demotions are remembered."""

    def __init__(self, demote_for: float = 300.0, max_entries: int = 4096) -> None:
        self.demote_for = demote_for
        self.max_entries = max_entries
        self._until: dict[P, float] = {}

    def demote(self, peer: P, now: float) -> None:
        if peer not in self._until and len(self._until) >= self.max_entries:
            for p in [p for p, t in self._until.items() if t <= now] or [next(iter(self._until))]:
                del self._until[p]
        self._until[peer] = now + self.demote_for

    def restore(self, peer: P) -> None:
        self._until.pop(peer, None)

    def is_demoted(self, peer: P, now: float) -> bool:
        until = self._until.get(peer)
        if until is None:
            return False
        if until <= now:
            del self._until[peer]
            return False
        return True

    def __len__(self) -> int:
        return len(self._until)


@dataclass
class RaceStats:
    asked: int = 0
    empty: int = 0
    failed: int = 0
    timed_out: int = 0
    cancelled: int = 0
    demoted_asked_last: int = 0  # peers queued behind the others because of their standing


@dataclass
class _Ask:
    order: tuple[int, int, int]  # (tier, demoted, arrival): lowest is asked first
    state: AskState = AskState.QUEUED
    asked_at: float = math.inf


@dataclass
class ResolveRace(Generic[P]):
    """One race. Feed it peers (`add_peers`, then `close_input` once no source will add more), ask
    `next_peer(now)` whom to ask, report with `on_answer` / `on_empty` / `on_failure`, call `expire(now)`
    when the clock passes `wake_at(now)`; `done` / `outcome` / `winner` say how it ended."""

    deadline: float
    stagger: float = 0.2
    max_in_flight: int = 8
    standing: ProviderStanding[P] | None = None
    stats: RaceStats = field(default_factory=RaceStats)

    def __post_init__(self) -> None:
        if self.stagger < 0 or self.max_in_flight < 1:
            raise RoutingUsageError("stagger must be >= 0 and max_in_flight >= 1")
        self._asks: dict[P, _Ask] = {}
        self._arrivals = 0
        self._input_closed = False
        self._expired = False
        self._in_flight = 0
        self._queued = 0
        self.sources_failed = 0
        self._last_ask = -math.inf
        self.winner: tuple[P, Any] | None = None

    # -- feeding ------------------------------------------------------------------------------
    def add_peers(self, peers: Iterable[P], now: float, tier: int = 0) -> None:
        """Candidates in the order a source ranks them; a lower `tier` is asked first (gateways, which
        pull through from upstream caches at a cost, come after the providers themselves). Within a
        tier, demoted providers go last. A peer already known is ignored."""
        if self._input_closed:
            raise RoutingUsageError("add_peers after close_input")
        for p in peers:
            if p in self._asks:
                continue
            demoted = self.standing is not None and self.standing.is_demoted(p, now)
            self.stats.demoted_asked_last += demoted
            self._asks[p] = _Ask((tier, int(demoted), self._arrivals))
            self._arrivals += 1
            self._queued += 1

    def close_input(self) -> None:
        self._input_closed = True

    def source_failed(self) -> None:
        """A source of peers could not finish (its lookup was cut short or broke): whoever it would have
        named is unknown, so the race can no longer end in `MISS`."""
        self.sources_failed += 1

    # -- asking -------------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def done(self) -> bool:
        if self.winner is not None or self._expired:
            return True
        return self._input_closed and self._queued == 0 and self._in_flight == 0

    def next_peer(self, now: float) -> P | None:
        """The peer to ask now, or None (nothing queued, all slots busy, or the stagger not yet up)."""
        if self.done or self._queued == 0 or self._in_flight >= self.max_in_flight:
            return None
        if self._in_flight and now < self._last_ask + self.stagger:
            return None
        peer = min((p for p, a in self._asks.items() if a.state is AskState.QUEUED), key=lambda p: self._asks[p].order)
        a = self._asks[peer]
        a.state, a.asked_at = AskState.ASKING, now
        self._queued -= 1
        self._in_flight += 1
        self._last_ask = now
        self.stats.asked += 1
        return peer

    def wake_at(self, now: float) -> float:
        """When the driver should next call `next_peer`/`expire` if no answer comes in first."""
        if self.done:
            return now
        if self._queued and self._in_flight < self.max_in_flight:
            return min(self.deadline, max(now, self._last_ask + self.stagger))
        return self.deadline

    # -- answers ------------------------------------------------------------------------------
    def _finish(self, peer: P, state: AskState) -> _Ask:
        a = self._asks.get(peer)
        if a is None or a.state is not AskState.ASKING:
            raise RoutingUsageError(f"{peer!r} reported {state.value} but was not being asked")
        a.state = state
        self._in_flight -= 1
        self._last_ask = -math.inf  # an ask ended: the next one need not wait for the stagger
        return a

    def on_answer(self, peer: P, value: Any, now: float) -> None:
        """`peer` gave a valid answer: it wins. Peers asked before it, by at least `stagger`, and still
        silent were outrun: they count as timed out. The others still asking are cancelled."""
        if self.done:
            raise RoutingUsageError(f"answer from {peer!r} after the race ended")
        won = self._finish(peer, AskState.ANSWERED)
        self.winner = (peer, value)
        if self.standing is not None:
            self.standing.restore(peer)
        for p, a in self._asks.items():
            if a.state is AskState.ASKING:
                outrun = a.asked_at + self.stagger <= won.asked_at
                self._settle(p, a, AskState.TIMED_OUT if outrun else AskState.CANCELLED, now)

    def on_empty(self, peer: P, now: float) -> None:
        """`peer` answered that it holds nothing under the key (an honest "no": not demoted)."""
        self._finish(peer, AskState.EMPTY)
        self.stats.empty += 1
        if self.standing is not None:
            self.standing.restore(peer)

    def on_failure(self, peer: P, now: float) -> None:
        """`peer` could not be asked, broke the protocol, or answered something that did not check out."""
        self._finish(peer, AskState.FAILED)
        self.stats.failed += 1
        if self.standing is not None:
            self.standing.demote(peer, now)

    def expire(self, now: float) -> None:
        """At or past the deadline: whoever is still being asked timed out, and the race is over."""
        if now < self.deadline or self.done:
            return
        for p, a in self._asks.items():
            if a.state is AskState.ASKING:
                self._settle(p, a, AskState.TIMED_OUT, now)
        self._expired = True

    def _settle(self, peer: P, a: _Ask, state: AskState, now: float) -> None:
        a.state = state
        self._in_flight -= 1
        if state is AskState.TIMED_OUT:
            self.stats.timed_out += 1
            if self.standing is not None:
                self.standing.demote(peer, now)
        else:
            self.stats.cancelled += 1

    # -- results ------------------------------------------------------------------------------
    @property
    def outcome(self) -> RaceOutcome:
        if self.winner is not None:
            return RaceOutcome.FOUND
        if (self._input_closed and not self.sources_failed
                and all(a.state is AskState.EMPTY for a in self._asks.values())):
            return RaceOutcome.MISS
        return RaceOutcome.FAILED

    @property
    def peers_known(self) -> int:
        return len(self._asks)

    def state_of(self, peer: P) -> AskState:
        return self._asks[peer].state

    def peers_in(self, *states: AskState) -> list[P]:
        return [p for p, a in sorted(self._asks.items(), key=lambda pa: pa[1].order) if a.state in states]


class NotHeld(Exception):
    """Raised by an `ask` callback: the peer answered that it holds nothing (an answer, not a failure)."""


async def race_providers(race: ResolveRace[P], ask: Callable[[P], Awaitable[Any]],
                         sources: Sequence[Callable[[float], Awaitable[Iterable[P]]]] = (),
                         clock: Callable[[], float] = trio.current_time) -> ResolveRace[P]:
    """The trio driver. `ask(peer)` returns a checked answer, raises `NotHeld` for "nothing here", or
    raises anything else for a failure (its message is the caller's to log). `sources` run one after
    another, each given the time left until the deadline, and their peers join the race as they
    arrive (source i in tier i); then the input is closed. A source that raises counts as unfinished
    (`source_failed`): the race still asks the peers the others named, but cannot end in `MISS`. The race ends by its deadline whatever the
    peers or sources do; the asks still running are cancelled."""
    send, receive = trio.open_memory_channel[tuple[str, Any, Any]](math.inf)

    async def one(peer: P) -> None:
        try:
            value = await ask(peer)
        except NotHeld:
            send.send_nowait(("empty", peer, None))
        except Exception as e:  # a failure of that peer, whatever it was: the race goes on
            send.send_nowait(("failed", peer, e))
        else:
            send.send_nowait(("answer", peer, value))

    async def feed() -> None:
        for tier, source in enumerate(sources):
            try:
                peers = list(await source(max(0.0, race.deadline - clock())))
            except Exception as e:
                send.send_nowait(("source-failed", None, e))
                continue
            send.send_nowait(("peers", peers, tier))
        send.send_nowait(("closed", None, None))

    if not sources:
        race.close_input()
    async with trio.open_nursery() as nursery:
        if sources:
            nursery.start_soon(feed)
        with trio.move_on_at(race.deadline):
            while not race.done:
                now = clock()
                peer = race.next_peer(now)
                if peer is not None:
                    nursery.start_soon(one, peer)
                    continue
                with trio.move_on_at(race.wake_at(now)):
                    kind, who, what = await receive.receive()
                    now = clock()
                    if kind == "answer" and not race.done:
                        race.on_answer(who, what, now)
                    elif kind == "empty" and not race.done:
                        race.on_empty(who, now)
                    elif kind == "failed" and not race.done:
                        race.on_failure(who, now)
                    elif kind == "source-failed":
                        race.source_failed()
                    elif kind == "peers" and not race.done:
                        race.add_peers(who, now, tier=what)
                    elif kind == "closed":
                        race.close_input()
                race.expire(clock())
        if not race.done:  # the deadline cut the loop short
            race.expire(max(clock(), race.deadline))
        nursery.cancel_scope.cancel()
    return race
