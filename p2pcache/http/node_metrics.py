"""Node-wide Prometheus metrics, read from the node's own counters at scrape time.

Owns: turning the counters the node already keeps (host, repo, bitswap client and server, DHT finder
and announcer, quota keeper) into metric families. It must not count anything itself — a counter
kept here would drift from the one `p2pcache status` shows.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class NodeCollector(Collector):
    def __init__(self, node: Any) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        host, repo = node.host, node.repo
        if host is not None:
            yield GaugeMetricFamily("p2pcache_peers_connected", "peers with an open connection",
                                    value=len(host.connected_peers()))
        if repo is not None:
            yield GaugeMetricFamily("p2pcache_repo_bytes", "bytes of stored blocks", value=repo.stored_bytes())
            yield GaugeMetricFamily("p2pcache_repo_blocks", "stored blocks", value=repo.index.block_count())
            roots = repo.index.list_roots()
            g = GaugeMetricFamily("p2pcache_repo_roots", "archives and NARs in the repo", labels=["state"])
            g.add_metric(["complete"], sum(1 for r in roots if r.complete))
            g.add_metric(["incomplete"], sum(1 for r in roots if not r.complete))
            g.add_metric(["pinned"], sum(1 for r in roots if r.pinned))
            yield g
        quota = node.config.max_size
        yield GaugeMetricFamily("p2pcache_repo_quota_bytes", "disk quota for stored blocks (0: none)",
                                value=quota or 0)
        q = node.quota.stats
        yield CounterMetricFamily("p2pcache_gc_roots_evicted", "archives evicted to keep under the quota",
                                  value=q.roots_evicted)
        yield CounterMetricFamily("p2pcache_gc_bytes_freed", "bytes freed by quota gc", value=q.bytes_freed)
        yield CounterMetricFamily("p2pcache_fetches_refused_quota", "fetches refused: they would not fit",
                                  value=q.refused)

        blocks = CounterMetricFamily("p2pcache_bitswap_blocks", "bitswap blocks by direction and kind",
                                     labels=["direction", "kind"])
        nbytes = CounterMetricFamily("p2pcache_bitswap_bytes", "bitswap block bytes by direction and kind",
                                     labels=["direction", "kind"])
        if node.source is not None:
            blocks.add_metric(["sent", "unique"], node.source.blocks_served)
            nbytes.add_metric(["sent", "unique"], node.source.bytes_served)
        if node.exchange is not None:
            st = node.exchange.client.stats()
            blocks.add_metric(["received", "unique"], st.blocks_received)
            blocks.add_metric(["received", "duplicate"], st.duplicate_blocks)
            nbytes.add_metric(["received", "unique"], st.bytes_received)
            nbytes.add_metric(["received", "duplicate"], st.duplicate_bytes)
        yield blocks
        yield nbytes
        dag = getattr(node, "dag", None)
        if dag is not None:  # whole-DAG streams (/p2pcache/dag/1.0.0); what they serve is in the sent counts above
            t = dag.stats
            dblocks = CounterMetricFamily("p2pcache_dag_blocks", "DAG-transfer blocks received by kind",
                                          labels=["kind"])
            dbytes = CounterMetricFamily("p2pcache_dag_bytes", "DAG-transfer block bytes received by kind",
                                         labels=["kind"])
            dblocks.add_metric(["unique"], t.blocks)
            dblocks.add_metric(["duplicate"], t.duplicate_blocks)
            dbytes.add_metric(["unique"], t.bytes)
            dbytes.add_metric(["duplicate"], t.duplicate_bytes)
            yield dblocks
            yield dbytes

        if node.finder is not None:
            f = node.finder.stats
            c = CounterMetricFamily("p2pcache_dht_lookups", "provider lookups by outcome", labels=["result"])
            c.add_metric(["found_local"], f.found_local)
            c.add_metric(["found_dht"], f.found_dht)
            c.add_metric(["miss"], f.misses - f.timeouts)
            c.add_metric(["timeout"], f.timeouts)
            c.add_metric(["negative_cache"], f.negative_hits)
            yield c
            yield CounterMetricFamily("p2pcache_dht_rpcs", "DHT RPCs sent by lookups", value=f.rpcs)
        if node.announcer is not None:
            a = node.announcer.stats
            c = CounterMetricFamily("p2pcache_dht_announcements", "provider announcements by outcome",
                                    labels=["result"])
            c.add_metric(["provided"], a.provided)
            c.add_metric(["failed"], a.failed)
            c.add_metric(["withdrawn"], a.withdrawn)
            yield c
            yield GaugeMetricFamily("p2pcache_dht_announced_keys", "keys this node announces",
                                    value=len(node.announcer.announcements.keys()))
        cache = getattr(node, "buildcache", None)
        if cache is not None:
            b = cache.stats
            c = CounterMetricFamily("p2pcache_buildcache_requests", "build-cache saves and restores by outcome",
                                    labels=["result"])
            for result in ("saves", "restores_exact", "restores_prefix", "misses"):
                c.add_metric([result], getattr(b, result))
            yield c
            yield CounterMetricFamily("p2pcache_buildcache_records_ignored",
                                      "key records refused by the trust policy or too old", value=b.records_ignored)
            yield CounterMetricFamily("p2pcache_buildcache_trees_fetched", "trees fetched from peers for restores",
                                      value=b.trees_fetched)
            yield CounterMetricFamily("p2pcache_buildcache_bytes_fetched", "bytes fetched from peers for restores",
                                      value=b.bytes_fetched)
            yield CounterMetricFamily("p2pcache_buildcache_expired", "saved trees evicted as idle", value=b.expired)
            yield CounterMetricFamily("p2pcache_buildcache_files_by_descriptor",
                                      "saved files a local saver handed over as open descriptors (REPO/files.sock)",
                                      value=b.files_by_descriptor)


def register_node_metrics(registry: Any, node: Any) -> None:
    """The node's families and the standard process collector (CPU, RSS, open fds, start time)."""
    from prometheus_client import ProcessCollector

    registry.register(NodeCollector(node))
    ProcessCollector(registry=registry)
