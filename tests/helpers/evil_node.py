"""A real p2pcache daemon whose block source lies: every block it sends, over bitswap or the DAG stream, has
one byte flipped.

Run as `python tests/helpers/evil_node.py <p2pcache CLI args>`; used by tests/test_swarm.py."""

import sys

from p2pcache import node
from p2pcache.cli import main

_honest_get = node._CountingSource.get
_honest_read_many = node._CountingSource._read_many


def _flip(data):
    if data is None or not data:
        return data
    return bytes([data[0] ^ 0xFF]) + data[1:]


def _corrupting_get(self, cid):
    return _flip(_honest_get(self, cid))


def _corrupting_read_many(self, cids):  # a DAG stream's runs (`get_many`)
    return [_flip(d) for d in _honest_read_many(self, cids)]


node._CountingSource.get = _corrupting_get
node._CountingSource._read_many = _corrupting_read_many

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
