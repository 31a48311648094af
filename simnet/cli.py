"""The `python -m simnet` command: run a scenario file, print its metrics as JSON lines.

    python -m simnet run simnet/scenarios/fleet-fanout.toml --seed 1 --set runners=100 --plot out.png
    python -m simnet show simnet/scenarios/dht-lookup.toml      # parameters, units, defaults
    python -m simnet profiles                                   # named link profiles

Results go to stdout, one JSON object per line; logs go to stderr. Wall time and peak RSS are reported
with `"deterministic": false`: they are the only records that differ between two runs of one seed, except
in programs that run real trio tasks (`node-fetch`), which mark every record that can vary the same way.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from typing import Any

from .core import run_simulation
from .links import PROFILES
from .metrics import Results
from .scenario import ScenarioError, load_scenario

__all__ = ["PROGRAMS", "main", "run_scenario"]

log = logging.getLogger("simnet")


def _programs() -> dict[str, Any]:
    from .announcesim import run_dht_announce
    from .dhtsim import run_dht_lookup
    from .fanout import run_fleet
    from .nodefetch import run_node_fetch
    return {"fleet": run_fleet, "dht-lookup": run_dht_lookup, "node-fetch": run_node_fetch,
            "dht-announce": run_dht_announce}


PROGRAMS = ("fleet", "dht-lookup", "node-fetch", "dht-announce")


def run_scenario(path: str, seed: int, overrides: dict[str, str] | None = None) -> tuple[Results, dict]:
    """Load and run a scenario; the metrics, and the program's raw series (for figures and tests)."""
    sc = load_scenario(path, overrides)
    programs = _programs()
    if sc.program not in programs:
        raise ScenarioError(f"{path}: unknown program {sc.program!r}; known: {', '.join(programs)}")
    results = Results(sc.name, seed)
    wall = time.perf_counter()
    cpu = time.process_time()

    async def main(sim):
        series = await programs[sc.program](sim, sc, results)
        # A program whose history is not a function of its seed (see `nodefetch`) says so in its series.
        nd = {} if series.get("deterministic", True) else {"deterministic": False}
        results.add("virtual_time", sim.now(), "s", "none", **nd)
        results.add("sim_events", sim.events_run, "events", "none", **nd)
        return series

    series = run_simulation(main, seed)
    results.add("wall_time", round(time.perf_counter() - wall, 3), "s", "lower", deterministic=False)
    results.add("cpu_time", round(time.process_time() - cpu, 3), "s", "lower", deterministic=False)
    results.add("peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "bytes", "lower",
                deterministic=False)
    return results, series


def _overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ScenarioError(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simnet", description="simulated p2pcache networks in virtual time")
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run a scenario; metrics as JSON lines on stdout")
    run.add_argument("scenario")
    run.add_argument("--seed", type=int, default=1)
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a parameter")
    run.add_argument("--plot", metavar="OUT.png", help="draw the scenario's main figure (needs matplotlib)")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")
    show = sub.add_parser("show", help="describe a scenario's parameters")
    show.add_argument("scenario")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sub.add_parser("profiles", help="list the named link profiles")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("p2pcache").setLevel(logging.WARNING)
    try:
        if args.cmd == "profiles":
            for p in PROFILES.values():
                print(json.dumps({"profile": p.name, "latency_s": p.latency, "up_bytes_per_s": p.up,
                                  "down_bytes_per_s": p.down, "jitter_s": p.jitter, "loss": p.loss}))
            return 0
        if args.cmd == "show":
            print(load_scenario(args.scenario, _overrides(args.set)).describe())
            return 0
        if args.plot:
            from .plot import check_available
            check_available()
        results, series = run_scenario(args.scenario, args.seed, _overrides(args.set))
        results.write(sys.stdout)
        if args.plot:
            from .plot import plot
            plot(results, series, args.plot)
            log.info("figure written to %s", args.plot)
        return 0
    except ScenarioError as e:
        print(f"simnet: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"simnet: {e}", file=sys.stderr)
        return 3
