"""config.toml: the written default loads back as the defaults; bad values are one-line errors naming
the setting."""

from __future__ import annotations

import pytest

from p2pcache import config
from p2pcache.errors import InvalidInput


def test_default_file_loads_as_the_defaults(tmp_path):
    config.write_default(tmp_path)
    assert config.load(tmp_path) == config.NodeConfig()


@pytest.mark.parametrize("text, words", [
    ("[routing]\nlookup_timeout = \"soon\"\n", "routing.lookup_timeout has the wrong type"),
    ("[swarm]\nbootstrap = \"/ip4/127.0.0.1/tcp/1\"\n", "swarm.bootstrap has the wrong type"),
    ("[routing]\nturbo = true\n", "unknown setting routing.turbo"),
    ("[exchange]\nswarm_fetch = 1\n", "exchange.swarm_fetch has the wrong type"),
    ("[exchange]\nsuperseed_window = -2\n", "exchange.superseed_window must be 0"),
    ("[exchange]\nsuperseed_share = -1\n", "exchange.superseed_share must be 0"),
    ("[exchange]\nsuperseed_share = 2.5\n", "exchange.superseed_share has the wrong type"),
    ("[exchange]\nsuperseed_relay_window = -1\n", "exchange.superseed_relay_window must be 0"),
    ("[swarm]\nhandshake_timeout = 0\n", "swarm.handshake_timeout must be a positive number"),
    ("[swarm]\nmdns = \"yes\"\n", "swarm.mdns is \"private\", \"on\" or \"off\""),
    ("[turbo]\nx = 1\n", "unknown section \\[turbo\\]"),
    ("[nix]\npriority = true\n", "nix.priority has the wrong type"),
    ("[gc]\nmax_size = \"lots\"\n", "gc.max_size 'lots' is not a size"),
    ("[gc]\nhigh_watermark = 0.5\nlow_watermark = 0.8\n", "0 < low_watermark < high_watermark <= 1"),
    ("[gc]\ninterval = \"often\"\n", "gc.interval has the wrong type"),
    ("[gc]\nquota = 1\n", "unknown setting gc.quota"),
    ("[log]\nalone_warning = \"x\"\n", "log.alone_warning has the wrong type"),
])
def test_bad_settings_are_one_line_errors(tmp_path, text, words):
    (tmp_path / "config.toml").write_text(text)
    with pytest.raises(InvalidInput, match=words) as e:
        config.load(tmp_path)
    assert "\n" not in str(e.value)


def test_superseed_share_is_read_and_reaches_the_server_engine(tmp_path):
    from p2pcache.node import exchange_configs

    (tmp_path / "config.toml").write_text("[exchange]\nsuperseed_share = 3\n")
    cfg = config.load(tmp_path)
    assert cfg.superseed_share == 3 and exchange_configs(cfg)[1].superseed_share == 3
    assert exchange_configs(config.NodeConfig())[1].superseed_share == config.SUPERSEED_SHARE


def test_superseed_relay_window_is_read_and_reaches_the_server_engine(tmp_path):
    from p2pcache.node import exchange_configs

    (tmp_path / "config.toml").write_text("[exchange]\nsuperseed_relay_window = 0.5\n")
    cfg = config.load(tmp_path)
    assert cfg.superseed_relay_window == 0.5 and exchange_configs(cfg)[1].superseed_relay_window == 0.5
    assert exchange_configs(config.NodeConfig())[1].superseed_relay_window == config.SUPERSEED_RELAY_WINDOW


def test_gc_and_paths_relative_to_the_config_file(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "node.toml").write_text('[swarm]\nswarm_key = "team.key"\n[gc]\nmax_size = "1.5G"\nlow_watermark = 0.5\n')
    cfg = config.load(tmp_path / "repo", etc / "node.toml")
    assert cfg.max_size == 1536 << 20 and cfg.gc_low_watermark == 0.5 and cfg.gc_high_watermark == 0.9
    assert cfg.swarm_key_path(tmp_path / "repo") == etc / "team.key"
    assert config.load(tmp_path / "repo").swarm_key_path(tmp_path / "repo") is None
