"""The `p2pcache` command.

Offline commands work on the repo directly. Errors a user can meet print one line to stderr and exit
non-zero (see errors.py for the codes); `--json` switches output to one JSON object per line.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import sqlite3
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NoReturn

from . import __version__
from .content.keys import HashKey
from .content.cid import CID
from .errors import CorruptData, InvalidInput, NotFound, P2PCacheError, RepoError, RepoLocked, leaf_error
from .store.repo import Repo, default_repo_path

PROGRESS_MIN_BYTES = 64 << 20


def parse_size(text: str) -> int:
    """'500M', '2GiB', '1.5G', '1024' -> bytes (K/M/G/T are powers of 1024, as in du and Nix)."""
    from .config import parse_size as parse

    try:
        return parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class Output:
    def __init__(self, as_json: bool):
        self.as_json = as_json

    def emit(self, obj: dict, text: str | None) -> None:  # text None: only ever emitted as JSON
        print(json.dumps(obj, sort_keys=True) if self.as_json else text, flush=True)


@contextmanager
def progress_bar(description: str, total: int | None, enabled: bool) -> Iterator:
    """Progress on stderr: a rich bar on a terminal, lines every few seconds otherwise (CI logs); a
    no-op callback when disabled. The callback takes an increment and, when it becomes known, the total."""
    if not enabled:
        yield None
        return
    if not sys.stderr.isatty():
        lines = ProgressLines(description, total)
        yield lines.advance
        lines.finish()
        return
    from rich.progress import (BarColumn, DownloadColumn, Progress, TimeRemainingColumn,
                               TransferSpeedColumn)
    from rich.console import Console

    with Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(binary_units=True),
        TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: int, new_total: int | None = None) -> None:
            if new_total is not None and bar.tasks[0].total != new_total:
                bar.update(task, total=new_total)
            bar.advance(task, n)

        yield advance


class ProgressLines:
    """Progress for logs: a line at the start, then one every `interval` seconds
    ($P2PCACHE_PROGRESS_INTERVAL, default 5) with bytes, total, rate and ETA, and one at the end."""

    def __init__(self, description: str, total: int | None, interval: float | None = None) -> None:
        import time

        self.description, self.total, self.done = description, total, 0
        self.interval = interval if interval is not None else float(os.environ.get("P2PCACHE_PROGRESS_INTERVAL", 5))
        self.clock = time.monotonic
        self.started = self.last = self.clock()
        self._print()

    def advance(self, n: int, total: int | None = None) -> None:
        self.done += n
        if total is not None:
            self.total = total
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._print()

    def finish(self) -> None:
        self._print(final=True)

    def _print(self, final: bool = False) -> None:
        elapsed = max(1e-9, self.clock() - self.started)
        rate = self.done / elapsed
        parts = [f"{self.description}: {human(self.done)}"]
        if self.total:
            parts[0] += f" of {human(self.total)} ({100 * self.done / self.total:.0f} %)"
        if final:
            parts.append(f"done in {elapsed:.1f} s ({human(int(rate))}/s)")
        elif self.done:
            parts.append(f"{human(int(rate))}/s")
            if self.total and rate > 0:
                parts.append(f"ETA {max(0.0, (self.total - self.done) / rate):.0f} s")
        print(", ".join(parts), file=sys.stderr, flush=True)


def _as_increments(advance):
    """The daemon reports cumulative progress (bytes done so far); a progress bar advances by increments."""
    last = [0]

    def on_progress(done: int, total: int | None) -> None:
        if advance:
            advance(done - last[0], total)
        last[0] = done

    return on_progress


def _want_progress(args: argparse.Namespace, size: int | None) -> bool:
    if args.progress == "always":
        return True
    if args.progress == "never" or args.json:
        return False
    return sys.stderr.isatty() and (size is None or size >= PROGRESS_MIN_BYTES)


def _repo_path(args: argparse.Namespace) -> Path:
    return Path(args.repo) if args.repo else default_repo_path()


def _open(args: argparse.Namespace, writable: bool, create: bool = False) -> Repo:
    path = _repo_path(args)
    try:
        if create and not Repo.exists(path):
            return Repo.init(path)
        return Repo.open(path, writable=writable)
    except PermissionError as e:
        raise RepoError(_unusable_repo(path, e, writable)) from None
    except OSError as e:
        if e.errno != errno.EROFS:
            raise
        raise RepoError(_unusable_repo(path, e, writable)) from None
    except sqlite3.OperationalError as e:
        if "readonly" not in str(e) and "unable to open" not in str(e):
            raise
        raise RepoError(_unusable_repo(path, e, writable)) from None


def _unusable_repo(path: Path, e: Exception, writable: bool) -> str:
    """One line for a repo this user may not use (another user's, or on a read-only mount)."""
    what = getattr(e, "filename", None) or path / "index.sqlite"
    try:
        owner = path.stat().st_uid
        import pwd

        who = f" (owned by {pwd.getpwuid(owner).pw_name})" if owner != os.geteuid() else ""
    except (OSError, KeyError):
        who = ""
    return (f"cannot {'write' if writable else 'open'} the repo {path}{who}: {what}: "
            f"{getattr(e, 'strerror', None) or e}; run as the repo's owner, or use --repo DIR / $P2PCACHE_REPO "
            f"for a repo of your own")


# -- commands ---------------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace, out: Output) -> int:
    path = _repo_path(args)
    existed = Repo.exists(path)
    with Repo.init(path):
        pass
    out.emit({"repo": str(path), "created": not existed},
             f"{'existing' if existed else 'initialised'} p2pcache repo at {path}")
    return 0


def cmd_add(args: argparse.Namespace, out: Output) -> int:
    for f in args.files:
        if f != "-" and not os.path.isfile(f):
            what = "is a directory" if os.path.isdir(f) else "does not exist or is not a regular file"
            raise RepoError(f"cannot add {f}: it {what}")
    client = _daemon(args) if Repo.exists(_repo_path(args)) else None
    if client is not None:  # the daemon owns the repo: we stream the bytes, it adds (and announces) them
        try:
            for f in args.files:
                source = sys.stdin.buffer if f == "-" else _open_for_add(f)
                size = None if f == "-" else os.fstat(source.fileno()).st_size
                name = args.name if args.name is not None else (None if f == "-" else os.path.basename(f))
                try:
                    with progress_bar(f"adding {name or 'stdin'}", size, _want_progress(args, size)) as cb:
                        j = client.add(source, name=name, progress=_as_increments(cb), size=size)
                finally:
                    if f != "-":
                        source.close()
                j["file"] = f
                out.emit(j, f"added {j['root']} {human(j['size'])} {j['sri']} {f} (announced)")
        finally:
            client.close()
        return 0
    with _open(args, writable=True, create=True) as repo:
        for f in args.files:
            if f == "-":
                result = repo.add_stream(sys.stdin.buffer, name=args.name)
            else:
                size = os.path.getsize(f)
                with progress_bar(f"adding {os.path.basename(f)}", size, _want_progress(args, size)) as cb:
                    result = repo.add_file(f, name=args.name, progress=cb)
            j = result.to_json()
            j["file"] = f
            out.emit(j, f"added {result.root} {human(result.size)} {j['sri']} {f}")
    return 0


def _open_for_add(path: str):
    try:
        return open(path, "rb", buffering=0)
    except OSError as e:
        raise RepoError(f"cannot read {path}: {e.strerror}") from None


@contextlib.contextmanager
def _local_root(args: argparse.Namespace, repo: Repo, key: str) -> Iterator[CID]:
    """The root for `key`, held in the repo until the block ends (`RootReaders`: gc does not evict a root
    while it is read): from the repo, else fetched by the running daemon from the swarm. The root is
    checked only once it is held, so one the quota evicted between our look and our read is fetched again
    instead of failing "not in the repo"."""
    for _ in range(3):
        try:
            root: CID | None = repo.resolve(key)
        except NotFound:
            root = None
        if root is not None:
            with repo.readers.reading(root):
                if _complete_here(repo, root):
                    yield root
                    return
        _fetch_by_daemon(args, repo, key, root)
    raise RepoError(f"{key} was evicted again each time the daemon fetched it: its repo's quota has no room for it "
                    "while other reads hold theirs; retry, or raise `max_size`")


def _complete_here(repo: Repo, root: CID) -> bool:
    try:
        return repo.root_info(root).complete
    except NotFound:  # evicted since `resolve` named it
        return False


def _fetch_by_daemon(args: argparse.Namespace, repo: Repo, key: str, root: CID | None) -> None:
    """Have the running daemon fetch `key` into the repo (from the swarm)."""
    client = _daemon(args)
    if client is None:
        if root is not None and repo.index.get_root(root) is not None:  # there, but not whole
            raise CorruptData(f"{root} is incomplete in the repo and no daemon is running to fetch the rest; "
                              "start `p2pcache daemon`")
        raise NotFound(f"{key} is not in the repo {repo.path}; no daemon is running, so the swarm was not "
                       "asked (start `p2pcache daemon`)")
    try:
        with progress_bar(f"fetching {key[:24]}", None, _want_progress(args, None)) as cb:
            client.fetch(key, progress=_as_increments(cb))
    finally:
        client.close()


def _tree_tar(repo: Repo, root: CID):
    """A build cache tree (`kind` "tree") as the tar stream the cache's tar API gives, or None for an archive."""
    if repo.root_info(root).kind != "tree":
        return None
    return _tree_tar_read(repo, root)


def _tree_tar_read(repo: Repo, root: CID) -> Iterator[bytes]:
    from .buildcache import tree_as_tar
    from .buildtree import reading_tree
    from .content.treemanifest import TreeManifest

    with reading_tree(repo, root, str(root)):  # the daemon's gc keeps the tree until the tar is written
        yield from tree_as_tar(TreeManifest.decode(repo.load_block(root)), repo.load_block)


def cmd_get(args: argparse.Namespace, out: Output) -> int:
    with _open(args, writable=False) as repo, _local_root(args, repo, args.key) as root:
        tar = _tree_tar(repo, root)
        if tar is not None:  # a tree has no bytes of its own: it is written as a tar of its files
            written = _write_atomically(args.output, tar)
            out.emit({"root": str(root), "size": written, "output": args.output, "format": "tar"},
                     f"wrote the tree {root} as a tar of {human(written)} to {args.output}")
            return 0
        size = repo.root_info(root).size
        with progress_bar(f"getting {args.output}", size, _want_progress(args, size)) as cb:
            written = repo.get_to_file(root, args.output, progress=cb)
    out.emit({"root": str(root), "size": written, "output": args.output},
             f"wrote {human(written)} to {args.output} (verified {root})")
    return 0


def _write_atomically(path: str, pieces) -> int:
    tmp = f"{path}.p2pcache-{os.getpid()}.part"
    written = 0
    try:
        with open(tmp, "wb") as f:
            for piece in pieces:
                f.write(piece)
                written += len(piece)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return written


def cmd_cat(args: argparse.Namespace, out: Output) -> int:
    sink = sys.stdout.buffer
    with _open(args, writable=False) as repo, _local_root(args, repo, args.key) as root:
        for data in _tree_tar(repo, root) or repo.stream(root):
            sink.write(data)
    sink.flush()
    return 0


def cmd_ls(args: argparse.Namespace, out: Output) -> int:
    with _open(args, writable=False) as repo:
        roots = repo.index.list_roots()
        if not roots and not args.json:
            print("(no archives)", file=sys.stderr)
        for info in roots:
            obj = {
                "root": str(info.root), "name": info.name, "size": info.size, "kind": info.kind,
                "format": info.media_type, "pinned": info.pinned, "complete": info.complete,
                "last_access": info.last_access, "aliases": list(info.aliases),
            }
            flags = ("P" if info.pinned else "-") + ("" if info.complete else "!")
            out.emit(obj, f"{info.root}  {flags:2} {human(info.size):>10}  {info.name or ''}")
    return 0


def cmd_stat(args: argparse.Namespace, out: Output) -> int:
    with _open_for_hashing(args) if args.sha512 else _open(args, writable=False) as repo:
        root = repo.resolve(args.key)
        info = repo.root_info(root)
        manifest = repo.manifest(root)
        blocks = repo.index.root_blocks(root)
        stored = sum(repo.index.block_size(b) or 0 for b in blocks)
        sha256 = HashKey("sha256", manifest.hashes["sha256"])
        digest = repo.sha512(root) if args.sha512 else (
            repo.index.known_digest(root, "sha512") or manifest.hashes.get("sha512"))
        sha512 = HashKey("sha512", digest) if digest else None
        obj = {
            "root": str(root), "name": manifest.name, "size": manifest.size, "format": manifest.media_type,
            "sha256": sha256.digest.hex(), "sri": sha256.sri, "nix32": sha256.nix32,
            "sha512": sha512.digest.hex() if sha512 else None, "sri_sha512": sha512.sri if sha512 else None,
            "sha512_known": sha512 is not None,
            "chunker": manifest.chunker.to_ipld(), "depth": manifest.depth, "blocks": len(blocks),
            "block_bytes": stored, "pinned": info.pinned, "complete": info.complete,
            "added": info.added, "last_access": info.last_access,
        }
        c = manifest.chunker
        rows = [
            ("root", root), ("name", manifest.name or "-"), ("size", _size_text(manifest.size)),
            ("format", manifest.media_type or "-"), ("sha256", sha256.digest.hex()), ("sri", sha256.sri),
            ("nix32", sha256.nix32),
            ("sha512", sha512.sri if sha512 else "not computed yet (`p2pcache stat --sha512 KEY` computes it)"),
            ("chunker", f"{c.algorithm} min {human(c.min_size)} avg {human(c.avg_size)} max {human(c.max_size)}, "
                        f"normalisation {c.normalization}, seed {c.seed}"),
            ("blocks", f"{len(blocks)} ({human(stored)} stored), manifest depth {manifest.depth}"),
            ("pinned", "yes" if info.pinned else "no"), ("complete", "yes" if info.complete else "NO (blocks missing)"),
            ("added", _when(info.added)), ("last access", _when(info.last_access)),
        ]
        out.emit(obj, _table(rows))
    return 0


def _open_for_hashing(args: argparse.Namespace) -> Repo:
    """Writable if no daemon holds the repo (the computed hash is recorded), else read-only (computed only)."""
    try:
        return _open(args, writable=True)
    except RepoLocked:
        return _open(args, writable=False)


def cmd_pin(args: argparse.Namespace, out: Output, pinned: bool = True) -> int:
    client = _daemon(args) if Repo.exists(_repo_path(args)) else None
    if client is not None:
        try:
            root = client.set_pinned(args.key, pinned)["root"]
        finally:
            client.close()
        out.emit({"root": root, "pinned": pinned}, f"{'pinned' if pinned else 'unpinned'} {root}")
        return 0
    with _open(args, writable=True) as repo:
        root = repo.set_pinned(args.key, pinned)
    out.emit({"root": str(root), "pinned": pinned}, f"{'pinned' if pinned else 'unpinned'} {root}")
    return 0


def cmd_gc(args: argparse.Namespace, out: Output) -> int:
    from .store.repo import GcReport

    client = _daemon(args) if Repo.exists(_repo_path(args)) else None
    if client is not None:  # the daemon owns the repo; it also withdraws what it evicts from the DHT
        try:
            j = client.gc(args.max_size)
        finally:
            client.close()
        report = GcReport(roots_removed=[CID.parse(r) for r in j["roots_removed"]], blocks_removed=j["blocks_removed"],
                          bytes_freed=j["bytes_freed"], garbage_files_removed=j["garbage_files_removed"],
                          bytes_after=j["bytes_after"], over_quota=j["over_quota"])
    else:
        with _open(args, writable=True) as repo:
            report = repo.gc(args.max_size)
    text = (f"removed {len(report.roots_removed)} roots, {report.blocks_removed} blocks "
            f"({human(report.bytes_freed)}), {report.garbage_files_removed} garbage files; "
            f"{human(report.bytes_after)} stored")
    if report.disk_bytes_after:
        text += (f", {human(report.disk_bytes_after)} of pack files ({report.packs_compacted} packs compacted, "
                 f"{human(report.disk_bytes_reclaimed)} given back)")
    if report.over_quota:
        text += f" — still over {human(args.max_size)}: pinned roots hold the rest"
    out.emit(report.to_json(), text)
    return 0


def cmd_verify(args: argparse.Namespace, out: Output) -> int:
    with _open(args, writable=args.repair) as repo:
        report = repo.verify(repair=args.repair)
    if not args.json:
        for cid in report.corrupt:
            print(f"corrupt block {cid}", file=sys.stderr)
        for cid in report.missing:
            print(f"missing block {cid}", file=sys.stderr)
    state = "consistent" if report.consistent else ("repaired" if args.repair else "INCONSISTENT")
    text = (f"{state}: checked {report.blocks_checked} blocks, {len(report.corrupt)} corrupt, "
            f"{len(report.missing)} missing, {report.refcount_errors} refcount errors, "
            f"{len(report.garbage_files)} garbage files{' removed' if args.repair else ''}, "
            f"{len(report.roots_incomplete)} roots incomplete")
    out.emit(report.to_json(), text)
    if not report.consistent and not args.repair:
        return 4
    return 0


def cmd_migrate(args: argparse.Namespace, out: Output) -> int:
    """Convert a format-1 repo (file per block) to pack files in place; resumable after any interruption."""
    from .store.migrate import migrate

    def progress(done: int, total: int) -> None:
        if not args.json:
            print(f"migrated {done}/{total} blocks", file=sys.stderr, flush=True)

    report = migrate(_repo_path(args), progress=progress)
    if report.from_version == "2":
        text = f"repo {_repo_path(args)} is already format 2; nothing to do"
    else:
        text = (f"migrated {report.blocks_moved} blocks ({human(report.bytes_moved)}) into pack files"
                + (f"; dropped {report.blocks_dropped} corrupt or missing blocks (their archives are marked "
                   "incomplete)" if report.blocks_dropped else ""))
    out.emit(report.to_json(), text)
    return 0


def cmd_daemon(args: argparse.Namespace, out: Output) -> int:
    import trio

    from . import config as config_mod
    from .memory import keep_heap
    from .node import Node

    keep_heap()  # a long-running process: upload buffers stay in the heap between requests (memory.py)
    path = _repo_path(args)
    _open(args, writable=True, create=True).close()  # one-line errors for a repo we may not use or is locked
    cfg = config_mod.load(path, args.config)
    if args.max_size is not None:
        cfg.max_size = args.max_size
    if args.alone_warning is not None:
        cfg.alone_warning = args.alone_warning
    if args.listen:
        cfg.listen = args.listen
    if args.bootstrap:
        cfg.bootstrap = cfg.bootstrap + args.bootstrap
    if args.swarm_key is not None:  # a path on the command line is relative to where it was typed
        cfg.swarm_key = str(Path(args.swarm_key).expanduser().absolute()) if args.swarm_key else ""
    if args.api:
        cfg.api_listen = args.api
    if args.allow_peer:
        cfg.allow_peers = cfg.allow_peers + args.allow_peer
    if args.no_mdns:
        cfg.mdns = "off"
    if args.lookup_timeout is not None:
        cfg.lookup_timeout = args.lookup_timeout
    if args.negative_ttl is not None:
        cfg.negative_ttl = cfg.nix.negative_ttl = args.negative_ttl
    if args.upstream:
        cfg.nix.upstreams = cfg.nix.upstreams + args.upstream
    if args.sign_key is not None:
        cfg.nix.secret_key_file = args.sign_key
    if args.serve_local_store:
        cfg.nix.serve_local_store = True
    if args.local_store_root:
        cfg.nix.serve_local_store = True
        cfg.nix.local_store_root = args.local_store_root
    from .logs import setup_logging

    setup_logging(args.log_level or ("info" if args.verbose else cfg.log_level), args.log_format or cfg.log_format,
                  args.log_libraries or cfg.log_libraries or None)

    async def main() -> None:
        node = Node(path, cfg)
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            _warn_about_exposure(cfg)  # once it listens: a port it could not take exposes nothing
            st = node.status()
            out.emit(
                {**{k: st[k] for k in ("peer_id", "addrs", "api", "repo", "roots", "stored_bytes")}, "network": True,
                 "token_file": str(path / "api.token"), "netrc_file": str(path / "api.netrc")},
                f"p2pcache daemon ready\n  peer ID  {st['peer_id']}\n"
                + "".join(f"  listen   {a}\n" for a in st["addrs"])
                + f"  API      {st['api']}\n  token    {path / 'api.token'} (for nix copy --to: "
                f"--option netrc-file {path / 'api.netrc'})\n  repo     {st['repo']} ({st['roots']} archives, "
                f"{human(st['stored_bytes'])})",
            )
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except BaseException as e:  # trio wraps startup failures of its tasks in exception groups
        leaf = leaf_error(e)
        if isinstance(leaf, P2PCacheError):
            raise leaf from None
        if isinstance(leaf, OSError):
            raise RepoError(f"daemon could not start: {leaf.strerror or leaf} "
                            f"(API {cfg.api_listen}, listen {' '.join(cfg.listen)}); is another daemon running?") from None
        raise
    return 0


def _warn_about_exposure(cfg) -> None:
    """A node reachable beyond this machine without a swarm key lets anyone join and fetch."""
    import ipaddress
    import logging

    exposed = []
    for addr in cfg.listen:
        parts = addr.split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
            try:
                if not ipaddress.ip_address(parts[2]).is_loopback:
                    exposed.append(addr)
            except ValueError:
                exposed.append(addr)
    if exposed and not cfg.swarm_key:
        logging.getLogger("p2pcache.daemon").warning(
            "listening on %s without a swarm key: anyone who can reach this port can join the swarm and fetch "
            "what this node holds; make a key with `p2pcache swarm-key new -o swarm.key` and pass --swarm-key "
            "(or listen on /ip4/127.0.0.1/tcp/0)", ", ".join(exposed))


def cmd_fetch(args: argparse.Namespace, out: Output) -> int:
    """Fixed-output fetch helper: the swarm if anyone has it, else the origin URL; always verified."""
    from .content.keys import HashKey, parse_key

    key = parse_key(args.hash)
    if not isinstance(key, HashKey):
        raise InvalidInput(f"--hash must be a sha256/sha512 hash (SRI, hex or nix-base32), not {args.hash!r}")
    _check_url(args.url)
    client = _daemon(args) if Repo.exists(_repo_path(args)) else None
    if client is not None:
        try:
            with progress_bar(f"fetching {args.url[-40:]}", None, _want_progress(args, None)) as cb:
                result = client.fetch_url(args.url, args.hash, progress=_as_increments(cb))
        finally:
            client.close()
    else:
        import httpx

        with _open(args, writable=True, create=True) as repo:
            try:
                root = repo.resolve(key)
                result = {"root": str(root), "source": "local", "size": repo.root_info(root).size}
            except NotFound:
                try:
                    with httpx.stream("GET", args.url, follow_redirects=True,
                                      timeout=httpx.Timeout(60, read=300)) as resp:
                        if resp.status_code != 200:
                            raise NotFound(f"{args.url} answered HTTP {resp.status_code}")
                        res = repo.add_stream(resp.iter_bytes(), name=args.url.rstrip("/").rsplit("/", 1)[-1],
                                              expect=key)
                except httpx.HTTPError as e:
                    raise NotFound(f"cannot download {args.url}: {e}") from None
                result = {"root": str(res.root), "source": "origin", "size": res.size}
    if args.output:
        with _open(args, writable=False) as repo, _local_root(args, repo, result["root"]) as root:
            repo.get_to_file(root, args.output)
    result["url"] = args.url
    out.emit(result, f"{result['root']} {human(result['size'])} from {result['source']}"
             + (f" -> {args.output}" if args.output else ""))
    return 0


def _check_url(url: str) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidInput(f"{url!r} is not an http(s) URL; fetch needs the archive's origin URL "
                           "(e.g. https://example.org/src.tar.gz)")


def cmd_nix_hook(args: argparse.Namespace, out: Output) -> int:
    """Nix post-build-hook: push the outputs just built ($OUT_PATHS) to the local node. Never fails the
    build: a missing daemon or a failed push is reported on stderr and the hook exits 0."""
    import shutil
    import subprocess

    paths = os.environ.get("OUT_PATHS", "").split() + list(args.paths)
    drv = os.environ.get("DRV_PATH", "").strip()
    if not paths and drv:
        paths = _outputs_of(drv)  # Nix 2.8.0 runs the hook with OUT_PATHS empty (NixOS/nix#6446)
    if not paths:
        print("p2pcache nix-hook: no $OUT_PATHS, no outputs of $DRV_PATH and no paths given; nothing to push",
              file=sys.stderr)
        return 0
    try:
        client = _daemon(args)
    except RepoError as e:
        print(f"p2pcache nix-hook: {e}; not pushing {len(paths)} path(s)", file=sys.stderr)
        return 0
    if client is None:
        print(f"p2pcache nix-hook: no daemon running for {_repo_path(args)}; not pushing {len(paths)} path(s)",
              file=sys.stderr)
        return 0
    api = client.info["api"]
    client.close()
    nix = shutil.which("nix")
    if nix is None:
        print("p2pcache nix-hook: `nix` is not on PATH; cannot push", file=sys.stderr)
        return 0
    from .apitoken import NETRC_FILE

    # the daemon's netrc carries its API token: Nix's curl sends it as HTTP Basic credentials
    netrc = str(_repo_path(args) / NETRC_FILE)
    proc = subprocess.run([nix, "--extra-experimental-features", "nix-command", "--option", "netrc-file", netrc,
                           "copy", "--to", api, *paths], capture_output=True)
    if proc.returncode != 0:
        print(f"p2pcache nix-hook: pushing to {api} failed: {proc.stderr.decode(errors='replace').strip()}",
              file=sys.stderr)
        return 0
    out.emit({"pushed": paths, "api": api}, f"pushed {len(paths)} path(s) to {api}")
    return 0


def _outputs_of(drv: str) -> list[str]:
    """The outputs of a derivation, as `nix-store --query --outputs DRV` lists them (the hook runs once
    the build has registered them)."""
    import shutil
    import subprocess

    tool = shutil.which("nix-store")
    if tool is None:
        print(f"p2pcache nix-hook: $OUT_PATHS is empty and `nix-store` is not on PATH to read the outputs of {drv}",
              file=sys.stderr)
        return []
    proc = subprocess.run([tool, "--query", "--outputs", drv], capture_output=True)
    if proc.returncode != 0:
        print(f"p2pcache nix-hook: cannot read the outputs of {drv}: "
              f"{proc.stderr.decode(errors='replace').strip()}", file=sys.stderr)
        return []
    return proc.stdout.decode().split()


def cmd_status(args: argparse.Namespace, out: Output) -> int:
    client = _daemon(args, required=True)
    st = client.status()
    out.emit(st, format_status(st))
    return 0


def _size_text(n: int) -> str:
    return f"{human(n)} ({n} bytes)" if n >= 1024 else f"{n} bytes"


def _when(epoch: float | None) -> str:
    if not epoch:
        return "never"
    import time

    ago = max(0.0, time.time() - epoch)
    span = (f"{ago:.0f} s" if ago < 120 else f"{ago / 60:.0f} min" if ago < 7200 else
            f"{ago / 3600:.1f} h" if ago < 172800 else f"{ago / 86400:.0f} days")
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(epoch)) + f" ({span} ago)"


