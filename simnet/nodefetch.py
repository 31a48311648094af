"""The `node-fetch` program: real `p2pcache.node.Node`s over simulated hosts, in virtual time.

What runs, unchanged from production: `Node` (composition, `fetch`, `add_file`, `_answer_resolve`), its
`Repo` on disk (SQLite index and block files in a temporary directory, one repo per node), the
`BitswapExchange` trio driver with the real client/server engines, `ProviderAnnouncer`,
`ProviderFinder` (driving the real `ProviderQuery`), and the resolve protocol (`ResolveServer` and the
`resolve` client). Simulated: the host and its streams (`simnet.hostsim`: bytes cross `simnet.links`
with latency, bandwidth, loss and partitions) and the DHT's server side and RPC transport
(`simnet.routingsim`, real kademlia.proto messages on simulated streams). Not run: TCP, Noise, Yamux,
multistream-select, identify, py-libp2p's KadDHT, the HTTP API (their handshakes are charged as round
trips, their framing as bytes).

Scenario: `nodes` nodes join one after another, each dialling up to `degree` earlier nodes; the first
`seeds` nodes add the same archive (seed-derived bytes, through `Node.add_file`) and announce it; after
`settle` the first `seeds_leaving` seeds stop, then every other node calls `Node.fetch("sha256:<hex>")`
at once. Each fetched archive is read back from the fetcher's repo and compared with the original's
sha256 and size.

Virtual time: the repo's worker-thread work runs inline (`hostsim.repo_work_inline`), so disk work
takes no virtual time and no timeout fires while it runs (a real node's disk is not modelled); the
repos skip fsync (`repos_without_fsync`), which costs wall time only.

NOT deterministic: identities, topology, artifact and link draws come from the seed, but the nodes are
real trio tasks, and trio orders tasks that wake at one virtual instant by things no seed fixes (a
random reversal of each scheduling batch drawn from OS entropy, `id()` tie-breaks between equal
deadlines, sets of tasks; Python's hash seed orders sets of peer ids on top). Which peer's message is
handled first then changes which peer serves which block. Measured: runs of one seed agree on every
count (successes, verified archives, lookups, bytes fetched) and differ by a few percent in timings and
in who served what (12 nodes, seed 1: fetch p50 3.5-3.9 s over 8 runs); seeding trio's scheduler and
fixing PYTHONHASHSEED narrowed but did not remove the spread. Every record that can vary carries
`"deterministic": false`; compare runs of this program as distributions, not as exact values.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import trio

from p2pcache.config import NodeConfig
from p2pcache.content.cid import CID
from p2pcache.errors import P2PCacheError
from p2pcache.node import Node
from p2pcache.routing import RESOLVE_PROTOCOL, ProviderFinder
from p2pcache.store.repo import Repo

from .core import Sim
from .hostsim import LiveSim, SimHost, SimSwarm, repo_work_inline
from .links import Network, profile
from .metrics import Results, percentile
from .routingsim import SimDHT, SimDHTConfig
from .scenario import parse_value

log = logging.getLogger(__name__)

__all__ = ["LAYERS", "NodeWorld", "archive_sha256", "repos_without_fsync", "run_node_fetch",
           "scratch_dir"]

LAYERS = ("ran: Node, Repo (SQLite+files), BitswapExchange driver, exchange engines, ProviderAnnouncer/Finder "
          "(ProviderQuery), resolve protocol; simulated: host/streams (simnet.hostsim), DHT server side and RPC "
          "transport (simnet.routingsim); not run: TCP, Noise, Yamux, multistream, identify, KadDHT, HTTP API")


def _noop(done: int, total: int | None) -> None:
    pass


def scratch_dir() -> tempfile.TemporaryDirectory:
    """A temporary directory for the nodes' repos: in `$SIMNET_TMPDIR`, else on /dev/shm when it is a
    writable tmpfs, else the system default. A repo creates over a thousand block directories, which
    on a disk file system costs about half a second of wall time per node to create and remove."""
    base = os.environ.get("SIMNET_TMPDIR")
    if base is None and os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        base = "/dev/shm"
    return tempfile.TemporaryDirectory(prefix="simnet-node-fetch-", dir=base)


@contextmanager
def repos_without_fsync() -> Iterator[None]:
    """Repos opened in the block skip fsync/syncfs (`P2PCACHE_FSYNC=0`): a simulation's repos live in a
    temporary directory, and flushing them costs wall time (seconds per run), never virtual time."""
    old = os.environ.get("P2PCACHE_FSYNC")
    os.environ["P2PCACHE_FSYNC"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["P2PCACHE_FSYNC"]
        else:
            os.environ["P2PCACHE_FSYNC"] = old


class NodeWorld:
    """Real Nodes on simulated hosts, each with its repo under `root`. Use inside `repo_work_inline()`
    and a trio run with a MockClock: `await nursery.start(world.run)` starts the event queue."""

    def __init__(self, seed: int, root: Path, *, handshake_rtts: float = 2.0,
                 dht_config: SimDHTConfig = SimDHTConfig(), node_config: NodeConfig | None = None) -> None:
        self.sim = LiveSim(seed)
        self.net = Network(self.sim, handshake_rtts=handshake_rtts)
        self.swarm = SimSwarm(self.sim, self.net)
        self.root = Path(root)
        self.dht_config = dht_config
        self.node_config = node_config or NodeConfig()
        self.nodes: list[Node] = []
        self.hosts: list[SimHost] = []  # the simulated host of each of `nodes` (its counters are simnet's)
        self.scopes: dict[int, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The event queue, and the nodes started later, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.sim.run)
            task_status.started(self)
            await trio.sleep_forever()

    async def start_node(self, link: str, bootstrap: Sequence[Node] = ()) -> Node:
        """A new Node (its repo in `root/node-<i>`) on a new simulated host, running once this returns."""
        assert self._nursery is not None, "start the world first"
        i = len(self.nodes)
        host = self.swarm.add_host(profile(link), bootstrap=[self.host_of(n).peer_id for n in bootstrap])
        node = Node(self.root / f"node-{i}", self.node_config, host=host, dht=SimDHT(host, self.dht_config),
                    serve_api=False)
        self.nodes.append(node)
        self.hosts.append(host)

        async def run_node(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as scope:
                self.scopes[i] = scope
                await node.run(task_status=task_status)

        await self._nursery.start(run_node)
        return node

    def host_of(self, node: Node) -> SimHost:
        return self.hosts[self.nodes.index(node)]

    def stop_node(self, node: Node) -> None:
        """The node stops (its host leaves the network, its repo is closed)."""
        self.scopes[self.nodes.index(node)].cancel()

    def stop(self) -> None:
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()


def exchange_overrides(sc: Any) -> dict[str, Any]:
    """The `node.superseed_window` / `node.swarm_fetch` parameters that are not "daemon" (the
    daemon's own [exchange] default, which the nodes otherwise run with), typed for `NodeConfig`."""
    kinds = {"superseed_window": "duration", "swarm_fetch": "bool", "transfer_protocol": "str",
             "have_batch_delay": "duration", "superseed_share": "int",
             "superseed_relay_window": "duration"}
    return {k: parse_value(kinds[k], v, f"{sc.path}: node.{k}")
            for k, v in sc.params_with_prefix("node.").items() if v != "daemon"}


def repo_of(node: Node) -> Repo:
    """A started node's repo (None only before `Node.run` opened it)."""
    assert node.repo is not None, "the node has not started"
    return node.repo


def finder_of(node: Node) -> ProviderFinder:
    assert node.finder is not None, "the node has not started"
    return node.finder


def archive_sha256(node: Node, root: CID) -> tuple[str, int]:
    """Read an archive back from a node's repo: its sha256 (hex) and size."""
    h = hashlib.sha256()
    size = 0
    for piece in repo_of(node).stream(root):
        h.update(piece)
        size += len(piece)
    return h.hexdigest(), size


async def run_node_fetch(sim: Sim, sc: Any, results: Results) -> dict:
    p = sc.params
    n = int(p["nodes"])
    seeds = int(p["seeds"])
    leaving = int(p["seeds_leaving"])
    if not 1 <= seeds < n or leaving >= seeds:
        raise ValueError(f"need 1 <= seeds < nodes and seeds_leaving < seeds (nodes={n}, seeds={seeds}, "
                         f"seeds_leaving={leaving})")
    link = sc.role("node").link
    fetcher_link = str(p.get("fetcher_link") or "") or link
    kill_at = float(p.get("kill_seed_at") or 0.0)
    if not 0.0 <= kill_at < 1.0:
        raise ValueError(f"kill_seed_at must be a fraction in [0, 1), got {kill_at}")
    rng = sim.rng_for("node-fetch")
    data = sim.rng_for("node-fetch/artifact").randbytes(int(p["artifact_size"]))
    sha = hashlib.sha256(data).hexdigest()
    alias = f"sha256:{sha}"
    config = NodeConfig(lookup_timeout=float(p["lookup_timeout"]), negative_ttl=float(p["negative_ttl"]),
                        **exchange_overrides(sc))
    records: list[dict] = []
    with scratch_dir() as tmp, repo_work_inline(), repos_without_fsync():
        world = NodeWorld(sim.seed, Path(tmp), dht_config=SimDHTConfig(k=int(p["k"])), node_config=config)
        async with trio.open_nursery() as nursery:
            await nursery.start(world.run)
            # Join: one after another, each dialling up to `degree` earlier nodes.
            join_every = float(p["join_interval"])
            for i in range(n):
                earlier = world.nodes[:]
                boot = rng.sample(earlier, min(int(p["degree"]), len(earlier)))
                await world.start_node(link if i < seeds else fetcher_link, boot)
                await trio.sleep(join_every)
            joined_at = trio.current_time()
            path = Path(tmp) / "artifact.bin"
            path.write_bytes(data)
            root = None
            for node in world.nodes[:seeds]:
                added = await node.add_file(str(path), "artifact.bin", _noop)
                root = added["root"]
            await trio.sleep_until(joined_at + float(p["settle"]))
            for node in world.nodes[:leaving]:
                world.stop_node(node)
            await trio.sleep(0.001)
            fetch_start = trio.current_time()

            async def fetch(node: Node) -> None:
                rec: dict[str, Any] = {"node": world.nodes.index(node)}
                t0 = trio.current_time()
                try:
                    res = await node.fetch(alias, _noop)
                    rec.update(ok=True, time=trio.current_time() - t0, root=res["root"], source=res["source"])
                except P2PCacheError as e:
                    rec.update(ok=False, time=trio.current_time() - t0, error=f"{type(e).__name__}: {e}")
                records.append(rec)

            killed: list[float] = []

            async def kill_a_seed() -> None:
                """Stop seed 0 once the first fetcher holds `kill_at` of the artifact."""
                watched, victim = world.nodes[seeds], world.nodes[leaving]
                base = repo_of(watched).stored_bytes()
                while repo_of(watched).stored_bytes() - base < kill_at * len(data):
                    await trio.sleep(0.05)
                world.stop_node(victim)
                killed.append(trio.current_time() - fetch_start)
                log.info("stopped seed %d at %.2fs", leaving, killed[-1])

            with trio.move_on_after(float(p["time_limit"])):
                async with trio.open_nursery() as fetches:
                    for node in world.nodes[seeds:]:
                        fetches.start_soon(fetch, node)
                    if kill_at > 0 and seeds - leaving >= 2:
                        killer = trio.CancelScope()

                        async def killing() -> None:
                            with killer:
                                await kill_a_seed()

                        fetches.start_soon(killing)

                        async def stop_killer_when_done() -> None:
                            while len(records) < n - seeds:
                                await trio.sleep(0.05)
                            killer.cancel()

                        fetches.start_soon(stop_killer_when_done)
            fetched_at = trio.current_time()
            verified = 0
            for rec in records:
                if rec.get("ok"):
                    node = world.nodes[rec["node"]]
                    try:
                        digest, size = archive_sha256(node, CID.parse(rec["root"]))
                        rec["verified"] = digest == sha and size == len(data)
                    except P2PCacheError as e:  # the repo's own check failed (CorruptData)
                        rec.update(verified=False, error=f"read back: {e}")
                    verified += rec["verified"]
            fetchers = world.nodes[seeds:]
            stats = [node.status() for node in fetchers]
            seed_served = sum(node.bytes_served for node in world.nodes[:seeds])
            seed_dag = sum(node.dag.stats.served_bytes for node in world.nodes[:seeds] if node.dag is not None)
            superseed_stops = sum(node.dag.stats.superseed_stops for node in world.nodes[:seeds] if node.dag is not None)
            all_served = sum(node.bytes_served for node in world.nodes)
            alive = world.net.nodes()
            net_bytes = sum(world.net.counters(x)["bytes_sent"] for x in alive)
            resolves = sum(world.host_of(node).accepted.get(RESOLVE_PROTOCOL, 0) for node in world.nodes[:seeds])
            world.stop()
    ok = [r for r in records if r.get("ok")]
    times = [r["time"] for r in ok]
    nd = {"deterministic": False}  # see the module docstring
    results.add("nodes", n, "nodes", "none", seeds=seeds, seeds_leaving=leaving)
    if kill_at > 0:
        results.add("seed_killed_at", killed[0] if killed else None, "s", "none", fraction=kill_at,
                    note="virtual time from the fetch start at which one seed stopped")
    results.add("artifact_size", len(data), "bytes", "none", root=str(root))
    results.add("layers", LAYERS, "text", "none")
    results.add("deterministic", False, "bool", "none",
                note="real trio tasks: runs of one seed agree on counts, timings vary by a few percent")
    results.add("fetch_success", len(ok) / max(1, len(fetchers)), "fraction", "higher", **nd)
    results.add("verified", verified, "archives", "higher", expected=len(fetchers),
                note="read back from each fetcher's repo, sha256 and size equal to the original", **nd)
    results.add("fetch_time_p50", percentile(times, 50), "s", "lower", **nd)
    results.add("fetch_time_p99", percentile(times, 99), "s", "lower", **nd)
    results.add("fetch_time_max", max(times) if times else float("nan"), "s", "lower", **nd)
    results.add("fetch_phase", fetched_at - fetch_start, "s", "lower", **nd)
    results.add("lookups_found", sum(finder_of(f).stats.found_dht + finder_of(f).stats.found_local for f in fetchers),
                "lookups", "higher", **nd)
    results.add("lookups_found_dht", sum(finder_of(f).stats.found_dht for f in fetchers), "lookups", "none", **nd,
                note="found by asking peers (the rest: in the fetcher's own provider store, hop 0)")
    results.add("lookups_total", sum(s["lookups"]["total"] for s in stats), "lookups", "none", **nd)
    results.add("lookup_rpcs", sum(s["lookups"]["rpcs"] for s in stats), "rpcs", "lower", **nd)
    results.add("resolve_requests", resolves, "requests", "none", note="resolve streams the seeds accepted", **nd)
    results.add("bytes_fetched", sum(s["bytes_fetched"] for s in stats), "bytes", "none", **nd)
    results.add("seed_bytes_served", seed_served, "bytes", "none", **nd)
    results.add("seed_bytes_served_dag", seed_dag, "bytes", "none", **nd,
                note="of seed_bytes_served, the bytes the seeds sent over the DAG protocol (the rest: bitswap)")
    results.add("seed_superseed_stops", superseed_stops, "streams", "none", **nd,
                note="DAG streams the seeds ended at a leaf lent to another peer (super-seeding)")
    results.add("seed_share", seed_served / max(1, all_served), "fraction", "lower", **nd,
                note="of all bytes served (bitswap and DAG), the share the seeds served")
    # The fleet goals: p99 against one unshared transfer over this link, and copies the seeds uploaded.
    lp = profile(link)
    one = len(data) / min(lp.up, lp.down) + 2 * 2 * lp.latency
    results.add("one_transfer_time", one, "s", "none", note="artifact size / link rate + 2 RTT")
    results.add("p99_over_one_transfer", percentile(times, 99) / one if times else None, "ratio", "lower", **nd)
    results.add("seed_upload_copies", seed_served / max(1, len(data)), "artifacts", "lower", **nd,
                note="bytes the seeds served (bitswap and DAG) / artifact size")
    results.add("duplicate_blocks", sum(s["duplicate_blocks"] for s in stats), "blocks", "lower", **nd)
    results.add("net_bytes_sent", net_bytes, "bytes", "lower", note="sent by the nodes still on the network",
                **nd)
    sim.events_run = world.sim.events_run
    failures = [r for r in records if not r.get("ok")]
    for r in failures[:5]:
        log.warning("node %d: fetch failed after %.2fs: %s", r["node"], r["time"], r["error"])
    return {"fetches": sorted(records, key=lambda r: r["node"]), "fetch_start": fetch_start,
            "deterministic": False}
