"""The `dht-announce` program: one node announces many keys with the real `ProviderAnnouncer` over the
simulated DHT (`routingsim.SimDHT` on `hostsim` hosts), then random nodes look every key up with the
real `ProviderFinder`.

What runs, unchanged from production: `ProviderAnnouncer.sweep` (batched: `routing.sweep` plans the
key-space regions; one walk per region, driven by the real `ProviderQuery` inside `SimDHT`; every
peer's ADD_PROVIDERs on one stream) and `ProviderFinder.lookup`. Simulated: hosts and streams
(`hostsim`), the DHT's server side and RPC transport (`routingsim`).

Scenario: `nodes` hosts join one after another, each dialling up to `degree` earlier ones, and
bootstrap their tables with a self-walk. Node 0 announces `keys` keys (the CIDs of random roots) in one
sweep; beside it, as the same-run baseline, node 1 announces `baseline_keys` other keys the old way (one
`provide_key` walk per key, `concurrency` at once). After `settle`, `lookups` of the batched keys (all
of them by default) run from random nodes other than node 0, `lookup_concurrency` at a time; a lookup
counts as found when node 0 is among the providers it returns.

NOT deterministic, for the reason `nodefetch` gives (real trio tasks at one virtual instant): runs of
one seed agree closely but not exactly. Every record that can vary carries `"deterministic": false`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import trio

from p2pcache.content.cid import CID, DAG_CBOR
from p2pcache.routing import AnnouncerConfig, FinderConfig, ProviderAnnouncer, ProviderFinder

from .core import Sim
from .hostsim import LiveSim, SimSwarm
from .links import Network, profile
from .metrics import Results, percentile
from .routingsim import SimDHT, SimDHTConfig

log = logging.getLogger(__name__)

__all__ = ["run_dht_announce"]


async def run_dht_announce(sim: Sim, sc: Any, results: Results) -> dict:
    p = sc.params
    n, nkeys, nbase = int(p["nodes"]), int(p["keys"]), int(p["baseline_keys"])
    if n < 3:
        raise ValueError(f"need at least 3 nodes, not {n}")
    rng = sim.rng_for("dht-announce")
    live = LiveSim(sim.seed)
    swarm = SimSwarm(live, Network(live))
    link = profile(p["link"])
    dht_cfg = SimDHTConfig(k=int(p["k"]), alpha=int(p["alpha"]))
    dhts: list[SimDHT] = []
    nd = {"deterministic": False}
    async with trio.open_nursery() as nursery:
        await nursery.start(live.run)
        for i in range(n):
            boot = rng.sample([d.peer_id for d in dhts], min(int(p["degree"]), len(dhts)))
            host = swarm.add_host(link, bootstrap=boot)
            dht = SimDHT(host, dht_cfg)  # its handler exists before anyone dials
            await nursery.start(host.run)
            await nursery.start(dht.run)
            dhts.append(dht)
            await trio.sleep(float(p["join_interval"]))
        log.info("t=%.1f: %d nodes joined", trio.current_time(), n)

        def roots(count: int, tag: str) -> list[CID]:
            r = sim.rng_for(f"dht-announce/{tag}")
            return [CID.for_block(DAG_CBOR, r.randbytes(16)) for _ in range(count)]

        concurrency = int(p["concurrency"])
        batched = ProviderAnnouncer(dhts[0], AnnouncerConfig(concurrency=concurrency))
        batched_roots = roots(nkeys, "batched")
        for root in batched_roots:
            batched.add(root)
        baseline = ProviderAnnouncer(dhts[1], AnnouncerConfig(concurrency=concurrency, batched=False))
        for root in roots(nbase, "baseline"):
            baseline.add(root)

        t0, w0 = trio.current_time(), time.perf_counter()
        base_ok = await baseline.sweep()
        base_time, base_wall = trio.current_time() - t0, time.perf_counter() - w0
        log.info("baseline: %d keys one walk each in %.1f s virtual (%.1f s wall)", nbase, base_time, base_wall)

        t0, w0 = trio.current_time(), time.perf_counter()
        ok = await batched.sweep()
        sweep_time, sweep_wall = trio.current_time() - t0, time.perf_counter() - w0
        st = batched.stats
        log.info("batched: %d keys, %d walks, %d ADD_PROVIDERs in %.1f s virtual (%.1f s wall)",
                 nkeys, st.sweep_walks, st.sweep_add_providers, sweep_time, sweep_wall)
        await trio.sleep(float(p["settle"]))  # ADD_PROVIDER is fire-and-forget: let the last ones land

        finders: dict[int, ProviderFinder] = {}
        found = 0
        hops: list[int] = []
        limiter = trio.CapacityLimiter(int(p["lookup_concurrency"]))
        sample = batched_roots if int(p["lookups"]) <= 0 else rng.sample(batched_roots, min(int(p["lookups"]), nkeys))
        me = dhts[0].peer_id
        w1 = time.perf_counter()

        async def look(root: CID, at: int) -> None:
            nonlocal found
            async with limiter:
                finder = finders.get(at)
                if finder is None:
                    finder = finders[at] = ProviderFinder(dhts[at], FinderConfig(rpc_timeout=2.0))
                res = await finder.lookup(str(root), timeout=float(p["lookup_timeout"]))
                if any(info.peer_id == me for info in res.providers):
                    found += 1
                    if res.hops is not None:
                        hops.append(res.hops)

        async with trio.open_nursery() as lookups:
            for root in sample:
                lookups.start_soon(look, root, rng.randrange(1, n))
        lookup_wall = time.perf_counter() - w1
        live_events = live.events_run
        nursery.cancel_scope.cancel()

    rpcs = sum(f.stats.rpcs for f in finders.values())
    results.add("nodes", n, "nodes", "none", k=dht_cfg.k, alpha=dht_cfg.alpha)
    results.add("keys", nkeys, "keys", "none")
    results.add("sweep_time", sweep_time, "s", "lower", note="virtual time of the batched sweep", **nd)
    results.add("sweep_wall_time", round(sweep_wall, 3), "s", "lower", deterministic=False)
    results.add("sweep_keys_reached", ok / max(1, nkeys), "fraction", "higher", **nd)
    results.add("sweep_walks", st.sweep_walks, "walks", "lower", note="one per key-space region", **nd)
    results.add("sweep_add_providers", st.sweep_add_providers, "messages", "none", **nd)
    results.add("baseline_keys", nbase, "keys", "none", note="announced one walk per key, same network, same run")
    results.add("baseline_sweep_time", base_time, "s", "none", reached=base_ok, **nd)
    per_key = base_time / max(1, nbase)
    results.add("baseline_time_per_key", per_key, "s", "none", **nd)
    results.add("baseline_extrapolated_time", per_key * nkeys, "s", "none",
                note=f"baseline_time_per_key x {nkeys} keys (extrapolated, not run)", **nd)
    results.add("speedup_vs_per_key", per_key * nkeys / sweep_time if sweep_time else None, "ratio", "higher",
                **nd)
    results.add("lookups", len(sample), "lookups", "none")
    results.add("lookup_found", found / max(1, len(sample)), "fraction", "higher",
                note="node 0 among the providers a random other node's lookup returned", **nd)
    results.add("lookup_hops_median", percentile(hops, 50) if hops else None, "hops", "lower", **nd)
    results.add("lookup_rpcs_per_lookup", rpcs / max(1, len(sample)), "rpcs", "lower", **nd)
    results.add("lookup_wall_time", round(lookup_wall, 3), "s", "lower", deterministic=False)
    sim.events_run = live_events
    return {"deterministic": False, "dhts": dhts}
