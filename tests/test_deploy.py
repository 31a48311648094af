"""deploy/: the systemd unit and the CI examples, checked by the tools that run them and run for real.

The unit goes through `systemd-analyze verify` (systemd is installed by scripts/install-system-deps.sh)
and its ExecStart line starts a real daemon. The GitHub Actions and GitLab CI examples are parsed as
YAML and their shell steps run with bash against real daemons and real Nix: a teammate's node is
already up, the job's node joins it from the "secrets", Nix builds a derivation with the node as
substituter and post-build-hook, and the teammate's Nix then gets the signed output through the swarm.
"""

from __future__ import annotations

import configparser
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from .helpers.daemons import free_port, start_daemon
from .test_nix_real import BASE_CONFIG, Nix, nix  # noqa: F401  (the fixture fails, not skips, without Nix)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read(DEPLOY / "systemd" / "p2pcache.service")
    return unit


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze is needed; scripts/install-system-deps.sh installs systemd", pytrace=False)
    text = (DEPLOY / "systemd" / "p2pcache.service").read_text()
    # verify checks that ExecStart's binary exists: point it at this checkout's p2pcache
    unit = tmp_path / "p2pcache.service"
    unit.write_text(text.replace("/usr/local/bin/p2pcache", str(BIN / "p2pcache")))
    proc = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines() if "p2pcache.service" in line]
    assert proc.returncode == 0 and not complaints, proc.stdout + proc.stderr
    # and it would really complain: a bad value is reported on that unit's line
    broken = tmp_path / "broken.service"
    broken.write_text(unit.read_text().replace("Restart=on-failure", "Restart=sometimes"))
    proc = subprocess.run([tool, "verify", str(broken)], capture_output=True, text=True, timeout=60)
    assert "broken.service" in proc.stdout + proc.stderr


