"""The resolve-at-peers race: the pure state machine (no clock, no sockets), then its trio driver in
virtual time (trio's autojump clock) with fake asks."""

import pytest
import trio

from p2pcache.routing import (AskState, LookupCut, NotHeld, ProviderStanding, RaceOutcome, ResolveRace,
                              race_providers)

# -- the machine ---------------------------------------------------------------------------------


def test_staggered_asks_in_order_and_the_first_valid_answer_wins():
    race = ResolveRace(deadline=10.0, stagger=0.2)
    race.add_peers(["a", "b", "c"], now=0.0)
    race.close_input()
    assert race.next_peer(0.0) == "a"
    assert race.next_peer(0.1) is None  # the stagger is not up
    assert race.wake_at(0.1) == pytest.approx(0.2)
    assert race.next_peer(0.2) == "b"
    race.on_answer("b", "root", now=0.3)
    assert race.done and race.outcome is RaceOutcome.FOUND and race.winner == ("b", "root")
    # "a" was asked a stagger before the winner and still had not answered: outrun, counted as timed out
    assert race.state_of("a") is AskState.TIMED_OUT and race.state_of("c") is AskState.QUEUED
    assert race.next_peer(1.0) is None


def test_a_failure_frees_the_next_ask_at_once():
    race = ResolveRace(deadline=10.0, stagger=1.0)
    race.add_peers(["liar", "honest"], now=0.0)
    assert race.next_peer(0.0) == "liar"
    race.on_failure("liar", now=0.01)
    assert race.next_peer(0.01) == "honest"  # nothing in flight: no waiting for the stagger


def test_every_provider_asked_not_only_the_first_three():
    race = ResolveRace(deadline=100.0, stagger=0.1, max_in_flight=4)
    race.add_peers(range(10), now=0.0)
    race.close_input()
    asked = []
    t = 0.0
    while not race.done:
        p = race.next_peer(t)
        if p is not None:
            asked.append(p)
            if p < 9:
                race.on_failure(p, t)
            else:
                race.on_answer(p, "ok", t)
        t += 0.1
    assert asked == list(range(10)) and race.winner == (9, "ok")


def test_slots_cap_asks_in_flight():
    race = ResolveRace(deadline=100.0, stagger=0.0, max_in_flight=2)
    race.add_peers("abc", now=0.0)
    assert [race.next_peer(0.0), race.next_peer(0.0), race.next_peer(0.0)] == ["a", "b", None]
    race.on_empty("a", 0.5)
    assert race.next_peer(0.5) == "c"


def test_all_holding_nothing_is_a_miss_but_a_failure_or_timeout_is_not():
    race = ResolveRace(deadline=5.0, stagger=0.0)
    race.add_peers("ab", now=0.0)
    race.close_input()
    for p in "ab":
        assert race.next_peer(0.0) == p
        race.on_empty(p, 0.1)
    assert race.done and race.outcome is RaceOutcome.MISS

    race = ResolveRace(deadline=5.0, stagger=0.0)
    race.add_peers("ab", now=0.0)
    race.close_input()
    race.next_peer(0.0), race.next_peer(0.0)
    race.on_empty("a", 0.1)
    assert not race.done
    race.expire(4.9)
    assert not race.done
    race.expire(5.0)
    assert race.done and race.state_of("b") is AskState.TIMED_OUT and race.outcome is RaceOutcome.FAILED

    no_providers = ResolveRace(deadline=5.0)
    no_providers.close_input()
    assert no_providers.done and no_providers.outcome is RaceOutcome.MISS


def test_demoted_providers_are_asked_last_and_restored_when_they_answer():
    standing = ProviderStanding(demote_for=60.0)
    first = ResolveRace(deadline=5.0, stagger=0.2, standing=standing)
    first.add_peers(["silent", "honest"], now=0.0)
    first.close_input()
    assert first.next_peer(0.0) == "silent"
    first.expire(5.0)  # silent never answered; honest was never asked
    assert standing.is_demoted("silent", 5.0)

    second = ResolveRace(deadline=15.0, stagger=0.2, standing=standing)
    second.add_peers(["silent", "honest"], now=10.0)
    assert second.next_peer(10.0) == "honest" and second.stats.demoted_asked_last == 1
    second.on_failure("honest", 10.1)
    assert second.next_peer(10.1) == "silent"
    second.on_empty("silent", 10.2)
    assert not standing.is_demoted("silent", 10.2) and standing.is_demoted("honest", 10.2)
    assert not standing.is_demoted("honest", 10.1 + 60.0)  # demotion wears off


