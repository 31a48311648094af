"""Talking to a running daemon from the CLI.

The daemon writes `REPO/api.json` ({"api": "http://127.0.0.1:PORT", "pid", "peer_id", "addrs"}) when
it is ready and removes it when it stops. A stale file (dead pid, refused connection) means no daemon.
Every call carries the API token from `REPO/api.token` (`Authorization: Bearer`); a user who may not
read that file cannot use the daemon. `add` streams the file's bytes in the request body: the file is
opened here, with the caller's rights, never by the daemon.
"""

from __future__ import annotations

import json
import os
import ssl
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

import httpx

from .apitoken import read_token
from .errors import CorruptData, DiskFull, InvalidInput, NotFound, P2PCacheError, RepoError

_CODES = {2: InvalidInput, 3: NotFound, 4: CorruptData, 5: RepoError, 6: DiskFull}


def _daemon_error(code: object, message: str) -> P2PCacheError:
    """The daemon's error as the same class (so the same exit code) here; a code without a class of its
    own here (e.g. 7, no peer could deliver the blocks) keeps its number."""
    cls = _CODES.get(code)  # type: ignore[call-overload]
    if cls is not None:
        return cls(message)
    err = P2PCacheError(message)
    if isinstance(code, int) and 0 < code < 126:
        err.exit_code = code
    return err


def read_api_file(repo: Path) -> dict | None:
    try:
        info = json.loads((repo / "api.json").read_text())
    except (OSError, ValueError):
        return None
    pid = info.get("pid")
    if not isinstance(pid, int):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return info


ADD_PIECE = 1 << 20


def _plain_http_only() -> ssl.SSLContext:
    """The TLS context the client is built with. The daemon's API is plain HTTP on loopback, so no
    certificate is ever checked; httpx's default context loads the system's CA bundle, 30-80 ms of every
    CLI call. This one loads none and still requires certificates: an https URL fails closed."""
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


class DaemonClient:
    def __init__(self, info: dict, token: str | None, timeout: float = 30.0):
        self.info = info
        self.http = httpx.Client(base_url=info["api"], timeout=httpx.Timeout(timeout, read=None),
                                 verify=_plain_http_only(), trust_env=False)
        if token is not None:
            self.http.headers["authorization"] = f"Bearer {token}"

    @classmethod
    def find(cls, repo: Path) -> "DaemonClient | None":
        """A client for the daemon running on `repo`, or None if none runs. RepoError if one runs but
        this user may not read its token."""
        info = read_api_file(repo)
        if info is None:
            return None
        client = cls(info, None)  # one client (one connection) for the probe and every call after it
        try:
            client.http.get("/nix-cache-info", timeout=5.0)  # alive? (no token needed to know that)
        except httpx.HTTPError:
            client.close()
            return None
        try:
            client.http.headers["authorization"] = f"Bearer {read_token(repo)}"
        except BaseException:
            client.close()
            raise
        try:
            r = client.http.get("/api/v0/status", timeout=5.0)
        except httpx.HTTPError:
            client.close()
            return None
        if r.status_code in (401, 403):
            client.close()
            raise RepoError(f"the daemon at {info['api']} refused the token in {repo / 'api.token'}: "
                            f"{r.text.strip()}")
        if r.status_code != 200:
            client.close()
            return None
        return client

    def close(self) -> None:
        self.http.close()

    def _get(self, path: str) -> object:
        try:
            r = self.http.get(path)
        except httpx.HTTPError as e:
            raise RepoError(f"daemon at {self.info['api']} did not answer: {e}") from None
        if r.status_code != 200:
            raise RepoError(f"daemon answered {r.status_code}: {r.text.strip()}")
        return r.json()

    def _post(self, path: str, body: dict) -> dict:
        try:
            r = self.http.post(path, json=body)
        except httpx.HTTPError as e:
            raise RepoError(f"daemon at {self.info['api']} did not answer: {e}") from None
        if r.status_code != 200:
            err = r.json().get("error", r.text) if r.headers.get("content-type", "").startswith("application/json") else r.text
            raise (NotFound if r.status_code == 404 else InvalidInput if r.status_code == 400 else RepoError)(err.strip())
        return r.json()

    def gc(self, max_size: int | None) -> dict:
        return self._post("/api/v0/gc", {"max_size": max_size})

    def set_pinned(self, key: str, pinned: bool) -> dict:
        return self._post("/api/v0/pin" if pinned else "/api/v0/unpin", {"key": key})

    def status(self) -> dict:
        return self._get("/api/v0/status")  # type: ignore[return-value]

    def peers(self) -> list:
        return self._get("/api/v0/peers")  # type: ignore[return-value]

    def _stream(self, path: str, body: dict | None, progress: Callable[[int, int | None], None] | None,
                on_event: Callable[[dict], None] | None = None, **request: object) -> dict:
        """POST and follow the NDJSON answer: progress events to `progress` (or, with no `progress`, every
        other event to `on_event`) until `done` (returned) or `error` (raised)."""
        try:
            with self.http.stream("POST", path, json=body, **request) as r:  # type: ignore[arg-type]
                if r.status_code != 200:
                    r.read()
                    raise RepoError(f"daemon answered {r.status_code}: {r.text.strip()}")
                for line in r.iter_lines():
                    if not line:
                        continue
                    first = json.loads(line)
                    for event in first["events"] if first.get("event") == "batch" else [first]:
                        kind = event.pop("event", None)
                        if kind == "done":
                            return event
                        elif kind == "error":
                            raise _daemon_error(event.get("code"), event["message"])
                        elif kind == "progress" and progress:
                            progress(event["bytes"], event.get("total"))
                        elif on_event:
                            on_event({"event": kind, **event})
        except httpx.HTTPError as e:
            raise RepoError(f"lost the daemon at {self.info['api']}: {e}") from None
        raise RepoError("daemon closed the response without an answer")

    def add(self, source: BinaryIO, name: str | None = None,
            progress: Callable[[int, int | None], None] | None = None, size: int | None = None) -> dict:
        """Stream an open file (or stdin) to the daemon, which adds and announces it. Memory stays at
        one piece; `progress(sent, size)` counts what left this process."""

        def pieces() -> Iterator[bytes]:
            sent = 0
            while True:
                try:
                    piece = source.read(ADD_PIECE)
                except OSError as e:
                    raise RepoError(f"cannot read {name or 'the input'}: {e.strerror}") from None
                if not piece:
                    return
                sent += len(piece)
                if progress:
                    progress(sent, size)
                yield piece

        # chunked, not Content-Length: a file that grows or shrinks while we read it still makes one
        # well-formed request (its sha256 in the answer says what was added)
        headers = {"content-type": "application/octet-stream"}
        return self._stream("/api/v0/add", None, None, content=pieces(), headers=headers,
                            params={"name": name} if name else None)

    def fetch_url(self, url: str, hash_text: str,
                  progress: Callable[[int, int | None], None] | None = None) -> dict:
        return self._stream("/api/v0/fetch-url", {"url": url, "hash": hash_text}, progress)

    def fetch(self, key: str, progress: Callable[[int, int | None], None] | None = None) -> dict:
        return self._stream("/api/v0/fetch", {"key": key}, progress)



    def prefetch(self, dependencies: list[dict], jobs: int, on_event: Callable[[dict], None]) -> dict:
        """Lock-file prefetch in the daemon: `entry` and `progress` events go to `on_event`; returns the summary."""
        return self._stream("/api/v0/prefetch", {"dependencies": dependencies, "jobs": jobs}, None, on_event)
    # -- build cache (p2pcache.buildcache through the daemon; the caller walks and writes its own paths) --
    def cache_lookup(self, key: str, restore_keys: list[str], lookup_only: bool, paths_id: str | None = None,
                     progress: Callable[[int, int | None], None] | None = None,
                     on_event: Callable[[dict], None] | None = None) -> dict:
        """The lookup's answer; `on_event` (with no `progress`) gets its other events, e.g. `fetching`
        with the root of a tree the daemon starts to fetch."""
        return self._stream("/api/v0/cache/lookup", {"key": key, "restore_keys": list(restore_keys),
                                                      "lookup_only": lookup_only, "paths_id": paths_id}, progress,
                            on_event)

    def cache_save(self, key: str, root: str, force: bool, paths_id: str | None, scan_time: float | None,
                   lease: str | None = None, scan_digest: bytes | None = None) -> dict:
        return self._post("/api/v0/cache/save", {"key": key, "root": root, "force": force, "paths_id": paths_id,
                                                 "scan_time": scan_time, "lease": lease,
                                                 "scan_digest": scan_digest.hex() if scan_digest else None})

    def cache_call(self, what: str, body: dict) -> dict:
        """pin, unpin, keys, expire."""
        return self._post(f"/api/v0/cache/{what}", body)

    def cache_upload_lease(self) -> str:
        """A lease for one save's uploads: the daemon's gc keeps what they cover until the save (or ~10 min idle)."""
        return self._post("/api/v0/cache/upload", {})["lease"]

    def blocks_missing(self, body: bytes, lease: str | None = None) -> list[int]:
        """Indices of the blocks (framed binary CIDs) the daemon's repo lacks."""
        try:
            r = self.http.post("/api/v0/blocks/missing", content=body, headers=_block_headers(lease))
        except httpx.HTTPError as e:
            raise RepoError(f"daemon at {self.info['api']} did not answer: {e}") from None
        if r.status_code != 200:
            raise (InvalidInput if r.status_code == 400 else RepoError)(r.text.strip())
        return r.json()["missing"]

    def put_blocks(self, body: bytes, lease: str | None = None) -> dict:
        """Upload blocks framed as (varint length, binary CID, varint length, bytes)…; the daemon re-hashes each."""
        try:
            r = self.http.post("/api/v0/blocks", content=body, headers=_block_headers(lease))
        except httpx.HTTPError as e:
            raise RepoError(f"daemon at {self.info['api']} did not answer: {e}") from None
        if r.status_code != 200:
            raise (InvalidInput if r.status_code == 400 else RepoError)(r.text.strip())
        return r.json()


    def cache_files(self, pieces: Iterable[bytes], length: int, lease: str | None = None) -> dict:
        """Stream files' contents (`length` bytes in `cacheupload.FILE_HEADER` framing) for the daemon to
        chunk and store: {"bodies": each file's tree-manifest body, "new_blocks", "new_bytes"}. What `pieces`
        raises (a file that changed while read) ends the upload and is raised here, as itself."""
        from .content import dagcbor

        try:
            # A Content-Length body, not a chunked one: h11 then sends each piece as it is, without
            # joining it into a copy with its chunk header.
            r = self.http.post("/api/v0/cache/files", content=pieces,
                               headers={**_block_headers(lease), "content-length": str(length)})
        except httpx.HTTPError as e:
            raise RepoError(f"daemon at {self.info['api']} did not answer: {e}") from None
        if r.status_code != 200:
            raise (InvalidInput if r.status_code == 400 else RepoError)(r.text.strip())
        got = dagcbor.decode(r.content)
        if not (isinstance(got, dict) and isinstance(got.get("bodies"), list)):
            raise RepoError(f"daemon at {self.info['api']}: malformed answer to a file upload")
        return got


def _block_headers(lease: str | None) -> dict[str, str]:
    headers = {"content-type": "application/octet-stream"}
    if lease:
        headers["x-p2pcache-lease"] = lease
    return headers
