"""The Nix binary cache's Prometheus counters (`GET /metrics` renders them, with the node's own
collectors that node.py registers on the same registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.narinfo = Counter("p2pcache_narinfo_requests", "narinfo requests by outcome and source",
                               ["result", "source"], registry=r)
        self.served = Counter("p2pcache_bytes_served", "bytes served over HTTP by where they came from",
                              ["source"], registry=r)
        self.fetched = Counter("p2pcache_bytes_fetched", "bytes brought into the repo by where they came from",
                               ["source"], registry=r)
        self.uploads = Counter("p2pcache_uploads", "PUT requests by kind and result", ["kind", "result"], registry=r)
        self.lookup = Histogram("p2pcache_lookup_seconds", "narinfo lookup latency by outcome", ["result"],
                                registry=r, buckets=(.001, .005, .01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.mirror = Counter("p2pcache_hashed_mirror_requests", "hashed-mirror requests by outcome", ["result"],
                              registry=r)
        self.negative_hits = Counter("p2pcache_narinfo_negative_cache_hits",
                                     "narinfo misses answered from the negative cache", registry=r)
        self.disk_full = Counter("p2pcache_disk_full", "operations that failed because the disk was full",
                                 ["operation"], registry=r)
        self.busy = Counter("p2pcache_http_busy", "requests answered 503 because streams or uploads were at "
                            "their cap", ["kind"], registry=r)
        self.lookahead = Counter("p2pcache_narinfo_lookahead", "references of a served narinfo looked up "
                                 "before Nix asked, by outcome", ["result"], registry=r)
        self.lookup_failures = Counter("p2pcache_narinfo_lookup_failures",
                                       "swarm lookups where providers existed but none answered validly in "
                                       "time (answered 404, not remembered as a miss)", registry=r)

        self.still_looking = Counter("p2pcache_narinfo_still_looking",
                                     "requests answered 503 because their remote lookup was still under way "
                                     "after nix.lookup_wait (it went on; Nix retries)", registry=r)
        self.unsettled = Counter("p2pcache_narinfo_lookups_unsettled",
                                 "remote lookups that ended without a settled answer (a source failed or "
                                 "did not finish; answered 404, not remembered as a miss)", registry=r)
        self.retries = Counter("p2pcache_narinfo_lookup_retries", "remote lookups asked again within "
                               "nix.lookup_patience because their sources did not settle", registry=r)
        self.fetch_retries = Counter("p2pcache_nar_fetch_retries", "NAR fetches from peers tried again (resuming) "
                                     "after an attempt failed while its response was under way", registry=r)
        self.prefetches = Counter("p2pcache_nar_prefetches", "NAR fetches begun when Nix got a narinfo from the "
                                  "swarm, by what became of them (started, taken by the NAR request, skipped "
                                  "over the bounds, failed, expired unasked)", ["result"], registry=r)
        self.pending = Gauge("p2pcache_narinfo_pending", "answers found in the swarm or upstreams waiting for "
                             "their NAR request (at most nix.pending_ttl seconds)", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
