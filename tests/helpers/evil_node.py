"""A real p2pcache daemon whose bitswap server lies: every block it sends has one byte flipped.

Run as `python tests/helpers/evil_node.py <p2pcache CLI args>`; used by tests/test_swarm.py."""

import sys

from p2pcache import node
from p2pcache.cli import main

_honest_get = node._CountingSource.get


def _corrupting_get(self, cid):
    data = _honest_get(self, cid)
    if data is None or not data:
        return data
    return bytes([data[0] ^ 0xFF]) + data[1:]


node._CountingSource.get = _corrupting_get

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
