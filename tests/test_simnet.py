"""simnet: the link model in virtual time, and small scenarios running the real exchange engines and the
real ProviderQuery (each a few seconds of wall time)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from simnet.cli import main as simnet_main
from simnet.cli import run_scenario
from simnet.core import Sim, run_simulation
from simnet.fingerprint import ENGINE_RUNS as _ENGINE_RUNS
from simnet.links import MBIT, LinkProfile, Network
from simnet.payload import cid_of
from simnet.scenario import ScenarioError, load_scenario

SCENARIOS = Path(__file__).resolve().parent.parent / "simnet" / "scenarios"


class _Recorder:
    def __init__(self) -> None:
        self.got: list[tuple[float, object, object]] = []
        self.events: list[tuple[str, object]] = []

    def on_connected(self, peer):
        self.events.append(("up", peer))

    def on_disconnected(self, peer):
        self.events.append(("down", peer))

    def on_message(self, peer, payload):
        self.got.append((trio.current_time(), peer, payload))


def _two_nodes(sim: Sim, link: LinkProfile):
    net = Network(sim, handshake_rtts=0)
    a, b, c = _Recorder(), _Recorder(), _Recorder()
    net.add("a", link, a)
    net.add("b", link, b)
    net.add("c", link, c)
    net.connect("a", "b")
    net.connect("a", "c")
    return net, a, b, c


def test_delay_is_latency_plus_size_over_bandwidth_and_a_busy_uplink_is_shared():
    link = LinkProfile("t", latency=0.010, up=100 * MBIT, down=1000 * MBIT)

    async def main(sim: Sim):
        net, a, b, c = _two_nodes(sim, link)
        await sim.run()
        t0 = trio.current_time()
        net.send("a", "b", 1_250_000, "first")  # 0.1 s on a 100 Mbit/s uplink
        net.send("a", "c", 1_250_000, "second")  # queued behind it on the same uplink
        await sim.run()
        return t0, b.got, c.got

    t0, to_b, to_c = run_simulation(main, seed=1)
    assert to_b[0][2] == "first" and to_b[0][0] - t0 == pytest.approx(0.1 + 0.020)
    assert to_c[0][0] - t0 == pytest.approx(0.2 + 0.020)


def test_unlink_drops_in_flight_messages_and_relink_reconnects():
    link = LinkProfile("t", latency=0.010, up=100 * MBIT, down=100 * MBIT)

    async def main(sim: Sim):
        net, a, b, _ = _two_nodes(sim, link)
        await sim.run()
        net.send("a", "b", 1000, "lost")
        net.unlink("a", "b")
        sent_while_cut = net.send("a", "b", 1000, "refused")
        await sim.run()
        net.relink("a", "b")
        await sim.run()
        net.send("a", "b", 1000, "after")
        await sim.run()
        return sent_while_cut, b.got, b.events

    sent_while_cut, got, events = run_simulation(main, seed=1)
    assert not sent_while_cut
    assert [p for _, _, p in got] == ["after"]
    assert events == [("up", "a"), ("down", "a"), ("up", "a")]


def test_virtual_minutes_cost_no_wall_time():
    async def main(sim: Sim):
        fired = []
        for i in range(10):
            sim.at(60.0 * i, fired.append, i)
        await sim.run()
        return fired, trio.current_time()

    fired, now = run_simulation(main, seed=1)
    assert fired == list(range(10)) and now == pytest.approx(540.0)


def test_fanout_of_20_real_runners_verifies_every_block():
    results, series = run_scenario(str(SCENARIOS / "fleet-fanout.toml"), seed=3, overrides={
        "runners": "20", "artifact_size": "4MiB", "payload": "real", "degree": "4"})
    assert results.value("fetch_completed") == 1.0
    art = series["artifact"]
    for name, node in series["nodes"].items():
        if name.startswith("runner-"):
            assert node.store.blocks.keys() == art.blocks.keys()
            for cid, data in node.store.blocks.items():
                assert data == art.blocks[cid]
                assert cid_of(data, cid.codec) == cid  # sha-256 of the bytes held
    assert results.value("blocks_verified") == 20 * len(art.blocks)
    assert results.value("duplicate_blocks") >= 0
    # Runners served each other: the seed sent fewer bytes than a central server would have.
    assert results.value("seed_bytes_sent") < 20 * art.size


def test_synthetic_fanout_with_super_seeding_sends_about_one_copy_from_the_seed():
    results, _ = run_scenario(str(SCENARIOS / "fleet-fanout.toml"), seed=4, overrides={
        "runners": "30", "artifact_size": "32MiB", "seed_superseed_window": "10s", "retry_after": "0.2s", "degree": "6"})
    assert results.value("fetch_completed") == 1.0
    assert results.value("seed_upload_copies") < 1.2
    assert results.value("p99_over_central_server") < 0.5


def test_swarm_mode_fanout_beats_blind_asking_with_fewer_messages():
    """The scenario's defaults (swarm mode) against the engine as it asks by default (want-block to any
    connected peer, one by one): the same fleet, seed and artifact."""
    base = {"runners": "40", "artifact_size": "32MiB"}
    blind = {**base, "client.want_block_unproven": "true", "client.have_fanout": "2", "client.peer_window": "16",
             "client.cancel_delay": "0s", "client.dont_have_wait": "5s", "window": "64", "degree": "8"}
    swarm, _ = run_scenario(str(SCENARIOS / "fleet-fanout.toml"), seed=11, overrides=base)
    old, _ = run_scenario(str(SCENARIOS / "fleet-fanout.toml"), seed=11, overrides=blind)
    assert swarm.value("fetch_completed") == 1.0 and old.value("fetch_completed") == 1.0
    assert swarm.value("duplicate_blocks") == 0
    assert swarm.value("seed_upload_copies") < 1.1  # super-seeding: each block leaves the seed about once
    assert swarm.value("messages") < 0.5 * old.value("messages")
    assert swarm.value("fetch_time_p99") < old.value("fetch_time_p99")
    assert swarm.value("p99_over_central_server") < 0.2


def test_runners_leaving_mid_fetch_take_their_blocks_and_the_rest_still_complete():
    results, series = run_scenario(str(SCENARIOS / "fleet-fanout.toml"), seed=2, overrides={
        "runners": "40", "artifact_size": "64MiB", "leave_fraction": "0.25", "leave_at": "0.3s",
        "time_limit": "60s"})
    assert results.value("runners_left") == 10
    assert results.value("fetch_completed") == 1.0 and len(series["times"]) == 30
    # Some blocks had gone to leaving runners only: the seed handed those out again.
    assert results.value("seed_blocks_readmitted") > 0
    assert 1.0 < results.value("seed_upload_copies") < 1.5
    assert max(series["times"]) < 30  # recovered by HAVE from the seed, not by timeouts (dont_have_wait is 30 s)


def test_partition_stops_transfers_and_healing_resumes_them():
    results, series = run_scenario(str(SCENARIOS / "partition-heal.toml"), seed=5, overrides={
        "runners": "8", "artifact_size": "16MiB", "degree": "0", "partition_for": "15s"})
    assert results.value("partition_seed_bytes_during") == 0
    assert results.value("partition_runner_blocks_during") == 0
    assert results.value("fetch_completed") == 1.0
    cut, healed = series["partition"]
    assert healed - cut == pytest.approx(15.0)
    assert min(series["times"]) > healed  # nobody could finish while cut off


@pytest.mark.parametrize("behaviour", ["corrupt", "silent"])
def test_bad_peer_is_penalised_or_routed_around_and_the_fetch_completes(behaviour):
    results, series = run_scenario(str(SCENARIOS / "bad-peer.toml"), seed=6, overrides={
        "runners": "10", "artifact_size": "8MiB", "bad_behaviour": behaviour, "payload": "real"})
    assert results.value("fetch_completed") == 1.0
    if behaviour == "corrupt":
        assert results.value("peers_penalised") == 1
        assert all(("bad-0" in {p for p, _ in n.penalised}) for name, n in series["nodes"].items()
                   if name.startswith("runner-") and n.penalised)
    else:
        assert results.value("want_timeouts") > 0  # it never answered; the wants went elsewhere


def _deterministic(results):
    return [r for r in results.records() if not r.get("deterministic", True) is False]


def test_same_seed_gives_identical_metrics():
    args = (str(SCENARIOS / "fleet-fanout.toml"), 7, {"runners": "15", "artifact_size": "16MiB",
                                                      "seed_superseed_window": "10s", "retry_after": "0.2s"})
    first, _ = run_scenario(*args)
    second, _ = run_scenario(*args)
    assert _deterministic(first) == _deterministic(second)
    other, _ = run_scenario(args[0], 8, args[2])
    assert _deterministic(other) != _deterministic(first)


def test_dht_lookup_with_churn_finds_providers_and_is_deterministic():
    over = {"nodes": "120", "lookups": "100", "keys": "30", "lookup_phase": "2min", "churn": "0.1"}
    first, _ = run_scenario(str(SCENARIOS / "dht-lookup.toml"), 9, over)
    second, _ = run_scenario(str(SCENARIOS / "dht-lookup.toml"), 9, over)
    assert _deterministic(first) == _deterministic(second)
    assert first.value("churn_leaves") == 12
    assert first.value("lookup_success") >= 0.95
    assert first.value("rounds_median") <= 4


def test_scenario_parameters_are_typed_and_errors_are_one_line(tmp_path):
    sc = load_scenario(SCENARIOS / "fleet-fanout.toml", {"artifact_size": "2MiB", "start_spread": "250ms"})
    assert sc.params["artifact_size"] == 2 << 20 and sc.params["start_spread"] == pytest.approx(0.25)
    assert sc.role("runner").count == sc.params["runners"]
    with pytest.raises(ScenarioError, match="runners"):
        load_scenario(SCENARIOS / "fleet-fanout.toml", {"runners": "many"})
    with pytest.raises(ScenarioError, match="no parameter 'nope'"):
        load_scenario(SCENARIOS / "fleet-fanout.toml", {"nope": "1"})
    with pytest.raises(ScenarioError, match="payload must be one of"):
        load_scenario(SCENARIOS / "fleet-fanout.toml", {"payload": "imaginary"})
    for path in sorted(SCENARIOS.glob("*.toml")):
        load_scenario(path)  # every shipped scenario parses


def test_cli_prints_json_lines_with_unit_and_direction(capsys):
    code = simnet_main(["run", str(SCENARIOS / "bad-peer.toml"), "--seed", "1", "--set", "runners=4",
                        "--set", "artifact_size=2MiB"])
    assert code == 0
    import json
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert records and all({"metric", "value", "unit", "better"} <= r.keys() for r in records)
    assert all(r["better"] in ("lower", "higher", "none") for r in records)
    assert simnet_main(["run", str(tmp := SCENARIOS / "missing.toml")]) == 2 and not tmp.exists()


# Every engine scenario, small: `_ENGINE_RUNS` (file, overrides), from simnet.fingerprint, which runs them too.

_RUN_ALL = """
import json, sys
from simnet.cli import run_scenario
for name, over in json.loads(sys.argv[1]):
    results, _ = run_scenario(sys.argv[2] + "/" + name, 3, over)
    print(json.dumps([r for r in results.records() if r.get("deterministic", True) is not False]))
