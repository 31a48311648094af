"""A real p2pcache daemon that speaks /p2pcache/dag/1.0.0 badly (bitswap and everything else honest).

Run as `P2PCACHE_BAD_DAG=<mode> python tests/helpers/bad_dag_node.py <p2pcache CLI args>`; used by
tests/test_net_dagxfer.py. Modes:

  corrupt  the walk's blocks in order, the first raw one with a byte flipped
  order    the walk's blocks with the first two raw blocks swapped
  endless  the walk's blocks, then the last one again and again, never an end frame
  stall    the first block, then silence with the stream held open
  empty    claims the root (resolve, bitswap) but answers a DAG request with an immediate OK end
"""

import os
import sys

import trio

from p2pcache.content.cid import RAW
from p2pcache.net import dagxfer
from p2pcache.cli import main

MODE = os.environ["P2PCACHE_BAD_DAG"]


def _walk(server, roots, have, nodes_only):
    """The honest walk's blocks, as the real server would send them."""
    order = dagxfer.DfsOrder(roots, have, nodes_only)
    while (cid := order.peek()) is not None:
        data = server.source.get(cid)
        order.give(cid, data)
        yield cid, data


async def _bad_serve(self, stream, peer):
    roots, have, nodes_only = dagxfer.decode_request(await self._read_request(stream))
    blocks = list(_walk(self, roots, have, nodes_only))
    raws = [i for i, (c, _) in enumerate(blocks) if c.codec == RAW]
    if MODE == "corrupt" and raws:
        c, d = blocks[raws[0]]
        blocks[raws[0]] = (c, bytes([d[0] ^ 0xFF]) + d[1:])
    elif MODE == "order" and len(raws) >= 2:
        i, j = raws[0], raws[1]
        blocks[i], blocks[j] = blocks[j], blocks[i]
    elif MODE == "stall":
        await stream.write(dagxfer._block_frame(*blocks[0]))
        await trio.sleep_forever()
    elif MODE == "empty":
        await stream.write(dagxfer._end_frame(dagxfer.pb.DagEnd.OK))
        return
    await stream.write(b"".join(dagxfer._block_frame(c, d) for c, d in blocks))
    if MODE == "endless":
        last = dagxfer._block_frame(*blocks[-1])
        while True:
            await stream.write(last * 16)
    await stream.write(dagxfer._end_frame(dagxfer.pb.DagEnd.OK))


dagxfer.DagServer._serve = _bad_serve

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
