"""Fleets that fetch one artifact: the program behind `fleet-fanout`, `partition-heal` and `bad-peer`.

Owns: placing the roles (seed: holds the artifact; runner: fetches it; passive: connected, fetches
nothing; bad: claims every block and misbehaves), the swarm's connections (each runner dials `degree`
random members; seeds are handed to runners as providers, as a DHT lookup would, and dialled on first
want), the phases (fetch, partition, heal), and the metrics, with the central-server baseline computed
beside the run: one server with the seed's uplink sending the artifact to every runner.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from p2pcache.content.chunking import MAX_BLOCK_SIZE
from p2pcache.exchange import ClientConfig, ServerConfig

from .core import Sim
from .exchange import ArchiveFetch, BitswapNode
from .links import Network, profile
from .metrics import Results, percentile
from .payload import SimBlockStore, build_artifact
from .scenario import ScenarioError

log = logging.getLogger(__name__)

__all__ = ["run_fleet"]


async def run_fleet(sim: Sim, sc: Any, results: Results) -> dict:
    p = sc.params
    rng = sim.rng_for("topology")
    if p["payload"] == "synthetic" and not 64 <= p.get("block_size", 1 << 20) <= MAX_BLOCK_SIZE:
        raise ScenarioError(f"block_size must be between 64 bytes and {MAX_BLOCK_SIZE >> 20} MiB, "
                            f"the largest chunk an archive manifest admits")
    art = build_artifact(p["artifact_size"], sim.seed, p["payload"], p.get("block_size", 1 << 20))
    wire = p.get("wire", "auto")
    if wire == "auto":
        wire = "bytes" if art.payload == "real" else "objects"
    log.info("artifact %s: %d bytes, %d chunks + %d manifest blocks, payload %s, wire %s",
             art.root, art.size, art.chunks, art.manifest_blocks, art.payload, wire)
    net = Network(sim)
    client_config = ClientConfig(**sc.params_with_prefix("client."))
    server_config = ServerConfig(max_outstanding_bytes=8 << 20, **sc.params_with_prefix("server."))
    nodes: dict[str, BitswapNode] = {}
    cids = {cid.buffer: cid for cid in art.blocks}  # one CID object per block for the whole fleet
    by_role: dict[str, list[str]] = {}
    for role in sc.roles:
        names = by_role.setdefault(role.name, [])
        for i in range(role.count):
            name = f"{role.name}-{i}"
            store = SimBlockStore(dict(art.blocks) if role.name in ("seed", "bad") else {})
            behaviour = role.extra.get("behaviour", "honest")
            config = server_config
            if role.name == "seed" and float(p.get("seed_superseed_window", 0)):
                config = replace(server_config, superseed_window=float(p["seed_superseed_window"]))
            node = BitswapNode(sim, net, name, store, wire=wire, client_config=client_config,
                               server_config=config, behaviour=behaviour, cids=cids)
            net.add(name, profile(role.link), node)
            nodes[name] = node
            names.append(name)
    seeds = by_role.get("seed", [])
    runners = by_role.get("runner", [])
    members = [n for r, ns in by_role.items() if r != "seed" for n in ns]
    degree = int(p.get("degree", 0))
    for r in runners:
        others = [m for m in members if m != r]
        for m in rng.sample(others, min(degree, len(others))):
            net.connect(r, m)
    for b in by_role.get("bad", []):  # a bad peer makes sure every runner meets it
        for r in runners:
            net.connect(r, b)

    fetches: dict[str, ArchiveFetch] = {}
    done: list[str] = []
    left: set[str] = set()  # runners that left during the run (a `leave` phase)

    def settled() -> bool:
        """Every runner finished or left (the two never overlap: only runners still fetching leave)."""
        return len(done) + len(left) >= len(runners)

    def finished(f: ArchiveFetch) -> None:
        done.append(f.node.name)
        if settled():
            sim.stop()

    def start_fetches() -> None:
        spread = float(p.get("start_spread", 0.0))
        for r in runners:
            delay = rng.random() * spread if spread else 0.0
            sim.after(delay, start_one, r)

    def start_one(r: str) -> None:
        if r in left:
            return
        fetches[r] = ArchiveFetch(nodes[r], art.root, providers=tuple(seeds), window=int(p["window"]),
                                  order=p["order"], rng=sim.rng_for(f"order/{r}"),
                                  retry_after=float(p.get("retry_after", 5.0)), on_done=finished)

    timeline: list[tuple[float, int]] = []  # (time, blocks stored by runners) for the figure
    partition_window: list[float] = []
    stored_at: dict[str, int] = {}

    def runner_blocks() -> int:
        return sum(nodes[r].counters.blocks_stored for r in runners)

    wanted_blocks = len(runners) * (art.chunks + art.manifest_blocks)

    def sample() -> None:
        timeline.append((sim.now(), runner_blocks()))
        if len(timeline) % 20 == 0:
            log.info("t=%.1f s: %d of %d runners done, %.1f %% of blocks stored", sim.now(), len(done),
                     len(runners), 100 * timeline[-1][1] / max(1, wanted_blocks))
        if not settled():
            sim.after(float(p.get("sample_every", 0.5)), sample)

    for phase in sc.phases:
        at = float(phase["at"])
        action = phase["action"]
        if action == "fetch":
            sim.at(at, start_fetches)
        elif action == "partition":
            isolated = set(by_role.get(phase.get("isolate", "seed"), []))
            rest = set(nodes) - isolated

            def cut(isolated=isolated, rest=rest) -> None:
                log.info("t=%.3f partition: %d nodes cut off", sim.now(), len(isolated))
                partition_window.append(sim.now())
                stored_at["partition"] = runner_blocks()
                stored_at["seed_sent_partition"] = sum(net.counters(s)["bytes_sent"] for s in seeds)
                net.partition([isolated, rest])
            sim.at(at, cut)
            heal_at = at + float(phase["duration"])

            def heal() -> None:
                log.info("t=%.3f heal", sim.now())
                partition_window.append(sim.now())
                stored_at["heal"] = runner_blocks()
                stored_at["seed_sent_heal"] = sum(net.counters(s)["bytes_sent"] for s in seeds)
                net.heal()
            sim.at(heal_at, heal)
        elif action == "leave":
            share = float(phase.get("fraction", 0.1))

            def churn(share=share) -> None:
                # Runners still fetching leave: their links and everything they held go with them.
                active = [r for r in runners if r not in left and (r not in fetches or fetches[r].done_at is None)]
                going = rng.sample(active, min(len(active), round(share * len(runners))))
                if going:
                    log.info("t=%.3f %d runners leave", sim.now(), len(going))
                for r in going:
                    left.add(r)
                    nodes[r].leave()
                    net.remove(r)
                if settled():
                    sim.stop()
            sim.at(at, churn)
        else:
            raise ValueError(f"fleet scenarios have phases fetch, partition and leave, not {action!r}")
    sim.at(0.0, sample)
    await sim.run(until=float(p.get("time_limit", 3600.0)))

    # -- metrics ------------------------------------------------------------------------------------
    seed_link = profile(sc.role("seed").link) if seeds else None
    runner_link = profile(sc.role("runner").link)
    times = [f.done_at - f.started_at for f in fetches.values() if f.done_at is not None and f.error is None]
    completed = len(times)
    kind = {"payload": art.payload, "wire": wire}
    results.add("runners", len(runners), "nodes", "none")
    results.add("artifact_size", art.size, "bytes", "none", blocks=art.chunks + art.manifest_blocks, **kind)
    staying = len(runners) - len(left)
    results.add("fetch_completed", completed / max(1, staying), "fraction", "higher",
                note="of the runners that stayed")
    results.add("runners_left", len(left), "nodes", "none")
    errors = [f.error for f in fetches.values() if f.error is not None]
    results.add("fetch_errors", len(errors), "runners", "lower", **({"first": errors[0]} if errors else {}))
    if errors:
        log.warning("%d runners failed; the first: %s", len(errors), errors[0])
    for q in (50, 90, 99, 100):
        results.add(f"fetch_time_p{q}", percentile(times, q), "s", "lower")
    path_latency = (seed_link.latency if seed_link else 0) + runner_link.latency
    rate = min(seed_link.up if seed_link else runner_link.down, runner_link.down)
    one = art.size / rate + 2 * path_latency
    central = len(runners) * art.size / (seed_link.up if seed_link else rate) + 2 * path_latency
    results.add("one_transfer_time", one, "s", "none", note="artifact size / min(seed uplink, runner downlink)")
    results.add("central_server_time", central, "s", "lower",
                note="baseline: one server with the seed's uplink sends the artifact to every runner")
    p99 = percentile(times, 99)
    results.add("p99_over_one_transfer", p99 / one if times else None, "ratio", "lower")
    results.add("p99_over_central_server", p99 / central if times else None, "ratio", "lower")
    seed_sent = sum(net.counters(s)["bytes_sent"] for s in seeds)
    results.add("seed_bytes_sent", seed_sent, "bytes", "lower")
    seed_stats = [nodes[s].server.stats() for s in seeds]
    results.add("seed_wants_refused", sum(st.superseed_refused for st in seed_stats), "wants", "none")
    results.add("seed_blocks_readmitted", sum(st.superseed_released_early for st in seed_stats), "blocks", "none",
                note="super-seeding: lendings ended before the window (the runner left, or cancelled first)")
    results.add("seed_upload_copies", seed_sent / art.size if art.size else 0, "artifacts", "lower")
    alive = net.nodes()
    results.add("bytes_sent", sum(net.counters(n)["bytes_sent"] for n in alive), "bytes", "none")
    results.add("bytes_received", sum(net.counters(n)["bytes_received"] for n in alive), "bytes", "none")
    results.add("messages", sum(net.counters(n)["messages_sent"] for n in alive), "messages", "lower")
    stats = [nodes[r].client.stats() for r in runners]
    results.add("duplicate_blocks", sum(s.duplicate_blocks for s in stats), "blocks", "lower")
    results.add("duplicate_bytes", sum(s.duplicate_bytes for s in stats), "bytes", "lower")
    results.add("want_timeouts", sum(s.timeouts for s in stats), "wants", "lower")
    results.add("fetch_failures_retried", sum(nodes[r].counters.fetch_failures for r in runners), "blocks", "lower")
    results.add("blocks_verified", sum(f.blocks for f in fetches.values()), "blocks", "none",
                how="sha-256 of bytes by message.decode" if wire == "bytes" else
                ("sha-256 by cid_of" if art.payload == "real" else "cid of synthetic descriptor"))
    penalised = sorted({peer for r in runners for peer, _ in nodes[r].penalised})
    results.add("peers_penalised", len(penalised), "peers", "none", peers=",".join(map(str, penalised)))
    if partition_window:
        results.add("partition_runner_blocks_during", stored_at.get("heal", 0) - stored_at.get("partition", 0),
                    "blocks", "none")
        results.add("partition_seed_bytes_during",
                    stored_at.get("seed_sent_heal", 0) - stored_at.get("seed_sent_partition", 0), "bytes", "none")
    results.series.update(times=sorted(times), one=one, central=central, timeline=timeline,
                          partition=partition_window, fetches=fetches, nodes=nodes, artifact=art, net=net)
    return results.series