"""


def test_engine_scenarios_give_identical_metrics_under_different_hash_seeds():
    """Two processes, two PYTHONHASHSEEDs, one simnet seed: a set of str or CID keys iterated anywhere
    on the path (peer sets, partition groups, admission maps) shows up as a different history."""
    import json
    import os
    import subprocess
    import sys

    outs = []
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        proc = subprocess.run([sys.executable, "-c", _RUN_ALL, json.dumps(_ENGINE_RUNS), str(SCENARIOS)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append([json.loads(line) for line in proc.stdout.splitlines()])
    assert len(outs[0]) == len(_ENGINE_RUNS)
    for (name, over), first, second in zip(_ENGINE_RUNS, outs[0], outs[1]):
        assert first == second, f"{name} {over} differs between hash seeds"
        assert first, name


def test_dht_announce_batched_sweep_walks_per_region_and_every_key_is_found():
    """The real announcer's batched sweep over the simulated DHT, then every key looked up from a
    random node with the real ProviderFinder (the 10,000-key figure is in simnet/results/)."""
    results, _ = run_scenario(str(SCENARIOS / "dht-announce.toml"), seed=2, overrides={
        "nodes": "40", "keys": "400", "baseline_keys": "20", "join_interval": "0.05s"})
    assert results.value("sweep_keys_reached") == 1.0
    assert results.value("sweep_walks") <= 400 / 10  # regions, not keys
    assert results.value("sweep_add_providers") == 400 * 20
    assert results.value("lookup_found") >= 0.995
    assert results.value("sweep_time") < results.value("baseline_extrapolated_time") / 3