def test_systemd_unit_runs_as_a_dedicated_user_with_the_repo_under_var_lib_and_its_command_works(tmp_path):
    unit = _unit()
    svc = unit["Service"]
    assert svc["User"] == svc["Group"] == "p2pcache" and svc["StateDirectory"] == "p2pcache"
    users = (DEPLOY / "systemd" / "p2pcache.sysusers.conf").read_text()
    assert re.search(r"^u p2pcache - .* /var/lib/p2pcache ", users, re.M)
    argv = shlex.split(svc["ExecStart"])
    assert argv[:3] == ["/usr/local/bin/p2pcache", "--repo", "/var/lib/p2pcache"]
    assert argv[3:] == ["daemon", "--config", "/etc/p2pcache/config.toml"]

    # the same command line, with this machine's paths: the shipped config, on loopback
    etc = tmp_path / "etc"
    etc.mkdir()
    conf = (DEPLOY / "systemd" / "config.toml").read_text()
    conf = conf.replace('"/ip4/0.0.0.0/tcp/4011"', '"/ip4/127.0.0.1/tcp/0"').replace('"127.0.0.1:37515"', '"127.0.0.1:0"')
    (etc / "config.toml").write_text(conf)
    subprocess.run([str(BIN / "p2pcache"), "swarm-key", "new", "-o", str(etc / "swarm.key")], check=True,
                   capture_output=True)
    repo = tmp_path / "var-lib-p2pcache"
    argv = [str(BIN / "p2pcache"), "--repo", str(repo), "daemon", "--config", str(etc / "config.toml"), "--json"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        import json

        ready = json.loads(proc.stdout.readline() or b"{}")
        assert ready.get("network") is True, proc.stderr.read1().decode() if proc.poll() is not None else ready
        token = (repo / "api.token").read_text().strip()
        st = httpx.get(ready["api"] + "/api/v0/status", headers={"authorization": f"Bearer {token}"},
                       timeout=10).json()
        assert st["quota_bytes"] == 20 << 30 and st["repo"] == str(repo)
        proc.send_signal(getattr(signal, unit["Service"]["KillSignal"]))
        assert proc.wait(timeout=float(unit["Service"]["TimeoutStopSec"])) == 0
        assert not (repo / "api.json").exists()
    finally:
        proc.kill()
        proc.wait()


# -- CI examples -------------------------------------------------------------------------------------


class Team:
    """What exists before a CI job starts: a teammate's node with the team's swarm key and signing key."""

    def __init__(self, nix: Nix, tmp_path: Path, daemons: list):
        self.dir = tmp_path / "team"
        self.dir.mkdir()
        self.swarm_key = self.dir / "swarm.key"
        subprocess.run([str(BIN / "p2pcache"), "swarm-key", "new", "-o", str(self.swarm_key)], check=True,
                       capture_output=True)
        self.sec, self.pub = self.dir / "team.sec", self.dir / "team.pub"
        nix.run("nix-store", "--generate-binary-cache-key", "team-ci-1", str(self.sec), str(self.pub))
        self.mate = start_daemon(tmp_path / "teammate", swarm_key=self.swarm_key, extra=["--sign-key", str(self.sec)])
        daemons.append(self.mate)
        self.nix = nix

    def runner_env(self, tmp_path: Path) -> dict:
        """The job's environment on a runner: PATH with p2pcache, Nix's base settings in nix.conf (as a
        runner has them), and the loopback ports this test may use."""
        nixconf = tmp_path / "nix-conf"
        nixconf.mkdir(exist_ok=True)
        (nixconf / "nix.conf").write_text(BASE_CONFIG)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("P2PCACHE_", "NIX_"))}
        env.update(PATH=f"{BIN}:{env['PATH']}", NIX_CONF_DIR=str(nixconf), HOME=str(self.nix.home),
                   XDG_CACHE_HOME=str(tmp_path / "cache"), P2PCACHE_PROGRESS_INTERVAL="5")
        return env

    def build_dir(self, tmp_path: Path) -> tuple[Path, str]:
        work = tmp_path / "checkout"
        work.mkdir()
        token = secrets.token_hex(6)
        (work / "default.nix").write_text(
            f'derivation {{ name = "ci-job-{token}"; system = builtins.currentSystem; builder = "/bin/sh"; '
            f'args = [ "-c" "echo built-by-ci-{token} > $out" ]; }}\n')
        return work, token

    def check_teammate_gets(self, out_path: str, token: str, tmp_path: Path) -> None:
        store_hash = Path(out_path).name[:32]
        r = httpx.get(f"{self.mate.api}/{store_hash}.narinfo", timeout=60)  # over the swarm, from the job's node
        assert r.status_code == 200 and "Sig: team-ci-1:" in r.text, r.text
        store = tmp_path / "teammate-store"
        self.nix.run("nix", "copy", "--from", self.mate.api, "--to", str(store), out_path,
                     config=f"require-sigs = true\ntrusted-public-keys = {self.pub.read_text().strip()}\n")
        assert (store / out_path.lstrip("/")).read_text() == f"built-by-ci-{token}\n"


