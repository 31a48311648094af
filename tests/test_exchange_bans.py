"""BanList: the ban bookkeeping both bitswap drivers (libp2p and simnet) keep."""

import pytest

from p2pcache.exchange.bans import BanList
from p2pcache.exchange.errors import ExchangeUsageError


def test_a_ban_lasts_its_seconds_and_is_forgotten_when_it_expires():
    bans: BanList[str] = BanList(10.0)
    assert not bans.is_banned("a", 0.0)
    bans.ban("a", 5.0)
    assert bans.is_banned("a", 5.0) and bans.is_banned("a", 14.999)
    assert not bans.is_banned("b", 6.0)
    assert len(bans) == 1
    assert not bans.is_banned("a", 15.0)  # until is exclusive
    assert len(bans) == 0  # expired and forgotten on that question


def test_banning_again_extends_from_the_later_ban():
    bans: BanList[str] = BanList(10.0)
    bans.ban("a", 0.0)
    bans.ban("a", 8.0)
    assert bans.is_banned("a", 17.0) and not bans.is_banned("a", 18.0)


def test_a_negative_ban_is_refused():
    with pytest.raises(ExchangeUsageError):
        BanList(-1.0)
