"""A real p2pcache daemon with bugs planted in three of the node's API operations, to see how the API answers
failures that are not our own errors.

    gc          raises RuntimeError (a plain JSON route)
    fetch       reports progress, then raises KeyError (an NDJSON route, after its 200 went out)
    set_pinned  raises an ExceptionGroup around a NotFound (what a nursery inside an operation raises)

Run as `python tests/helpers/buggy_node.py <p2pcache CLI args>`; used by tests/test_api_errors.py."""

import sys

import trio

from p2pcache import node
from p2pcache.cli import main
from p2pcache.errors import NotFound


async def _gc(self, max_size):
    raise RuntimeError("planted bug in gc")


async def _fetch(self, key, progress):
    progress(1, 10)
    await trio.sleep(0.2)  # let the progress line reach the client first
    raise KeyError("planted bug in fetch")


async def _set_pinned(self, key, pinned):
    raise ExceptionGroup("from a nursery", [NotFound(f"{key}: no such archive here (planted)")])


node.Node.gc = _gc
node.Node.fetch = _fetch
node.Node.set_pinned = _set_pinned

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
