"""A real p2pcache daemon that runs a gc — the one `p2pcache gc` asks for (`Node.gc`, through the quota's
guard) — at the instant a fetched archive, NAR or prefetched dependency is about to be checked and
registered, between the fetch's last block and the root that claims its blocks. The registration goes on once that gc has either finished or is seen
waiting for the operations it must not cut (deterministic: no sleeps decide it). Each injection logs one
line "gc at claim: <what>: <ran|waited>".

Run as `python tests/helpers/gc_at_claim.py <p2pcache CLI args>`; used by tests/test_node_fetch.py and tests/test_prefetch.py."""

import logging
import sys

import trio

from p2pcache import node, prefetch
from p2pcache.cli import main
from p2pcache.nixcache import sources

log = logging.getLogger("p2pcache.test.gc_at_claim")
NODES: list = []

_init = node.Node.__init__


def _recording_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    NODES.append(self)


async def _gc_now(what: str) -> None:
    """Start a gc beside the caller; return once it ran to its end or waits for the caller to end."""
    n = NODES[0]
    ended = trio.Event()

    async def gc() -> None:
        try:
            await n.gc(None)
        finally:
            ended.set()

    trio.lowlevel.spawn_system_task(gc)
    quota = n.quota
    while not ended.is_set() and not (quota._lock.locked() and quota._busy):  # (the gc holds the lock)
        await trio.sleep(0.005)
    log.warning("gc at claim: %s: %s", what, "ran" if ended.is_set() else "waited")


_register_nar = sources.RepoSource.register_nar


def _register_nar_after_gc(self, root, narinfo):  # on a worker thread (`to_thread`)
    trio.from_thread.run(_gc_now, f"nar {root}")
    return _register_nar(self, root, narinfo)


_claim_fetched = node.Node._claim_fetched


async def _claim_fetched_after_gc(self, root, *args, **kwargs):
    await _gc_now(f"archive {root}")
    return await _claim_fetched(self, root, *args, **kwargs)


_verify_fetched = prefetch.Prefetcher._verify_fetched


def _verify_fetched_after_gc(self, dep, root):  # on a worker thread (`to_thread`)
    trio.from_thread.run(_gc_now, f"prefetched {root}")
    return _verify_fetched(self, dep, root)


node.Node.__init__ = _recording_init
sources.RepoSource.register_nar = _register_nar_after_gc
node.Node._claim_fetched = _claim_fetched_after_gc
prefetch.Prefetcher._verify_fetched = _verify_fetched_after_gc

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
