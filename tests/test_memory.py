"""memory.keep_heap: the daemon's big buffers stay in the heap from one request to the next."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

# What an upload does to the heap, in small: a few 1 MiB joins alive at once (aio.feed_thread's batches),
# all freed, again. The minor page faults of the later rounds are pages handed back and faulted in again.
CHURN = r"""
import json, resource, sys
if sys.argv[1] == "keep":
    from p2pcache.memory import keep_heap
    assert keep_heap()
def round_():
    live = [b"x" * (1 << 20) for _ in range(6)]  # written: every page touched
    del live
for _ in range(5):
    round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    round_()
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def churn_faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", CHURN, mode], env=env, capture_output=True, check=True, timeout=60)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_kept_heap_is_not_faulted_in_again():
    pages = 40 * 6 * (1 << 20) // 4096  # what the 40 rounds touch
    default = churn_faults("default")
    kept = churn_faults("keep")
    assert default > pages // 2  # glibc's defaults hand the freed top back: the churn this guards against
    assert kept < pages // 50


def test_environment_wins(monkeypatch):
    from p2pcache.memory import keep_heap

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert keep_heap() is False


@pytest.mark.parametrize("tunables", ["glibc.malloc.trim_threshold=131072", "glibc.malloc.tcache_count=0:glibc.malloc.mmap_threshold=65536"])
def test_glibc_tunables_win(monkeypatch, tunables):
    from p2pcache.memory import keep_heap

    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", tunables)
    assert keep_heap() is False


def test_unrelated_glibc_tunables_do_not_stop_it(monkeypatch):
    from p2pcache.memory import _set_by_operator

    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0")
    assert _set_by_operator() is False