def _duration(seconds: float) -> str:
    s = int(seconds)
    return (f"{s // 86400}d {s % 86400 // 3600}h" if s >= 86400 else f"{s // 3600}h {s % 3600 // 60}m"
            if s >= 3600 else f"{s // 60}m {s % 60}s" if s >= 60 else f"{s}s")


def _table(rows: list[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in rows)
    lines = []
    for k, v in rows:
        values = v if isinstance(v, list) else [v]
        for i, item in enumerate(values or ["-"]):
            lines.append(f"{(k if i == 0 else ''):<{width}}  {item}")
    return "\n".join(lines)


def format_status(st: dict) -> str:
    """`p2pcache status` for people: units, no Python reprs (the JSON form has every raw field)."""
    lk, an = st.get("lookups", {}), st.get("announce", {})
    quota = st.get("quota_bytes")
    used = human(st["stored_bytes"]) + (f" of {human(quota)} quota ({100 * st['stored_bytes'] / quota:.0f} %)"
                                        if quota else " (no quota)")
    rows: list[tuple[str, object]] = [
        ("peer ID", st["peer_id"]), ("listen", list(st.get("addrs", []))), ("API", st.get("api") or "-"),
        ("repo", st["repo"]), ("version", st.get("version", "?")), ("uptime", _duration(st.get("uptime", 0))),
        ("archives", f"{st['roots']}" + (f" ({st['roots_incomplete']} incomplete)" if st.get("roots_incomplete") else "")),
        ("disk", used),
        ("peers", f"{st['peers']} connected"),
        ("served", f"{human(st['bytes_served'])} in {st['blocks_served']} blocks"),
        ("fetched", f"{human(st['bytes_fetched'])} from peers in {st['blocks_fetched']} blocks "
                    f"({st['duplicate_blocks']} duplicate), {human(st['bytes_fetched_origin'])} from origins"),
        ("fetches", f"{st['fetches']} ({st['fetch_failures']} failed)"),
        ("lookups", f"{lk.get('total', 0)} ({lk.get('found_dht', 0)} found, {lk.get('misses', 0)} missed, "
                    f"{lk.get('negative_hits', 0)} answered from the miss cache, {lk.get('rpcs', 0)} DHT RPCs)"),
        ("announced", f"{an.get('keys', 0)} keys ({an.get('provided', 0)} provided, {an.get('failed', 0)} failed, "
                      f"{an.get('pending', 0)} pending, {an.get('withdrawn', 0)} withdrawn, {an.get('sweeps', 0)} sweeps)"),
    ]
    if st.get("gc"):
        g = st["gc"]
        rows.append(("auto-gc", f"{g.get('runs', 0)} runs, {g.get('roots_evicted', 0)} archives evicted, "
                                f"{human(g.get('bytes_freed', 0))} freed"))
    if st.get("peers_penalised"):
        rows.append(("penalised", list(st["peers_penalised"])))
    return _table(rows)


def cmd_peers(args: argparse.Namespace, out: Output) -> int:
    client = _daemon(args, required=True)
    peers = client.peers()
    if not peers and not args.json:
        print("(no peers connected)", file=sys.stderr)
    for p in peers:
        out.emit(p, p["peer_id"])
    return 0


def cmd_swarm_key(args: argparse.Namespace, out: Output) -> int:
    from .net.pnet import format_swarm_key, new_swarm_key

    text = format_swarm_key(new_swarm_key())
    if args.output and args.output != "-":
        target = Path(args.output)
        if target.exists():
            raise RepoError(f"{target} exists; refusing to overwrite a swarm key")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        print(f"wrote a new swarm key to {target} (share it with your team's nodes only)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


# -- lock-file prefetch --------------------------------------------------------------------------
def _registries(args: argparse.Namespace):
    """Registry base URLs: `[prefetch.registries]` of REPO/config.toml, then --registry / --index-url."""
    import tomllib

    from .content.lockfiles import Registries

    reg = Registries()
    try:
        conf = tomllib.loads((_repo_path(args) / "config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        conf = {}
    for kind, url in (conf.get("prefetch", {}).get("registries", {}) or {}).items():
        reg.set(f"{kind}={url}")
    for spec in args.registry or ():
        reg.set(spec)
    if args.index_url:
        reg.pypi = args.index_url
    return reg


def _read_locks(args: argparse.Namespace):
    from .content.lockfiles import parse_lockfile

    registries = _registries(args)
    locks = []
    for path in args.lockfiles:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise RepoError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
        locks.append(parse_lockfile(path, text, registries))
    return locks


def cmd_prefetch(args: argparse.Namespace, out: Output) -> int:
    """Every pinned dependency of the lock files: repo → swarm → origin, each verified by its own hash."""
    import time

    from .prefetch import dependency_to_json

    if not 1 <= args.jobs <= 256:
        raise InvalidInput(f"-j {args.jobs}: parallel fetches must be between 1 and 256")
    locks = _read_locks(args)
    deps = [d for lock in locks for d in lock.dependencies]
    skipped = [(lock.path, s) for lock in locks for s in lock.skipped]
    for path, s in skipped:
        out.emit({"event": "skipped", "lockfile": path, "name": s.name, "reason": s.reason}, None) \
            if args.json else print(f"skipped {s.name}: {s.reason}", file=sys.stderr)
    show = _want_progress(args, None)
    entries: dict[int, dict] = {}
    started = time.monotonic()

    def on_event(event: dict) -> None:
        if event["event"] != "entry":
            return
        entries[event["index"]] = event
        if args.json:
            out.emit({k: v for k, v in event.items() if k not in ("index", "done", "of", "fetched")}, "")
        if show:
            print(f"\r{event['done']}/{event['of']} dependencies, {human(event['fetched'])} fetched",
                  end="", file=sys.stderr, flush=True)

    client = _daemon(args) if Repo.exists(_repo_path(args)) else None
    if client is not None:
        try:
            summary = client.prefetch([dependency_to_json(d) for d in deps], args.jobs, on_event)
        finally:
            client.close()
    else:
        import trio

        from .prefetch import Prefetcher
        from .store.origin import HttpOrigin

        async def run(repo: Repo) -> dict:
            origin = HttpOrigin(connections=max(8, args.jobs))
            try:
                _, summ = await Prefetcher(repo, origin).run(deps, args.jobs, on_event)
            finally:
                await origin.aclose()
            return summ.to_json()

        with _open(args, writable=True, create=True) as repo:
            summary = trio.run(run, repo)
    summary["skipped"] = len(skipped)
    if show:
        print(file=sys.stderr)
    elapsed = time.monotonic() - started
    failed = [entries[i] for i in sorted(entries) if entries[i]["source"] is None]
    if not args.json:
        for e in failed:
            print(f"failed {e['name']}@{e['version']}: {e['failure']}: {e['message']}", file=sys.stderr)
    if args.out:
        from .offline import write_layout

        with _open(args, writable=False) as repo:
            items = [(deps[i], CID.parse(e["root"])) for i, e in entries.items() if e["root"]]
            summary["layouts"] = write_layout(repo, items, Path(args.out))
    fetched = summary["bytes"]["peer"] + summary["bytes"]["origin"]
    text = (f"{summary['total']} dependencies: {summary['local']} local, {summary['peer']} from peers, "
            f"{summary['origin']} from origin, {summary['skipped']} skipped, {summary['failed']} failed; "
            f"{human(fetched)} fetched in {elapsed:.1f} s")
    if args.out:
        text += f"; offline layouts in {args.out}: " + ", ".join(f"{k} ({n})" for k, n in summary["layouts"].items())
    out.emit({"event": "summary", **summary, "seconds": round(elapsed, 3)}, text)
    return 1 if failed else 0


def cmd_lock2nix(args: argparse.Namespace, out: Output) -> int:
    """A Nix expression with one fixed-output fetchurl per dependency of the lock file."""
    from .content.lockfiles import DepHash
    from .content.lockfiles.nixexpr import to_nix

    locks = _read_locks(args)
    known: dict[str, DepHash] = {}
    if Repo.exists(_repo_path(args)):  # hashes Nix cannot check, verified here once: their sha256
        with _open(args, writable=False) as repo:
            for lock in locks:
                for d in lock.dependencies:
                    if d.hash is not None and d.hash.algo in ("h1", "sha384"):
                        root = repo.index.resolve_alias(d.hash.alias)
                        if root is not None:
                            known[d.hash.alias] = DepHash("sha256", repo.manifest(root).hashes["sha256"])
    text = to_nix([d for lock in locks for d in lock.dependencies], " ".join(args.lockfiles), known)
    if args.output and args.output != "-":
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


# -- build cache (`p2pcache cache …`) ----------------------------------------------------------------
# The CLI walks and writes the caller's paths itself, with the caller's permissions; a running daemon
# only receives blocks (re-hashed) and a root, and hands back a root the CLI then reads from the repo.


@contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """No cyclic garbage collection while a cache command walks a tree. A save or restore makes tens of
    thousands of small lists and entries that stay alive until the end, and each of the collector's full
    passes re-walks all of them (15 % of an unchanged re-save of 20,000 files) to find cycles this short-
    lived process does not make; reference counting still frees everything as it goes."""
    import gc

    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _offline_build_cache(args: argparse.Namespace):
    """The build cache service over the repo itself (no daemon: no swarm, local records only)."""
    from . import config as config_mod
    from .buildcache import BuildCache, RecordStore
    from .net.host import load_identity

    repo = _open(args, writable=True, create=True)
    pair = load_identity(repo.path / "identity.key")
    store = RecordStore(repo.path / "buildcache.sqlite")
    return BuildCache(repo, store, pair.private_key, pair.public_key.serialize(), config_mod.load(repo.path).buildcache)


def _last_tree(repo_path: Path, pid: str) -> tuple[CID, float, bytes | None] | None:
    """(root, scan time, scan digest) of the last tree saved or restored at these paths on this machine, if
    that tree is still complete in the repo; read-only."""
    from .buildrecords import RecordStore

    db = repo_path / "buildcache.sqlite"
    if not db.exists() or not Repo.exists(repo_path):
        return None
    store = RecordStore(db, readonly=True)
    try:
        last = store.last_save(pid)
    finally:
        store.close()
    if last is None:
        return None
    try:
        with Repo.open(repo_path, writable=False) as repo:
            info = repo.index.get_root(last[0])
            return last if info is not None and info.complete else None
    except P2PCacheError:
        return None


def _stat_cache(repo_path: Path, root: CID):
    """The stat cache for a save: the entries and pages of the tree `root` (see `_last_tree`)."""
    from .buildtree import previous_entries
    from .content.treemanifest import TreeManifest

    try:
        with Repo.open(repo_path, writable=False) as repo:
            return previous_entries(TreeManifest.decode(repo.load_block(root)), repo.load_block)
    except P2PCacheError:
        return None


def cmd_cache_save(args: argparse.Namespace, out: Output) -> int:
    with _no_cycle_collection():
        return _cache_save(args, out)


def _cache_save(args: argparse.Namespace, out: Output) -> int:
    # the service (p2pcache.buildcache) only without a daemon: imports are part of every call's time
    from .buildtree import paths_id, save_tree, scan_paths, unchanged_tree
    from .cacheupload import DaemonBlockSink
    from .content.cacherecord import check_cache_key

    check_cache_key(args.key)
    for p in args.paths:
        if not os.path.lexists(p):
            raise InvalidInput(f"cannot save {p}: it does not exist")
    if args.sources is not None and not os.path.isdir(args.sources):
        raise InvalidInput(f"--sources {args.sources}: not a directory")
    pid = paths_id(args.paths)
    client = _daemon(args) if Repo.exists(_repo_path(args)) else None
    service = None if client is not None else _offline_build_cache(args)
    try:
        if not args.force:
            if client is not None:
                existing = client.cache_lookup(args.key, [], True)["match"] == "exact"
            else:
                import trio

                assert service is not None  # opened whenever there is no daemon
                existing = bool(trio.run(service.find, args.key, False))
            if existing:
                out.emit({"saved": False, "reason": "exists", "key": args.key},
                         f"cache key {args.key} exists; not saved (keys are immutable: --force to replace it)")
                return 0
        sink: Any
        if client is not None:
            sink = DaemonBlockSink(client)
            sink.open_lease()  # before the stat cache is read: what it finds complete then stays until the save
        else:
            from .buildcache import RepoBlockSink

            assert service is not None
            sink = RepoBlockSink(service.repo)
        last = None if args.rehash else _last_tree(_repo_path(args), pid)
        scan = scan_paths(args.paths)
        # The walk describes exactly the last tree saved here (same digest, nothing racily new): that tree
        # again, with no file read and no page built. Else the stat cache: that tree's entries.
        report = unchanged_tree(scan, last[0], last[2], last[1]) if last and args.sources is None else None
        previous = _stat_cache(_repo_path(args), last[0]) if last and report is None else None
        if previous is not None and client is not None:
            previous.held = True
        for attempt in (0, 1):
            if report is None:
                report = save_tree(args.paths, sink, sources_dir=args.sources, previous=previous,
                                   previous_scan=last[1] if last else 0.0, scan=scan)
            try:
                if client is not None:
                    assert isinstance(sink, DaemonBlockSink)
                    lease, sink.lease = sink.lease, None  # the save ends it, whatever happens; a retry opens another
                    result = client.cache_save(args.key, str(report.root), args.force, pid, report.scan_time, lease,
                                               report.scan_digest)
                else:
                    import trio

                    assert service is not None
                    result = trio.run(service.save, args.key, report.root, args.force, pid, report.scan_time, None,
                                      report.scan_digest)
                break
            except NotFound:
                if attempt:
                    raise
                # blocks the stat cache relied on went away meanwhile: walk again and read everything
                previous, report, scan = None, None, scan_paths(args.paths)
    finally:
        if client is not None:
            client.close()
        if service is not None:
            service.store.close()
            service.repo.close()
    assert report is not None  # the loop above saved (break) or raised
    j = {**result, "tree": report.to_json()}
    if not result.get("saved"):
        out.emit(j, f"cache key {args.key} exists; not saved (--force to replace it)")
        return 0
    for path, why in report.skipped:
        print(f"p2pcache cache save: skipped {path} ({why})", file=sys.stderr)
    out.emit(j, f"saved {args.key} -> {report.root}: {report.files} files ({human(report.bytes)}), "
                f"{report.dirs} dirs, {report.symlinks} symlinks; new {human(report.new_bytes)} in "
                f"{report.new_blocks} blocks; read {report.files_read} files"
                + (f"; {report.sources} sources recorded" if args.sources is not None else ""))
    return 0


def cmd_cache_restore(args: argparse.Namespace, out: Output) -> int:
    with _no_cycle_collection():
        return _cache_restore(args, out)


def _cache_restore(args: argparse.Namespace, out: Output) -> int:
    from contextlib import ExitStack

    from .buildtree import paths_id

    pid = paths_id(args.paths)
    client = _daemon(args) if Repo.exists(_repo_path(args)) else None
    restored = None
    # Every read of the tree, from its first block to the timestamps, is under one `reading_tree` scope
    # (on `stack`), so the daemon's gc keeps the tree until the restore is over.
    with ExitStack() as stack:
        if client is not None:
            try:
                repo = stack.enter_context(Repo.open(_repo_path(args), writable=False))
                found, restored = _restore_while_fetched(client, args, pid, repo, stack)
            finally:
                client.close()
        else:
            found = _cache_lookup_offline(args, pid)
            repo = None
        return _cache_restore_found(args, out, found, restored, repo, stack)


def _cache_lookup_offline(args: argparse.Namespace, pid: str) -> dict:
    """The lookup with no daemon: this process owns the repo (no other gc runs on it meanwhile)."""
    import trio

    service = _offline_build_cache(args)
    try:
        return trio.run(service.lookup, args.key, args.restore_key, args.lookup_only, pid)
    finally:
        service.store.close()
        service.repo.close()


def _cache_restore_found(args: argparse.Namespace, out: Output, found: dict, restored: tuple | None,
                         repo: Repo | None, stack: Any) -> int:
    from .buildtree import fix_timestamps, reading_tree, restore_tree

    if found["match"] == "none":
        tried = ", ".join([args.key] + [f"{p}*" for p in args.restore_key])
        if args.fail_on_miss:
            raise NotFound(f"no cache entry for {tried}")
        out.emit({"match": "none", "key": None, "requested": args.key}, f"cache miss: no entry for {tried}")
        return 0
    how = "exact key" if found["match"] == "exact" else f"prefix {found['prefix']!r}"
    if args.lookup_only:
        out.emit(found, f"cache hit ({how}): {found['key']} -> {found['root']} (lookup only, nothing restored)")
        return 0
    if repo is None:
        repo = stack.enter_context(Repo.open(_repo_path(args), writable=False))
    root = CID.parse(found["root"])
    if restored is not None:  # written while it arrived, under the scope `_restore_while_fetched` took
        report, manifest, mtimes = restored
    else:
        stack.enter_context(reading_tree(repo, root, repr(found["key"])))
        # Chunks as views into each run's one read buffer: written to the files and let go, never copied
        report, manifest, mtimes = restore_tree(root, repo.load_block, args.paths, load_many=repo.load_views)
    sources = args.sources if args.sources is not None else (
        manifest.sources["path"] if manifest.sources is not None else None)
    if sources is not None and manifest.sources is not None and os.path.isdir(sources):
        fix_timestamps(manifest, repo.load_block, sources, args.paths, mtimes, report, args.mtime_mode)
    line = report.refused_line()
    if line:
        print(f"p2pcache cache restore: {line}", file=sys.stderr)
    j = {**found, "restored": report.to_json()}
    text = (f"restored {found['key']} ({how}) -> {found['root']}: {report.files} files ({human(report.bytes)}), "
            f"{report.dirs} dirs, {report.symlinks} symlinks")
    if report.stripped:
        text += f"; stripped setuid/setgid bits of {report.stripped}"
    if manifest.sources is not None:
        text += (f"; sources: {report.sources_unchanged} unchanged, {len(report.sources_changed)} changed, "
                 f"{len(report.sources_new)} new, {len(report.sources_deleted)} deleted"
                 + (f" ({', '.join(report.sources_deleted[:5])})" if report.sources_deleted else ""))
    out.emit(j, text)
    return 0


def _restore_while_fetched(client, args: argparse.Namespace, pid: str, repo: Repo,
                           stack: Any) -> tuple[dict, tuple | None]:
    """The daemon's lookup; when it has to fetch the tree from the swarm, the tree's files are written
    while its blocks arrive (`ArrivingBlocks`), instead of after the whole fetch. Returns (the lookup's
    answer, restore_tree's result or None when nothing was restored yet). If the lookup ends on another
    tree than the one being written (its fetch failed and an older record won) or on an error, what was
    written is removed again (`undo_restore`) and the caller restores the answer's tree the usual way."""
    import queue
    import threading
    from contextlib import ExitStack

    from .buildtree import ArrivingBlocks, RestoreReport, TreeSuperseded, reading_tree, restore_tree, undo_restore

    if args.lookup_only:
        return client.cache_lookup(args.key, args.restore_key, args.lookup_only, pid), None
    started: queue.Queue = queue.Queue()
    outcome: dict = {}
    arriving: list[ArrivingBlocks] = []

    def on_event(event: dict) -> None:
        if event.get("event") != "fetching":
            return
        root = CID.parse(event["root"])
        if arriving:
            if arriving[0].root != root:
                arriving[0].end(root)  # the first tree's fetch failed: it will not arrive whole
            return
        arriving.append(ArrivingBlocks(root, repo.load_block, repo.load_views,
                                       lambda cids: set(repo.index.locate_many(cids))))
        started.put(True)

    def lookup() -> None:
        try:
            outcome["found"] = client.cache_lookup(args.key, args.restore_key, False, pid, on_event=on_event)
        except BaseException as e:  # handed to the main thread, raised there
            outcome["error"] = e
        if arriving:
            found = outcome.get("found")
            arriving[0].end(CID.parse(found["root"]) if found and found.get("root") else None)
        started.put(False)

    thread = threading.Thread(target=lookup, name="cache-lookup", daemon=True)
    thread.start()
    restored = None
    if started.get():
        report = RestoreReport()
        stream = arriving[0]
        # Not registered yet (the fetch's blocks are its own until the daemon registers the root, which
        # it does inside this scope); kept on `stack` for the timestamps, unless undone below.
        scope = stack.enter_context(ExitStack())
        scope.enter_context(reading_tree(repo, stream.root, repr(args.key), registered=False))
        try:
            restored = restore_tree(stream.root, stream.load, args.paths, load_many=stream.load_many,
                                    report=report)
        except TreeSuperseded:
            restored = None
        thread.join()
        found = outcome.get("found")
        if restored is None or found is None or found.get("root") != str(stream.root):
            n = undo_restore(report)
            print(f"p2pcache cache restore: tree {stream.root} did not arrive whole (the lookup ended on "
                  f"{(found.get('root') or 'no tree') if found else 'an error'}); removed the {n} entries written from it",
                  file=sys.stderr)
            restored = None
            scope.close()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["found"], restored


def cmd_cache_admin(args: argparse.Namespace, out: Output) -> int:
    """cache ls / pin / unpin / expire: through the daemon when one runs, else on the repo."""
    what = args.cache_command
    client = _daemon(args) if Repo.exists(_repo_path(args)) else None
    if client is not None:
        try:
            if what in ("pin", "unpin"):
                result = client.cache_call(what, {"key": args.key})
            else:
                result = client.cache_call("keys" if what == "ls" else "expire", {})
        finally:
            client.close()
    else:
        service = _offline_build_cache(args)
        try:
            if what in ("pin", "unpin"):
                result = service.set_pinned(args.key, what == "pin")
            elif what == "ls":
                result = {"keys": service.list_keys()}
            else:
                result = service.expire()
        finally:
            service.store.close()
            service.repo.close()
    if what == "ls":
        for k in result["keys"]:
            flags = ("P" if k["pinned"] else "-") + ("" if k["held"] else "!")
            out.emit(k, f"{k['key']}  {flags:2} {k['root']}  {k['writer']}")
    elif what == "expire":
        out.emit(result, f"evicted {len(result['expired'])} idle trees ({human(result['bytes_freed'])} freed)")
    else:
        out.emit(result, f"{what}ned {result['key']} ({result['root']})")
    return 0


def _add_cache_parser(sub, common: argparse.ArgumentParser) -> None:
    cache = sub.add_parser("cache", parents=[common], help="build-directory cache: save and restore by key",
                           description="Save and restore build directories by key, shared through the swarm.")
    cs = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    sp = cs.add_parser("save", parents=[common], help="save PATHs under KEY (keys are immutable unless --force)")
    sp.set_defaults(fn=cmd_cache_save)
    sp.add_argument("key", metavar="KEY")
    sp.add_argument("paths", nargs="+", metavar="PATH")
    sp.add_argument("--force", action="store_true", help="replace an existing key")
    sp.add_argument("--sources", metavar="DIR", help="record (path, sha256, mtime) of the sources under DIR")
    sp.add_argument("--rehash", action="store_true", help="read every file (do not trust size+mtime of the last save)")
    sp = cs.add_parser("restore", parents=[common], help="restore KEY (else the newest key with a --restore-key prefix)")
    sp.set_defaults(fn=cmd_cache_restore)
    sp.add_argument("key", metavar="KEY")
    sp.add_argument("paths", nargs="+", metavar="PATH")
    sp.add_argument("--restore-key", action="append", default=[], metavar="PREFIX",
                    help="fallback key prefix, tried in order (repeatable)")
    sp.add_argument("--lookup-only", action="store_true", help="report the match, restore nothing")
    sp.add_argument("--fail-on-miss", action="store_true", help="exit 3 when nothing matches")
    sp.add_argument("--sources", metavar="DIR", help="sources to compare (default: the directory saved with --sources)")
    sp.add_argument("--mtime-mode", choices=("ordered", "exact"), default="ordered",
                    help="unchanged sources older than every restored file (make), or their saved mtimes (ninja, cargo)")
    for name, help in (("ls", "list the cache keys this node holds"), ("expire", "evict idle trees now")):
        sp = cs.add_parser(name, parents=[common], help=help)
        sp.set_defaults(fn=cmd_cache_admin)
    for name in ("pin", "unpin"):
        sp = cs.add_parser(name, parents=[common], help=f"{name} a cache key's tree ({'kept' if name == 'pin' else 'evictable'})")
        sp.set_defaults(fn=cmd_cache_admin)
        sp.add_argument("key", metavar="KEY")


def _daemon(args: argparse.Namespace, required: bool = False):
    from .client import DaemonClient

    client = DaemonClient.find(_repo_path(args))
    if client is None and required:
        raise RepoError(f"no daemon is running for {_repo_path(args)}; start one with `p2pcache daemon`")
    return client


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (the full usage is one `--help` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--repo", default=argparse.SUPPRESS,
                        help="repo directory (default: $P2PCACHE_REPO or $XDG_DATA_HOME/p2pcache)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    common.add_argument("--progress", choices=("auto", "always", "never"), default=argparse.SUPPRESS,
                        help="progress bar on stderr (auto: on a terminal, for files over 64 MiB)")

    p = _Parser(prog="p2pcache", parents=[common],
                                description="Peer-to-peer cache node for CI runners and Nix.")
    p.add_argument("--version", action="version", version=f"p2pcache {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, parents=[common], help=help, description=help)
        sp.set_defaults(fn=fn)
        return sp

    add("init", cmd_init, "create a repo")
    sp = add("add", cmd_add, "add archives (files, or - for stdin) to the repo")
    sp.add_argument("files", nargs="+", metavar="FILE")
    sp.add_argument("--name", help="name to record (default: the file's base name)")
    sp = add("get", cmd_get, "write an archive to a file, verified, atomically")
    sp.add_argument("key", metavar="KEY", help="root CID, sha256:<hex>, SRI or nix-base32 hash")
    sp.add_argument("-o", "--output", required=True, metavar="OUT", help="file to write (replaced atomically)")
    sp = add("cat", cmd_cat, "write an archive to stdout, verified")
    sp.add_argument("key", metavar="KEY")
    add("ls", cmd_ls, "list archives in the repo")
    sp = add("stat", cmd_stat, "show an archive's manifest and storage")
    sp.add_argument("key", metavar="KEY")
    sp.add_argument("--sha512", action="store_true", help="compute the sha512 if it is not known yet (and record it)")
    sp = add("pin", cmd_pin, "keep an archive through gc")
    sp.add_argument("key", metavar="KEY")
    sp = add("unpin", lambda a, o: cmd_pin(a, o, pinned=False), "let gc evict an archive again")
    sp.add_argument("key", metavar="KEY")
    sp = add("gc", cmd_gc, "remove garbage; with --max-size evict least-recently-used unpinned archives")
    sp.add_argument("--max-size", type=parse_size, metavar="SIZE", help="quota for stored blocks, e.g. 10G")
    sp = add("verify", cmd_verify, "re-hash every block and check the index")
    sp.add_argument("--repair", action="store_true", help="drop corrupt blocks, mark their roots incomplete")
    add("migrate", cmd_migrate, "convert a format-1 repo (one file per block) to pack files, in place")
    sp = add("daemon", cmd_daemon, "run the node: swarm, DHT, bitswap, local API (holds the repo)")
    sp.add_argument("--config", metavar="FILE",
                    help="read settings from FILE instead of REPO/config.toml (relative paths in it: from its directory)")
    sp.add_argument("--max-size", type=parse_size, metavar="SIZE",
                    help="disk quota for stored blocks, e.g. 20G: least-recently-used unpinned archives are evicted "
                         "past 90 %% of it (config [gc])")
    sp.add_argument("--listen", action="append", metavar="MULTIADDR",
                    help="libp2p listen address (repeatable; default from config.toml)")
    sp.add_argument("--bootstrap", action="append", metavar="MULTIADDR", help="peer to join (…/p2p/<id>)")
    sp.add_argument("--swarm-key", metavar="FILE", help="pre-shared swarm key file ('' for none)")
    sp.add_argument("--allow-peer", action="append", metavar="PEER_ID", help="only these peers may connect")
    sp.add_argument("--no-mdns", action="store_true", help="do not look for the swarm's nodes on the LAN (mDNS)")
    sp.add_argument("--api", metavar="HOST:PORT", help="local HTTP API address (default 127.0.0.1:37515)")
    sp.add_argument("--lookup-timeout", type=float, metavar="SECONDS",
                    help="upper bound for one DHT provider lookup (default 5; a miss never waits longer)")
    sp.add_argument("--negative-ttl", type=float, metavar="SECONDS", help="how long a miss is remembered")
    sp.add_argument("--upstream", action="append", metavar="URL", help="binary cache to pull through (repeatable)")
    sp.add_argument("--sign-key", metavar="FILE",
                    help="sign the narinfos of paths pushed with the API token with this Nix secret key")
    sp.add_argument("--serve-local-store", action="store_true", help="also share this machine's /nix/store")
    sp.add_argument("--local-store-root", metavar="DIR", help="share a chroot Nix store (--store DIR) instead")
    sp.add_argument("-v", "--verbose", action="store_true", help="same as --log-level info")
    sp.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                    help="our log level (default warning; config [log] level)")
    sp.add_argument("--log-format", choices=("text", "json"),
                    help="log lines on stderr as text or JSON objects (default text; config [log] format)")
    sp.add_argument("--log-libraries", choices=("debug", "info", "warning", "error"), metavar="LEVEL",
                    help="py-libp2p's and hypercorn's level (default: warning, repeats held back)")
    sp.add_argument("--alone-warning", type=float, metavar="SECONDS",
                    help="warn if no peer completed a handshake this long after start (default 30; 0: never)")
    sp = add("fetch", cmd_fetch, "get an archive by hash: the swarm if anyone has it, else URL; verify, add")
    sp.add_argument("url", metavar="URL")
    sp.add_argument("--hash", required=True, metavar="HASH", help="expected hash: SRI, sha256:<hex> or nix-base32")
    sp.add_argument("-o", "--output", metavar="OUT", help="also write the archive to OUT")
    sp = add("nix-hook", cmd_nix_hook, "Nix post-build-hook: push $OUT_PATHS (or $DRV_PATH's outputs) to the local node")
    sp.add_argument("paths", nargs="*", metavar="PATH", help="store paths (default: $OUT_PATHS)")
    add("status", cmd_status, "show the running daemon's counters")
    add("peers", cmd_peers, "list the running daemon's connected peers")
    sp = add("swarm-key", cmd_swarm_key, "make a pre-shared key for a private team swarm")
    sp.add_argument("action", choices=["new"])
    sp.add_argument("-o", "--output", metavar="FILE", help="write to FILE (mode 0600) instead of stdout")
    sp = add("prefetch", cmd_prefetch, "fetch every dependency of lock files: repo, swarm, origin; each verified")
    sp.add_argument("lockfiles", nargs="+", metavar="LOCKFILE")
    sp.add_argument("-j", "--jobs", type=int, default=8, metavar="N", help="parallel fetches (default 8)")
    sp.add_argument("--out", metavar="DIR", help="also write offline layouts (npm cache, find-links, GOPROXY, "
                    "cargo vendor, gems) under DIR")
    sp.add_argument("--index-url", metavar="URL", help="PEP 503/691 simple index for poetry.lock files")
    sp.add_argument("--registry", action="append", metavar="KIND=URL",
                    help="registry base URL for lock files without full URLs: npm, cargo (dl template), pypi, go, gem")
    sp = add("lock2nix", cmd_lock2nix, "write a Nix expression with one fetchurl per lock-file dependency")
    sp.add_argument("lockfiles", nargs="+", metavar="LOCKFILE")
    sp.add_argument("-o", "--output", metavar="FILE", help="write to FILE (default stdout)")
    sp.add_argument("--index-url", metavar="URL", help=argparse.SUPPRESS)
    sp.add_argument("--registry", action="append", metavar="KIND=URL", help="as for prefetch")
    _add_cache_parser(sub, common)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name, default in (("repo", None), ("json", False), ("progress", "auto")):
        if not hasattr(args, name):
            setattr(args, name, default)
    out = Output(args.json)
    try:
        try:
            return args.fn(args, out)
        except BaseExceptionGroup as group:  # trio's nurseries wrap what their tasks raised
            leaf = leaf_error(group)
            if isinstance(leaf, P2PCacheError):
                raise leaf from None
            raise
    except P2PCacheError as e:
        print(f"p2pcache {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"p2pcache {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        try:
            sys.stdout = None
        finally:
            return 141


if __name__ == "__main__":
    sys.exit(main())
