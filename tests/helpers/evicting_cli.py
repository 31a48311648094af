"""The real `p2pcache` CLI with the daemon's quota eviction planted at the worst moment of a local read.

Run as `P2PCACHE_EVICT_AT=<when> python tests/helpers/evicting_cli.py <p2pcache CLI args>` against a repo whose
daemon runs; used by tests/test_cli.py. Once, at <when>, the daemon evicts every unpinned root not being read
(`p2pcache gc --max-size 0`, which goes through the daemon, as the quota's own gc would run in it):

  resolve  right after the CLI's first `Repo.resolve` named the root
  check    right after the CLI's first `Repo.root_info` said the root is there, whole
"""

import os
import subprocess
import sys

from p2pcache.cli import main
from p2pcache.store.repo import Repo

WHEN = os.environ["P2PCACHE_EVICT_AT"]
_done = False


def _evict_once() -> None:
    global _done
    if not _done:
        _done = True
        subprocess.run([sys.executable, "-m", "p2pcache", "gc", "--max-size", "0"], check=True, capture_output=True)


_METHOD = {"resolve": "resolve", "check": "root_info"}[WHEN]
_original = getattr(Repo, _METHOD)


def _planted(self, *args, **kw):
    result = _original(self, *args, **kw)
    if _METHOD == "resolve" or getattr(result, "complete", False):
        _evict_once()
    return result


setattr(Repo, _METHOD, _planted)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
