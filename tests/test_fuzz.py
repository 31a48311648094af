"""A short run of the fuzzers in bench/ (the >= 100,000-input runs are `make fuzz`): only p2pcache's own
errors may escape a parser a peer or a user's file reaches, and whatever is accepted round-trips."""

import random

import pytest

from bench import fuzz_nix, fuzz_wire


@pytest.mark.parametrize("index", range(8))
def test_wire_parsers_short_run(tmp_path, index):
    rng = random.Random(1000 + index)
    name, make, check = fuzz_wire.plan(rng, tmp_path)[index]
    result = fuzz_wire.run(name, 400, rng, make, check)
    assert result["inputs"] == 400
    assert 0 < result["accepted"] < 400, result  # the mutations reach both outcomes


def test_nix_parsers_short_run(capsys):
    assert fuzz_nix.main(["--quick", "--seed", "7"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 6


def test_the_harness_fails_on_an_escape(capsys):
    def leaky(rng, data):
        raise TypeError("not one of ours")

    with pytest.raises(SystemExit) as stop:
        fuzz_wire.run("leaky", 3, random.Random(1), lambda: b"x", leaky)
    assert stop.value.code == 1 and "TypeError" in capsys.readouterr().err
