"""Timestamps done right, with real make and gcc: a fresh checkout (every file newer than the cache) with
one changed .c file recompiles exactly that one object after `p2pcache cache restore`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None,
                                reason="needs gcc and make")

MAKEFILE = """\
SRC := $(sort $(wildcard src/*.c))
OBJ := $(patsubst src/%.c,build/%.o,$(SRC))
build/app: $(OBJ)
\t$(CC) -o $@ $(OBJ)
build/%.o: src/%.c src/common.h
\t@mkdir -p build
\t$(CC) -c -o $@ $<
"""


def write_project(root: Path, n: int = 24) -> None:
    (root / "src").mkdir(parents=True)
    (root / "Makefile").write_text(MAKEFILE)
    (root / "src" / "common.h").write_text("".join(f"int f{i}(int);\n" for i in range(n)))
    for i in range(n):
        (root / "src" / f"f{i}.c").write_text(f'#include "common.h"\nint f{i}(int x) {{ return x * {i + 3}; }}\n')
    calls = " + ".join(f"f{i}(1)" for i in range(n))
    (root / "src" / "main.c").write_text(f'#include "common.h"\nint main(void) {{ return ({calls}) % 256; }}\n')
    (root / "NOTES.txt").write_text("not a build input\n")


def cc_wrapper(tmp: Path) -> tuple[Path, Path]:
    log = tmp / "cc.log"
    wrapper = tmp / "cc-count"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec gcc "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, log


def run_make(cwd: Path, wrapper: Path, log: Path) -> list[str]:
    log.write_text("")
    subprocess.run(["make", "-s", f"CC={wrapper}"], cwd=cwd, check=True, capture_output=True)
    return [line for line in log.read_text().splitlines() if line]


def p2p(cwd: Path, repo: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "p2pcache", "--repo", str(repo), "--json", *args], cwd=cwd,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)


def test_make_rebuilds_exactly_the_changed_object(tmp_path):
    wrapper, log = cc_wrapper(tmp_path)
    repo = tmp_path / "repo"
    first = tmp_path / "checkout1"
    write_project(first)
    calls = run_make(first, wrapper, log)
    assert sum(" -c " in f" {c} " for c in calls) == 25  # 24 + main.c
    saved = p2p(first, repo, "cache", "save", "main/app-1", "build", "--sources", ".")
    assert saved["saved"] and saved["tree"]["sources"] == 28  # 25 .c, common.h, Makefile, NOTES.txt

    # A CI checkout: the same sources, all with new mtimes, one .c changed and one file deleted.
    second = tmp_path / "checkout2"
    write_project(second)
    (second / "src" / "f7.c").write_text('#include "common.h"\nint f7(int x) { return x * 77; }\n')
    (second / "NOTES.txt").unlink()
    restored = p2p(second, repo, "cache", "restore", "main/app-1", "build")
    assert restored["match"] == "exact"
    sources = restored["restored"]["sources"]
    assert sources["changed"] == ["src/f7.c"] and sources["new"] == [] and sources["deleted"] == ["NOTES.txt"]
    assert sources["unchanged"] == 26

    calls = run_make(second, wrapper, log)
    compiled = [c for c in calls if " -c " in f" {c} "]
    assert compiled == ["-c -o build/f7.o src/f7.c"], calls
    assert len(calls) == 2  # that object, then the link
    assert subprocess.run([str(second / "build" / "app")]).returncode == (sum((i + 3) for i in range(24)) + 77 - 10) % 256


def test_exact_mtime_mode_gives_back_saved_source_mtimes(tmp_path):
    repo = tmp_path / "repo"
    first = tmp_path / "w1"
    (first / "out").mkdir(parents=True)
    (first / "a.c").write_text("a")
    (first / "b.c").write_text("b")
    os.utime(first / "a.c", ns=(1_600_000_000_000_000_000,) * 2)
    (first / "out" / "a.o").write_text("obj")
    p2p(first, repo, "cache", "save", "k", "out", "--sources", ".")
    second = tmp_path / "w2"
    second.mkdir()
    (second / "a.c").write_text("a")
    (second / "b.c").write_text("changed")
    restored = p2p(second, repo, "cache", "restore", "k", "out", "--mtime-mode", "exact")
    assert restored["restored"]["sources"]["changed"] == ["b.c"]
    assert os.stat(second / "a.c").st_mtime_ns == 1_600_000_000_000_000_000
    assert os.stat(second / "b.c").st_mtime_ns > os.stat(second / "out" / "a.o").st_mtime_ns