def _bash(script: str, env: dict, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc


def _read_github_env(path: Path) -> dict:
    """$GITHUB_ENV's format: NAME=value lines and NAME<<DELIM ... DELIM blocks."""
    out, lines, i = {}, path.read_text().splitlines() if path.exists() else [], 0
    while i < len(lines):
        line = lines[i]
        if "<<" in line:
            name, delim = line.split("<<", 1)
            j = lines.index(delim, i + 1)
            out[name] = "\n".join(lines[i + 1:j])
            i = j + 1
        else:
            name, _, value = line.partition("=")
            out[name] = value
            i += 1
    return out


def _wait_dead(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_github_actions_example_starts_joins_points_nix_and_stops(nix, tmp_path, daemons):
    team = Team(nix, tmp_path, daemons)
    flow = yaml.safe_load((DEPLOY / "ci" / "github-actions.yml").read_text())
    job = flow["jobs"]["build"]
    steps = {s["id"]: s for s in job["steps"] if "id" in s}
    assert [s.get("id") for s in job["steps"]][1:] == ["install", "start", "nix", "build", "stop"]
    assert steps["stop"]["if"] == "always()"

    rt = tmp_path / "runner-temp"
    rt.mkdir()
    secrets_ = {"P2PCACHE_SWARM_KEY": team.swarm_key.read_text().strip(), "P2PCACHE_BOOTSTRAP": team.mate.addr,
                "P2PCACHE_NIX_KEYS": team.pub.read_text().strip(),
                "P2PCACHE_NIX_SIGNING_KEY": team.sec.read_text().strip()}
    contexts = {"runner.temp": str(rt), **{f"secrets.{k}": v for k, v in secrets_.items()}}

    def expand(value: str) -> str:
        return re.sub(r"\$\{\{\s*([\w.]+)\s*\}\}", lambda m: contexts[m.group(1)], str(value))

    env = team.runner_env(tmp_path)
    env.update({k: expand(v) for k, v in job["env"].items()})
    # this machine's loopback, not the runner defaults (0.0.0.0:4011, API 37515 may be taken here)
    env.update(P2PCACHE_REPO=str(tmp_path / "runner-repo"), P2PCACHE_LISTEN="/ip4/127.0.0.1/tcp/0",
               P2PCACHE_API=f"127.0.0.1:{free_port()}", RUNNER_TEMP=str(rt), GITHUB_ENV=str(rt / "github-env"))
    work, token = team.build_dir(tmp_path)
    for sid in ("start", "nix", "build"):
        proc = _bash(steps[sid]["run"], dict(env, **_read_github_env(rt / "github-env")), work)
        if sid == "start":
            assert re.search(r"^peers\s+1 connected$", proc.stdout, re.M), proc.stdout  # joined the team
    out_path = proc.stdout.strip().splitlines()[-1]
    assert out_path.startswith("/nix/store/") and out_path.endswith(f"ci-job-{token}")
    pid = int((rt / "p2pcache.pid").read_text())
    try:
        team.check_teammate_gets(out_path, token, tmp_path)
    finally:  # the job's node stops even when the check fails (a test leaves no daemon behind)
        _bash(steps["stop"]["run"], dict(env, **_read_github_env(rt / "github-env")), work)
    assert _wait_dead(pid) and not (tmp_path / "runner-repo" / "api.json").exists()


def test_gitlab_ci_example_starts_joins_points_nix_and_stops(nix, tmp_path, daemons):
    team = Team(nix, tmp_path, daemons)
    flow = yaml.safe_load((DEPLOY / "ci" / "gitlab-ci.yml").read_text())
    job = flow["build"]
    env = team.runner_env(tmp_path)
    env["CI_JOB_ID"] = "4242"
    for k, v in flow["variables"].items():  # GitLab expands $VARS inside variables
        env[k] = re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), ""), str(v))
    assert env["P2PCACHE_RUN"] == "/tmp/p2pcache-4242"
    # File-type variables hold a path; plain ones the value
    env.update(P2PCACHE_SWARM_KEY=str(team.swarm_key), P2PCACHE_NIX_SIGNING_KEY=str(team.sec),
               P2PCACHE_BOOTSTRAP=team.mate.addr, P2PCACHE_NIX_KEYS=team.pub.read_text().strip(),
               P2PCACHE_REPO=str(tmp_path / "runner-repo"), P2PCACHE_LISTEN="/ip4/127.0.0.1/tcp/0",
               P2PCACHE_API=f"127.0.0.1:{free_port()}",
               P2PCACHE_RUN=str(tmp_path / "run-4242"))
    work, token = team.build_dir(tmp_path)
    # before_script and script share one shell; after_script gets a fresh one
    proc = _bash("\n".join(job["before_script"] + job["script"]), env, work)
    assert re.search(r"^peers\s+1 connected$", proc.stdout, re.M), proc.stdout
    out_path = proc.stdout.strip().splitlines()[-1]
    assert out_path.startswith("/nix/store/") and out_path.endswith(f"ci-job-{token}")
    pid = int((tmp_path / "run-4242" / "pid").read_text())
    try:
        team.check_teammate_gets(out_path, token, tmp_path)
    finally:
        _bash("\n".join(job["after_script"]), env, work)
    assert _wait_dead(pid) and not (tmp_path / "runner-repo" / "api.json").exists()


def test_the_package_builds_without_deprecation_warnings(tmp_path):
    """pip installs the project (`make deps`) without setuptools' `project.license` table warning."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                           str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.glob("p2pcache-*.whl"))
    assert "deprecat" not in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr
