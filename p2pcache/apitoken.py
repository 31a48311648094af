"""The local API's token: a random secret in `REPO/api.token` (mode 0600), and a netrc file for Nix.

Owns the token's file format and permissions; the HTTP checks that use it live in `http/guard.py`.
Whoever can read `REPO/api.token` may call the daemon's API and upload to its binary cache — the file's
permissions decide who that is, as they do for the repo itself. The daemon makes a new token at every
start: a token that leaked while no daemon ran (say, to a process that took over the API port after a
crash left `api.json` behind) is worthless once the daemon is back.

`REPO/api.netrc` holds the same token in the form Nix's `netrc-file` setting reads (curl sends it as
HTTP Basic credentials, password = token, on every request to that host): `nix copy --to
http://127.0.0.1:PORT` then authenticates without the token appearing in the store URL, which Nix would
print in its logs. Point Nix at this file rather than copying it: it changes with every start.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from .errors import RepoError

TOKEN_FILE = "api.token"
NETRC_FILE = "api.netrc"
NETRC_LOGIN = "p2pcache"


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600 from the first byte on (temp file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


def new_token(repo: Path) -> str:
    """A fresh token for a starting daemon, written to `REPO/api.token` (0600 from its first byte)."""
    token = secrets.token_urlsafe(32)
    try:
        _write_private(repo / TOKEN_FILE, token + "\n")
    except OSError as e:
        raise RepoError(f"cannot write {repo / TOKEN_FILE}: {e.strerror}") from None
    return token


def read_token(repo: Path) -> str:
    """The token as a client reads it: RepoError with what to do when this user may not read it."""
    path = repo / TOKEN_FILE
    try:
        token = path.read_text().strip()
    except PermissionError:
        raise RepoError(f"cannot read {path}: permission denied; the daemon's API needs its token — run as "
                        "the daemon's user, or have it share the file (e.g. a group with read access)") from None
    except FileNotFoundError:
        raise RepoError(f"{path} does not exist; the daemon writes it at start (is it an older daemon?)") from None
    except OSError as e:
        raise RepoError(f"cannot read {path}: {e.strerror}") from None
    if not token:
        raise RepoError(f"{path} is empty; delete it and restart the daemon")
    return token


def write_netrc(repo: Path, token: str, hosts: list[str]) -> Path:
    """`REPO/api.netrc` with one entry per host name the API answers on (curl matches the host, not
    the port)."""
    lines = [f"machine {h} login {NETRC_LOGIN} password {token}\n" for h in dict.fromkeys(hosts)]
    path = repo / NETRC_FILE
    _write_private(path, "".join(lines))
    return path
