"""nix/build-cache.nix with real Nix (nix-bin 2.8): one derivation built on two stores, each the store of a
runner with its own daemon; the second build restores the first one's build directory through the swarm
and recompiles only the changed file. Builds run with sandbox = false (the function's documented limit)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .helpers.daemons import start_daemon
from .test_buildcache_make import MAKEFILE, write_project

ROOT = Path(__file__).resolve().parent.parent
NIX_CONFIG = "experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nsubstituters =\n"

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

EXPR = """
let
  buildCache = import {fn} {{ node = "{api}"; netrcFile = "{netrc}"; }};
  attrs = {{
    name = "cached-app";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    src = {src};
    args = [ "-c" ''
      set -e
      cp -r $src/. . && chmod -R u+w .
      eval "$preConfigure"
      make -s CC=$PWD/cc-count
      eval "$preInstall"
      mkdir -p $out && cp build/app cc.log $out/
    '' ];
  }};
in derivation (buildCache {{ key = "{key}"; fallbackKey = "main/app-"; }} attrs)
"""


def nix_build(tmp: Path, store: str, expr: str) -> Path:
    if shutil.which("nix-build") is None:
        pytest.fail("real Nix is required: apt-get install -y nix-bin (CI does this in .ci/run)", pytrace=False)
    env = dict(os.environ, NIX_CONFIG=NIX_CONFIG, HOME=str(tmp / "home"), XDG_CACHE_HOME=str(tmp / "home" / "cache"))
    f = tmp / f"{store}.nix"
    f.write_text(expr)
    s = tmp / store
    spec = f"local?store={s}/store&state={s}/state&log={s}/log"
    proc = subprocess.run(["nix-build", "--store", spec, "--no-out-link", str(f)], env=env, capture_output=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return Path(proc.stdout.decode().strip()), proc.stderr.decode(errors="replace")


def project(root: Path, changed: bool) -> Path:
    write_project(root)
    (root / "cc-count").write_text('#!/bin/sh\necho "$@" >> cc.log\nexec gcc "$@"\n')
    (root / "cc-count").chmod(0o755)
    if changed:
        (root / "src" / "f7.c").write_text('#include "common.h"\nint f7(int x) { return x * 77; }\n')
    assert (root / "Makefile").read_text() == MAKEFILE
    return root


def test_nix_build_twice_on_two_stores_rebuilds_only_the_change(tmp_path):
    a = start_daemon(tmp_path / "a")
    b = start_daemon(tmp_path / "b", bootstrap=[a.addr])
    try:
        first = project(tmp_path / "p1", changed=False)
        out1, log1 = nix_build(tmp_path, "s1", EXPR.format(fn=ROOT / "nix" / "build-cache.nix", api=a.api, netrc=a.repo / "api.netrc",
                                                          src=first, key="main/app-1"))
        assert "no entry for main/app-1" in log1
        compiled1 = [c for c in (out1 / "cc.log").read_text().splitlines() if " -c " in f" {c} "]
        assert len(compiled1) == 25

        second = project(tmp_path / "p2", changed=True)
        out2, log2 = nix_build(tmp_path, "s2", EXPR.format(fn=ROOT / "nix" / "build-cache.nix", api=b.api, netrc=b.repo / "api.netrc",
                                                          src=second, key="main/app-2"))
        assert "restored main/app-1 (prefix)" in log2, log2
        calls = (out2 / "cc.log").read_text().splitlines()
        assert [c for c in calls if " -c " in f" {c} "] == ["-c -o build/f7.o src/f7.c"], calls
        assert len(calls) == 2  # that object and the link
        assert b.status()["bytes_fetched"] > 0  # the tree came from A through the swarm
    finally:
        a.stop()
        b.stop()
