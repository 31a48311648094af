"""Real `p2pcache daemon` processes on loopback for multi-node tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class Daemon:
    repo: Path
    proc: subprocess.Popen
    info: dict = field(default_factory=dict)

    @property
    def addr(self) -> str:
        return self.info["addrs"][0]

    @property
    def api(self) -> str:
        return self.info["api"]

    @property
    def token(self) -> str:
        """The API token, read from REPO/api.token as the CLI does (tests run as the daemon's user)."""
        return (self.repo / "api.token").read_text().strip()

    @property
    def auth(self) -> dict:
        return {"authorization": f"Bearer {self.token}"}

    @property
    def netrc(self) -> Path:
        """What `nix copy --to` needs: `netrc-file = <this>` (the daemon writes it at start)."""
        return self.repo / "api.netrc"

    def status(self) -> dict:
        r = httpx.get(self.api + "/api/v0/status", headers=self.auth, timeout=10)
        r.raise_for_status()
        return r.json()

    def cli(self, *args: str, check: bool = True, timeout: float = 120,
            input: bytes | None = None) -> subprocess.CompletedProcess:
        env = dict(os.environ, P2PCACHE_REPO=str(self.repo))
        proc = subprocess.run([sys.executable, "-m", "p2pcache", *args], env=env, capture_output=True,
                              timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"p2pcache {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode()}")
        return proc

    def wait_announced(self, keys: int, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if st["announce"]["provided"] >= keys:
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.repo.name} announced only {st['announce']} after {timeout}s")
            time.sleep(0.2)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def start_daemon(repo: Path, *, bootstrap: list[str] = (), swarm_key: Path | None = None,
                 extra: list[str] = (), entry: list[str] = ("-m", "p2pcache"), timeout: float = 30,
                 env: dict[str, str] | None = None, listen: str = "/ip4/127.0.0.1/tcp/0") -> Daemon:
    """Start `python <entry> --repo REPO daemon` on loopback; returns once it printed its ready line.
    `listen`: its one libp2p listen address (a fixed port, for a daemon restarted where it was)."""
    args = [sys.executable, *entry, "--repo", str(repo), "daemon", "--json",
            "--listen", listen, "--api", "127.0.0.1:0", *extra]
    for b in bootstrap:
        args += ["--bootstrap", b]
    if swarm_key is not None:
        args += ["--swarm-key", str(swarm_key)]
    log = open(repo.parent / f"{repo.name}.log", "wb")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log,
                            env=None if env is None else dict(os.environ, **env))
    d = Daemon(repo, proc)
    line = _readline(proc, timeout)
    if not line:
        proc.kill()
        raise AssertionError(f"daemon for {repo} did not start: {(repo.parent / f'{repo.name}.log').read_text()}")
    d.info = json.loads(line)
    return d


def _readline(proc: subprocess.Popen, timeout: float) -> bytes:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        return b""
    return proc.stdout.readline()


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
