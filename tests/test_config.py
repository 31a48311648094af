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
    ("[swarm]\nmdns = \"yes\"\n", "swarm.mdns is \"private\", \"on\" or \"off\""),
    ("[turbo]\nx = 1\n", "unknown section \\[turbo\\]"),
    ("[nix]\npriority = true\n", "nix.priority has the wrong type"),
])
def test_bad_settings_are_one_line_errors(tmp_path, text, words):
    (tmp_path / "config.toml").write_text(text)
    with pytest.raises(InvalidInput, match=words) as e:
        config.load(tmp_path)
    assert "\n" not in str(e.value)
