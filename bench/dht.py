"""Provider lookups over real py-libp2p hosts on loopback: p2pcache's ProviderFinder against py-libp2p's
own `KadDHT.find_providers` (the baseline) on the same swarm, in the same run.

The swarm: N nodes bootstrapped as a chain (each dials the previous one), DHTs under /p2pcache/kad/1.0.0
with py-libp2p's table refresh on (as a node runs). P providers each announce K roots (CID + sha256 +
sha512 aliases); then from M seekers chosen far along the chain, every alias is looked up by both
implementations, and M lookups of absent keys measure misses.

Prints a table on stderr and JSON lines on stdout: {"bench", "metric", "value", "unit", "better", ...}.
    .venv/bin/python bench/dht.py --nodes 20 --roots 5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pcache.content.cid import CID, DAG_CBOR  # noqa: E402
from p2pcache.net.host import HostConfig, NodeHost  # noqa: E402
from p2pcache.routing import DHT, DHTConfig, FinderConfig, ProviderAnnouncer, ProviderFinder, dht_key  # noqa: E402


def emit(metric: str, value: float, unit: str, better: str, **extra) -> None:
    print(json.dumps({"bench": "dht", "metric": metric, "value": round(value, 4), "unit": unit,
                      "better": better, **extra}), flush=True)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="p2pcache-bench-dht-"))
    async with trio.open_nursery() as nursery:
        t0 = time.perf_counter()
        hosts, dhts = [], []
        for i in range(args.nodes):
            host = NodeHost(HostConfig(identity=tmp / f"n{i}.key", listen=("/ip4/127.0.0.1/tcp/0",)))
            dht = DHT(host, DHTConfig(refresh=not args.sparse))  # handler registered before any connection
            await nursery.start(host.run)
            if i:
                await host.connect(hosts[i - 1].addrs()[0])
            await nursery.start(dht.run)
            hosts.append(host)
            dhts.append(dht)
        setup = time.perf_counter() - t0
        print(f"{args.nodes} nodes up in {setup:.1f}s; routing tables: "
              f"{[d.kad.get_routing_table_size() for d in dhts]}", file=sys.stderr)

        aliases = []
        t0 = time.perf_counter()
        for p in range(args.providers):
            announcer = ProviderAnnouncer(dhts[p])
            for r in range(args.roots):
                data = b"bench root %d/%d" % (p, r)
                root = CID.for_block(DAG_CBOR, data)
                more = ["sha256:" + hashlib.sha256(data).hexdigest(), "sha512:" + hashlib.sha512(data).hexdigest()]
                announcer.add(root, more)
                aliases += [(str(root), dhts[p].peer_id)] + [(a, dhts[p].peer_id) for a in more]
            await nursery.start(announcer.run)
        announce = time.perf_counter() - t0
        await trio.sleep(0.5)  # ADD_PROVIDER is fire-and-forget
        emit("announce_seconds_per_key", announce / len(aliases), "s", "lower", keys=len(aliases))

        seekers = list(range(args.nodes - args.seekers, args.nodes))
        ours: dict[str, list] = {"lat": [], "hops": [], "asked": [], "ok": 0}
        base: dict[str, list] = {"lat": [], "ok": 0}
        for s in seekers:
            finder = ProviderFinder(dhts[s], FinderConfig())
            for alias, provider in aliases:
                key = dht_key(alias)
                # drop what earlier lookups cached locally so every lookup goes to the network
                dhts[s].kad.provider_store.providers.pop(key, None)
                r = await finder.lookup(alias, timeout=args.timeout)
                ours["lat"].append(r.elapsed)
                if provider in [p.peer_id for p in r.providers]:
                    ours["ok"] += 1
                    ours["hops"].append(r.hops)
                    ours["asked"].append(r.asked)
                dhts[s].kad.provider_store.providers.pop(key, None)
                t = time.perf_counter()
                with trio.move_on_after(args.timeout):
                    got = await dhts[s].kad.provider_store.find_providers(key)
                    if provider in [p.peer_id for p in got]:
                        base["ok"] += 1
                base["lat"].append(time.perf_counter() - t)
                dhts[s].kad.provider_store.providers.pop(key, None)
        n = len(seekers) * len(aliases)
        miss_lat, miss_asked, neg_lat = [], [], []
        for s in seekers:
            finder = ProviderFinder(dhts[s], FinderConfig())
            for i in range(args.misses):
                alias = "sha256:" + hashlib.sha256(b"absent %d %d" % (s, i)).hexdigest()
                r = await finder.lookup(alias, timeout=args.timeout)
                miss_lat.append(r.elapsed)
                miss_asked.append(r.asked)
                t = time.perf_counter()
                r2 = await finder.lookup(alias, timeout=args.timeout)
                assert r2.source == "negative-cache"
                neg_lat.append(time.perf_counter() - t)

        emit("lookup_success", ours["ok"] / n, "ratio", "higher", impl="p2pcache", lookups=n)
        emit("lookup_success", base["ok"] / n, "ratio", "higher", impl="py-libp2p", lookups=n)
        emit("lookup_p50", statistics.median(ours["lat"]) * 1000, "ms", "lower", impl="p2pcache")
        emit("lookup_p50", statistics.median(base["lat"]) * 1000, "ms", "lower", impl="py-libp2p")
        emit("lookup_p90", pct(ours["lat"], 0.9) * 1000, "ms", "lower", impl="p2pcache")
        emit("lookup_p90", pct(base["lat"], 0.9) * 1000, "ms", "lower", impl="py-libp2p")
        emit("lookup_p50_ratio", statistics.median(ours["lat"]) / statistics.median(base["lat"]), "ratio", "lower",
             note="p2pcache / py-libp2p, same swarm, same keys")
        if ours["hops"]:
            emit("lookup_hops_mean", statistics.mean(ours["hops"]), "hops", "lower", max=max(ours["hops"]))
            emit("lookup_rpcs_mean", statistics.mean(ours["asked"]), "rpcs", "lower")
        emit("miss_p50", statistics.median(miss_lat) * 1000, "ms", "lower", rpcs_mean=statistics.mean(miss_asked))
        emit("miss_repeat_p50", statistics.median(neg_lat) * 1e6, "us", "lower", note="negative cache")
        print(f"p2pcache: {ours['ok']}/{n} found, p50 {statistics.median(ours['lat'])*1000:.0f} ms, "
              f"p90 {pct(ours['lat'], 0.9)*1000:.0f} ms, hops {statistics.mean(ours['hops'] or [0]):.2f} "
              f"(max {max(ours['hops'] or [0])}), rpcs {statistics.mean(ours['asked'] or [0]):.1f}\n"
              f"py-libp2p: {base['ok']}/{n} found, p50 {statistics.median(base['lat'])*1000:.0f} ms, "
              f"p90 {pct(base['lat'], 0.9)*1000:.0f} ms\n"
              f"misses: p50 {statistics.median(miss_lat)*1000:.0f} ms ({statistics.mean(miss_asked):.1f} rpcs), "
              f"repeat from negative cache p50 {statistics.median(neg_lat)*1e6:.0f} us", file=sys.stderr)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--providers", type=int, default=2)
    ap.add_argument("--roots", type=int, default=5, help="roots per provider (3 aliases each)")
    ap.add_argument("--seekers", type=int, default=3)
    ap.add_argument("--misses", type=int, default=5, help="absent keys looked up per seeker")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--sparse", action="store_true", help="no table refresh: routing tables hold neighbours only")
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    trio.run(main, ap.parse_args())