def test_tiers_keep_gateways_after_providers_even_demoted_ones():
    standing = ProviderStanding()
    standing.demote("p1", 0.0)
    race = ResolveRace(deadline=5.0, stagger=0.0, standing=standing)
    race.add_peers(["gw"], now=0.0, tier=1)
    race.add_peers(["p1", "p2"], now=0.0, tier=0)
    assert [race.next_peer(0.0) for _ in range(3)] == ["p2", "p1", "gw"]


def test_misuse_is_refused():
    race = ResolveRace(deadline=5.0)
    race.add_peers("a", now=0.0)
    with pytest.raises(ValueError):
        race.on_answer("a", 1, 0.0)  # never asked
    race.close_input()
    with pytest.raises(ValueError):
        race.add_peers("b", now=0.0)
    with pytest.raises(ValueError):
        ResolveRace(deadline=1.0, max_in_flight=0)


def test_standing_is_bounded():
    standing = ProviderStanding(demote_for=10.0, max_entries=3)
    for i in range(10):
        standing.demote(i, float(i))
    assert len(standing) <= 3 and standing.is_demoted(9, 9.5)


# -- the trio driver -----------------------------------------------------------------------------


def _asker(behaviour: dict, log: list):
    async def ask(peer):
        log.append((peer, trio.current_time()))
        what = behaviour[peer]
        if what == "silent":
            await trio.sleep_forever()
        kind, delay = what
        await trio.sleep(delay)
        if kind == "lie":
            raise ValueError("manifest does not match")
        if kind == "none":
            raise NotHeld()
        return f"root-from-{peer}"
    return ask


@pytest.mark.trio
async def test_driver_finds_the_honest_holder_behind_liars_and_a_silent_peer(autojump_clock):
    behaviour = {"silent": "silent", "l1": ("lie", 0.05), "l2": ("lie", 0.05), "l3": ("lie", 0.05),
                 "honest": ("ok", 0.1)}
    log = []
    start = trio.current_time()
    race = ResolveRace(deadline=start + 5.0, stagger=0.2)
    race.add_peers(["silent", "l1", "l2", "l3", "honest"], now=start)
    await race_providers(race, _asker(behaviour, log))
    assert race.winner == ("honest", "root-from-honest")
    # silent at 0, l1 at 0.2 (stagger), l2 / l3 / honest as each liar fails (0.25, 0.30, 0.35), +0.1 answer
    assert trio.current_time() - start == pytest.approx(0.45)
    assert [p for p, _ in log] == ["silent", "l1", "l2", "l3", "honest"]


@pytest.mark.trio
async def test_driver_is_bounded_by_its_deadline_whatever_peers_and_sources_do(autojump_clock):
    standing = ProviderStanding()
    start = trio.current_time()
    race = ResolveRace(deadline=start + 3.0, stagger=0.2, standing=standing)

    async def slow_source(left):
        await trio.sleep_forever()

    async def first_source(left):
        return ["s1", "s2"]

    await race_providers(race, _asker({"s1": "silent", "s2": "silent"}, []), [first_source, slow_source])
    assert trio.current_time() - start == pytest.approx(3.0)
    assert race.outcome is RaceOutcome.FAILED and race.stats.timed_out == 2
    assert standing.is_demoted("s1", trio.current_time())


@pytest.mark.trio
async def test_driver_feeds_sources_in_tiers_and_ends_when_all_answered(autojump_clock):
    start = trio.current_time()
    race = ResolveRace(deadline=start + 10.0, stagger=0.2)
    log = []

    async def providers(left):
        await trio.sleep(0.5)
        return ["p"]

    async def gateways(left):
        return ["gw"]

    await race_providers(race, _asker({"p": ("none", 0.1), "gw": ("none", 0.1)}, log), [providers, gateways])
    assert race.outcome is RaceOutcome.MISS and [p for p, _ in log] == ["p", "gw"]
    assert trio.current_time() - start == pytest.approx(0.7)


@pytest.mark.trio
async def test_a_source_that_could_not_finish_makes_no_miss_of_the_others_nothing(autojump_clock):
    """A DHT walk cut short (`ProviderFinder.providers` raises `LookupCut`) named nobody, but it is not
    "nobody has it": the race asks whom the other sources named and ends FAILED, never MISS."""
    start = trio.current_time()
    race = ResolveRace(deadline=start + 10.0, stagger=0.2)

    async def cut(left):
        await trio.sleep(1.0)
        raise LookupCut("the DHT lookup of x was cut by its timeout")

    async def gateways(left):
        return ["gw"]

    log = []
    await race_providers(race, _asker({"gw": ("none", 0.1)}, log), [cut, gateways])
    assert [p for p, _ in log] == ["gw"] and race.sources_failed == 1
    assert race.outcome is RaceOutcome.FAILED
    assert trio.current_time() - start == pytest.approx(1.1)
