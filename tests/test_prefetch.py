"""`p2pcache prefetch` and `lock2nix` end to end: lock files written by the real tools against a loopback
registry, prefetched (without a daemon, and between two real daemons), and consumed offline by the real
tools (npm, uv, pip, cargo, go) and by real Nix through the hashed mirror. No test needs the internet."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import run_cli
from .helpers.daemons import start_daemon
from .helpers.registry import Registry, crate, go_module, npm_tarball, sri, wheel

PY = sys.executable


@pytest.fixture
def registry():
    r = Registry().start()
    yield r
    r.stop()


def _lines(proc) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.decode().splitlines() if line.strip()]


def _summary(proc) -> dict:
    return [e for e in _lines(proc) if e.get("event") == "summary"][-1]


def _npm(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, npm_config_update_notifier="false", npm_config_audit="false", npm_config_fund="false")
    proc = subprocess.run(["npm", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"npm {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return proc


def _npm_project(tmp_path: Path, registry: Registry, omit_resolved: bool = False) -> Path:
    registry.npm_add("leftpad", "1.0.0", npm_tarball("leftpad", "1.0.0"))
    registry.npm_add("@acme/util", "2.1.0", npm_tarball("@acme/util", "2.1.0"), deps={"leftpad": "^1.0.0"})
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "package.json").write_text(json.dumps({"name": "proj", "version": "1.0.0",
                                                   "dependencies": {"@acme/util": "^2.0.0"}}))
    _npm("install", "--package-lock-only", f"--registry={registry.url}/npm/", f"--cache={tmp_path / 'npm-cache-0'}",
         f"--omit-lockfile-registry-resolved={'true' if omit_resolved else 'false'}", cwd=proj)
    return proj


def test_npm_lock_prefetched_then_npm_ci_offline(tmp_path, registry):
    proj = _npm_project(tmp_path, registry)
    repo, out = tmp_path / "repo", tmp_path / "out"
    proc = run_cli("prefetch", str(proj / "package-lock.json"), "--json", "--out", str(out), repo=repo, check=True)
    summary = _summary(proc)
    assert (summary["origin"], summary["failed"], summary["layouts"]) == (2, 0, {"npm-cache": 2})
    entries = [e for e in _lines(proc) if "source" in e and e.get("event") != "summary"]
    assert {e["name"] for e in entries} == {"leftpad", "@acme/util"}
    registry.stop()  # from here on the origin is gone
    again = _summary(run_cli("prefetch", str(proj / "package-lock.json"), "--json", repo=repo, check=True))
    assert (again["local"], again["origin"]) == (2, 0)
    # real npm installs from the layout with no network (the registry is a closed port)
    _npm("ci", "--offline", f"--cache={out / 'npm-cache'}", "--registry=http://127.0.0.1:1/", cwd=proj)
    assert (proj / "node_modules/leftpad/index.js").read_text().startswith('module.exports = "leftpad@1.0.0"')
    assert (proj / "node_modules/@acme/util/package.json").exists()


def test_lock_without_urls_uses_the_configured_registry(tmp_path, registry):
    proj = _npm_project(tmp_path, registry, omit_resolved=True)
    lock = json.loads((proj / "package-lock.json").read_text())
    assert "resolved" not in lock["packages"]["node_modules/leftpad"]
    repo = tmp_path / "repo"
    proc = run_cli("prefetch", str(proj / "package-lock.json"), repo=repo)
    failed = [line for line in proc.stderr.decode().splitlines() if line.startswith("failed ")]
    assert proc.returncode == 1 and len(failed) == 2 and all(": no URL: " in line for line in failed)
    proc = run_cli("prefetch", str(proj / "package-lock.json"), "--json", "--registry", f"npm={registry.url}/npm",
                   repo=repo, check=True)
    assert _summary(proc)["origin"] == 2
    # the same base URL from the repo's config.toml (which the daemon's own config reader accepts too)
    from p2pcache.config import load

    repo2 = tmp_path / "repo2"
    run_cli("init", repo=repo2, check=True)
    with open(repo2 / "config.toml", "a") as f:
        f.write(f'\n[prefetch.registries]\nnpm = "{registry.url}/npm"\n')
    load(repo2)
    proc = run_cli("prefetch", str(proj / "package-lock.json"), "--json", repo=repo2, check=True)
    assert _summary(proc)["origin"] == 2


def test_bad_entries_fail_alone_and_record_nothing(tmp_path, registry):
    good, evil = npm_tarball("good", "1.0.0"), npm_tarball("evil", "1.0.0")
    good_url = registry.npm_add("good", "1.0.0", good)
    evil_url = registry.npm_add("evil", "1.0.0", evil)
    registry.broken.add(evil_url[len(registry.url):])
    old = npm_tarball("old", "1.0.0")
    old_url = registry.npm_add("old", "1.0.0", old)
    pkgs = {
        "": {"name": "p"},
        "node_modules/good": {"version": "1.0.0", "resolved": good_url, "integrity": sri(good)},
        "node_modules/old": {"version": "1.0.0", "resolved": old_url, "integrity": sri(old, "sha1")},
        "node_modules/evil": {"version": "1.0.0", "resolved": evil_url, "integrity": sri(evil)},
        "node_modules/gone": {"version": "1.0.0", "resolved": registry.url + "/npm/gone/-/gone-1.0.0.tgz",
                              "integrity": sri(b"gone")},
        "node_modules/odd": {"version": "1.0.0", "resolved": good_url, "integrity": "blake3-AAAA"},
        "node_modules/l": {"resolved": "../l", "link": True},
    }
    lockfile = tmp_path / "package-lock.json"
    lockfile.write_text(json.dumps({"lockfileVersion": 3, "packages": pkgs}))
    repo = tmp_path / "repo"
    proc = run_cli("prefetch", str(lockfile), "-j", "2", repo=repo)
    err = proc.stderr.decode().splitlines()
    assert proc.returncode == 1
    failed = sorted(line.split(":")[0:2] for line in err if line.startswith("failed "))
    assert failed == [["failed evil@1.0.0", " hash mismatch"], ["failed gone@1.0.0", " origin 404"],
                      ["failed odd@1.0.0", " unknown hash"]]
    assert "skipped l: link to ../l" in err
    assert "5 dependencies: 0 local, 0 from peers, 2 from origin, 1 skipped, 3 failed" in proc.stdout.decode()
    listed = [json.loads(x) for x in run_cli("ls", "--json", repo=repo, check=True).stdout.decode().splitlines()]
    assert sorted(x["name"] for x in listed) == ["good-1.0.0.tgz", "old-1.0.0.tgz"]  # evil's bytes: not recorded
    old_entry = next(x for x in listed if x["name"] == "old-1.0.0.tgz")
    assert f"sha1:{hashlib.sha1(old).hexdigest()}" in old_entry["aliases"]  # found by its sha1 from now on
    registry.broken.clear()  # the origin is fixed: the next run tries again and succeeds
    proc = run_cli("prefetch", str(lockfile), "--json", repo=repo)
    s = _summary(proc)
    assert (s["local"], s["origin"], s["failed"]) == (2, 1, 2)

    lockfile.write_text('{"lockfileVersion": 3,\n "packages": {\n  "x": }\n}\n')
    proc = run_cli("prefetch", str(lockfile), repo=repo)
    assert proc.returncode == 2
    assert proc.stderr.decode().strip() == f"p2pcache prefetch: error: {lockfile}:3:8: cannot parse lock file: Expecting value"


def _uv(*args: str, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    uv = shutil.which("uv", path=str(Path(PY).parent)) or shutil.which("uv")
    assert uv, "uv is installed by the test extra"
    env = dict(os.environ, UV_CACHE_DIR=str(cwd / ".uv-cache"), UV_PYTHON_DOWNLOADS="never", UV_NO_CONFIG="1",
               **(env_extra or {}))
    proc = subprocess.run([uv, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"uv {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return proc


def test_uv_lock_pylock_and_poetry_then_uv_and_pip_install_offline(tmp_path, registry):
    for name, version, requires in (("alpha", "1.0.0", ("beta>=2",)), ("beta", "2.0.0", ())):
        filename, data = wheel(name, version, requires)
        registry.pypi_add(name, filename, data)
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "pyproject.toml").write_text('[project]\nname = "proj"\nversion = "0.1.0"\nrequires-python = ">=3.11"\n'
                                         'dependencies = ["alpha"]\n')
    _uv("lock", "--python", PY, "--index-url", f"{registry.url}/simple", cwd=proj)
    _uv("export", "--format", "pylock.toml", "-o", "pylock.toml", "--no-emit-project", cwd=proj)
    beta_name, beta = wheel("beta", "2.0.0")
    (proj / "poetry.lock").write_text(  # poetry.lock names files, not URLs (format per poetry's docs)
        f'[[package]]\nname = "beta"\nversion = "2.0.0"\noptional = false\npython-versions = "*"\n'
        f'files = [\n    {{file = "{beta_name}", hash = "sha256:{hashlib.sha256(beta).hexdigest()}"}},\n]\n\n'
        '[metadata]\nlock-version = "2.0"\npython-versions = ">=3.11"\n')
    repo, out = tmp_path / "repo", tmp_path / "out"
    proc = run_cli("prefetch", str(proj / "uv.lock"), str(proj / "pylock.toml"), "--json", "--out", str(out),
                   repo=repo, check=True)
    s = _summary(proc)
    assert (s["total"], s["origin"], s["local"], s["failed"]) == (4, 2, 2, 0)  # pylock's two: the same wheels
    assert sorted(os.listdir(out / "pypi")) == ["alpha-1.0.0-py3-none-any.whl", "beta-2.0.0-py3-none-any.whl"]
    proc = run_cli("prefetch", str(proj / "poetry.lock"), "--json", "--index-url", f"{registry.url}/simple",
                   repo=tmp_path / "repo-poetry", check=True)
    assert _summary(proc)["origin"] == 1  # found on the index page by its file name, then verified
    registry.stop()
    _uv("pip", "install", "--offline", "--no-index", "--find-links", str(out / "pypi"), "--target",
        str(tmp_path / "t-uv"), "--python", PY, "alpha", cwd=proj)
    assert (tmp_path / "t-uv/beta/__init__.py").read_text() == "VERSION = '2.0.0'\n"
    subprocess.run([PY, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(out / "pypi"), "--target",
                    str(tmp_path / "t-pip"), "alpha"], check=True, capture_output=True, timeout=120)
    assert (tmp_path / "t-pip/alpha/__init__.py").exists()


def test_cargo_lock_prefetched_into_a_vendor_directory_cargo_builds_from(tmp_path, registry):
    cargo = shutil.which("cargo") or str(Path.home() / ".cargo/bin/cargo")
    assert os.path.exists(cargo), "cargo is installed by scripts/install-system-deps.sh (Debian cargo)"
    proj = tmp_path / "app"
    (proj / "src").mkdir(parents=True)
    (proj / "Cargo.toml").write_text('[package]\nname = "app"\nversion = "0.1.0"\nedition = "2021"\n\n'
                                     '[dependencies]\nlefty = "1.0"\n')
    (proj / "src/main.rs").write_text('fn main() { println!("{}", lefty::version()); }\n')
    data = crate("lefty", "1.0.3")
    registry.files["/crates/lefty/1.0.3/download"] = data
    # real cargo writes Cargo.lock: from a directory source holding the crate (as `cargo vendor` would)
    seed = tmp_path / "seed-vendor"
    subprocess.run(["tar", "xzf", "-", "-C", str(tmp_path)], input=data, check=True)
    seed.mkdir()
    os.rename(tmp_path / "lefty-1.0.3", seed / "lefty-1.0.3")
    (seed / "lefty-1.0.3/.cargo-checksum.json").write_text(
        json.dumps({"files": {}, "package": hashlib.sha256(data).hexdigest()}))
    (proj / ".cargo").mkdir()
    config = proj / ".cargo/config.toml"
    config.write_text(f'[source.crates-io]\nreplace-with = "vendored"\n[source.vendored]\ndirectory = "{seed}"\n')
    env = dict(os.environ, CARGO_HOME=str(tmp_path / "cargo-home"), CARGO_TARGET_DIR=str(tmp_path / "target"))
    subprocess.run([cargo, "generate-lockfile", "--offline"], cwd=proj, check=True, capture_output=True, env=env)
    shutil.rmtree(seed)
    repo, out = tmp_path / "repo", tmp_path / "out"
    proc = run_cli("prefetch", str(proj / "Cargo.lock"), "--json", "--out", str(out),
                   "--registry", f"cargo={registry.url}/crates", repo=repo, check=True)
    assert _summary(proc)["origin"] == 1
    registry.stop()
    config.write_text(f'[source.crates-io]\nreplace-with = "vendored"\n[source.vendored]\n'
                      f'directory = "{out / "cargo-vendor"}"\n')
    run = subprocess.run([cargo, "run", "--offline", "--locked", "-q"], cwd=proj, capture_output=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr.decode()
    assert run.stdout.decode().strip() == "1.0.3"


def _go_env(tmp_path: Path, proxy: str) -> dict:
    return dict(os.environ, GOPROXY=proxy, GOSUMDB="off", GOFLAGS="-mod=mod", GOPATH=str(tmp_path / "gopath"),
                GOMODCACHE=str(tmp_path / f"modcache-{abs(hash(proxy))}"), GOCACHE=str(tmp_path / "gocache"),
                GOTOOLCHAIN="local", GO111MODULE="on", HOME=str(tmp_path))


def test_go_sum_h1_verified_and_served_as_a_file_goproxy(tmp_path, registry):
    go = shutil.which("go")
    assert go, "go is installed by scripts/install-system-deps.sh (Debian golang-go)"
    mod = "m.test/Lefty"  # an upper-case letter: proxy paths escape it as !l
    zip_data, gomod = go_module(mod, "v1.2.0")
    base = f"/go/m.test/!lefty/@v/v1.2.0"
    registry.files.update({base + ".zip": zip_data, base + ".mod": gomod, base + ".info": b'{"Version":"v1.2.0"}',
                           "/go/m.test/!lefty/@v/list": b"v1.2.0\n"})
    proj = tmp_path / "app"
    proj.mkdir()
    (proj / "go.mod").write_text(f"module app.test/app\n\ngo 1.19\n\nrequire {mod} v1.2.0\n")
    (proj / "main.go").write_text(f'package main\n\nimport (\n\t"fmt"\n\tlefty "{mod}"\n)\n\n'
                                  'func main() { fmt.Println(lefty.Version) }\n')
    env = _go_env(tmp_path, f"{registry.url}/go")
    tidy = subprocess.run([go, "mod", "tidy"], cwd=proj, capture_output=True, env=env, timeout=120)
    assert tidy.returncode == 0, tidy.stderr.decode()
    gosum = (proj / "go.sum").read_text()  # written by real Go: its h1: hashes
    assert "h1:" in gosum and "/go.mod h1:" in gosum
    repo, out = tmp_path / "repo", tmp_path / "out"
    proc = run_cli("prefetch", str(proj / "go.sum"), "--json", "--out", str(out), "--registry",
                   f"go={registry.url}/go", repo=repo, check=True)
    assert (_summary(proc)["origin"], _summary(proc)["failed"]) == (2, 0)
    registry.stop()
    env = _go_env(tmp_path, f"file://{out / 'goproxy'}")
    run = subprocess.run([go, "run", "."], cwd=proj, capture_output=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr.decode()
    assert run.stdout.decode().strip() == "v1.2.0"


def test_two_runners_share_dependencies_and_nix_realises_lock2nix_through_the_mirror(tmp_path, registry, daemons):
    from .test_nix_real import Nix

    leftpad = npm_tarball("leftpad", "1.0.0")
    old = npm_tarball("oldie", "0.1.0")
    crate_data = crate("lefty", "1.0.3")
    zip_data, gomod = go_module("m.test/lefty", "v1.2.0")
    registry.npm_add("leftpad", "1.0.0", leftpad)
    old_url = registry.npm_add("oldie", "0.1.0", old)
    registry.files["/crates/lefty/1.0.3/download"] = crate_data
    registry.files["/go/m.test/lefty/@v/v1.2.0.zip"] = zip_data
    registry.files["/go/m.test/lefty/@v/v1.2.0.mod"] = gomod
    locks = tmp_path / "locks"
    locks.mkdir()
    (locks / "package-lock.json").write_text(json.dumps({"lockfileVersion": 3, "packages": {
        "node_modules/leftpad": {"version": "1.0.0", "resolved": f"{registry.url}/npm/leftpad/-/leftpad-1.0.0.tgz",
                                 "integrity": sri(leftpad)}}}))
    (locks / "yarn.lock").write_text(f'# yarn lockfile v1\n\n\noldie@^0.1.0:\n  version "0.1.0"\n'
                                     f'  resolved "{old_url}#{hashlib.sha1(old).hexdigest()}"\n')
    (locks / "Cargo.lock").write_text(f'version = 4\n\n[[package]]\nname = "lefty"\nversion = "1.0.3"\n'
                                      f'source = "registry+{registry.url}/index"\n'
                                      f'checksum = "{hashlib.sha256(crate_data).hexdigest()}"\n')
    from p2pcache.content.gomod import gomod_hash, zip_hash
    import io
    h1 = base64.b64encode(zip_hash(io.BytesIO(zip_data))).decode()
    (locks / "go.sum").write_text(f"m.test/lefty v1.2.0 h1:{h1}\n"
                                  f"m.test/lefty v1.2.0/go.mod h1:{base64.b64encode(gomod_hash(gomod)).decode()}\n")
    files = [str(locks / n) for n in ("package-lock.json", "yarn.lock", "Cargo.lock", "go.sum")]
    regs = ["--registry", f"cargo={registry.url}/crates", "--registry", f"go={registry.url}/go"]

    key = tmp_path / "swarm.key"
    key.write_text("/key/swarm/psk/1.0.0/\n/base16/\n" + os.urandom(32).hex() + "\n")
    a = start_daemon(tmp_path / "a", swarm_key=key)
    daemons.append(a)
    b = start_daemon(tmp_path / "b", swarm_key=key, bootstrap=[a.addr])
    daemons.append(b)
    s = _summary(a.cli("prefetch", *files, *regs, "--json"))  # runner A: from the origin, through its daemon
    assert (s["origin"], s["failed"]) == (5, 0)
    a.wait_announced(5 * 3)
    registry.stop()  # runner B: the origin is gone; everything comes from A, verified by B
    proc = b.cli("prefetch", *files, *regs, "--json", "-j", "4", check=False)
    s = _summary(proc)
    assert (s["peer"], s["failed"]) == (5, 0), proc.stderr.decode() + proc.stdout.decode()
    assert s["bytes"]["peer"] == len(leftpad) + len(old) + len(crate_data) + len(zip_data) + len(gomod)
    assert b.status()["bytes_fetched"] > 0

    # lock2nix on B: one fetchurl per dependency; the go ones get the sha256 B verified
    expr = tmp_path / "deps.nix"
    b.cli("lock2nix", *files, *regs, "-o", str(expr))
    text = expr.read_text()
    assert text.count("= fetchurl {") == 5, text
    nix = Nix(tmp_path / "nix-home")
    if shutil.which("nix-build") is None:
        pytest.fail("real Nix is required (apt-get install -y nix-bin)")
    store = tmp_path / "store-c"
    built = nix.run("nix-build", "--store", str(store), "--no-out-link", str(expr),
                    config=f"hashed-mirrors = {b.api}/\nconnect-timeout = 2\n")
    outs = built.stdout.decode().split()
    assert len(outs) == 5, built.stderr.decode()
    got = sorted((store / p.lstrip("/")).read_bytes() for p in outs)
    assert got == sorted([leftpad, old, crate_data, zip_data, gomod])


def test_a_gc_between_a_peers_last_block_and_the_lock_file_check_cannot_sweep_the_dependency(
        tmp_path, registry, daemons):
    from .test_node_fetch import GC_AT_CLAIM

    leftpad = npm_tarball("leftpad", "1.0.0")
    registry.npm_add("leftpad", "1.0.0", leftpad)
    lock = tmp_path / "package-lock.json"
    lock.write_text(json.dumps({"lockfileVersion": 3, "packages": {
        "node_modules/leftpad": {"version": "1.0.0", "resolved": f"{registry.url}/npm/leftpad/-/leftpad-1.0.0.tgz",
                                 "integrity": sri(leftpad)}}}))
    a = start_daemon(tmp_path / "a")
    daemons.append(a)
    b = start_daemon(tmp_path / "b", bootstrap=[a.addr], entry=[GC_AT_CLAIM])
    daemons.append(b)
    assert _summary(a.cli("prefetch", str(lock), "--json"))["origin"] == 1
    a.wait_announced(3)
    registry.stop()

    # B fetches it from A; a gc starts at the instant B is about to check it against the lock file's hash
    proc = b.cli("prefetch", str(lock), "--json", check=False)
    s = _summary(proc)
    assert (s["peer"], s["failed"]) == (1, 0), proc.stderr.decode() + proc.stdout.decode()
    injected = [ln for ln in (tmp_path / "b.log").read_text().splitlines() if "gc at claim:" in ln]
    assert len(injected) == 1 and injected[0].endswith(": waited"), injected

    # It was checked and claimed before that gc ran: B holds it whole with A gone.
    a.stop()
    assert b.status()["roots_incomplete"] == 0
    s = _summary(b.cli("prefetch", str(lock), "--json"))
    assert (s["local"], s["failed"]) == (1, 0)
