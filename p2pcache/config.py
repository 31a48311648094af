"""Node configuration: `REPO/config.toml`, written with defaults by `init`, overridden by flags.

Only the daemon reads it; offline commands need nothing but the repo directory.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InvalidInput

if TYPE_CHECKING:
    from .buildcache import BuildCacheConfig

DEFAULT_API = "127.0.0.1:37515"
# The exchange defaults, as measured with simnet's node-fetch (real Nodes; see README "simnet").
SUPERSEED_WINDOW = 1.0
# Swarm mode (node.exchange_configs' fan-out) measured better at 20 real Nodes (p99 1.78x vs 1.93x) but far
# worse at 80 (9.45x and 1.96 seed copies vs 3.22x and 1.0007): full-mesh HAVE traffic grows with the
# square of the fleet, and a fetch with no provider waits its 30 s DONT_HAVE wait. Off for fleets.
SWARM_FETCH = False
HAVE_BATCH_DELAY = 0.0
# Super-seeding's share: lent blocks one peer may hold that no other peer has got since, while others are
# refused. Without it the seed's first DAG stream took every block and the fleet fed from one runner
# (node-fetch 20 x 16 MiB, LAN mesh). Measured in simnet (README).
SUPERSEED_SHARE = 8
# Super-seeding of blocks this node fetched from the swarm: refused to others only this long after it
# passed one on (the seed's own blocks keep SUPERSEED_WINDOW). node-fetch 20 x 16 MiB, LAN mesh: p99
# 1.64-1.67x with the full window for every block, 1.49x (seed 1) with 20 ms (README).
SUPERSEED_RELAY_WINDOW = 0.02

DEFAULT_TOML = f"""\
# p2pcache node configuration. Flags given to `p2pcache daemon` override these values.

[swarm]
# libp2p listen addresses. Use /ip4/127.0.0.1/tcp/0 to stay on loopback with a random port.
listen = ["/ip4/0.0.0.0/tcp/4011"]
# Multiaddrs with /p2p/<peer id> of nodes to join, e.g. other CI runners of the team.
bootstrap = []
# Pre-shared swarm key file (kubo's swarm.key format; `p2pcache swarm-key new > swarm.key`).
# Relative paths are relative to this file's directory. Empty: no private network.
swarm_key = ""
# Only these peer IDs may connect (empty: anyone who has the swarm key).
allow_peers = []
# Find the swarm's other nodes on the LAN by mDNS: "private" (on when a swarm key is set), "on", "off"
# (`p2pcache daemon --no-mdns`). The swarm key and allow_peers still gate every connection.
mdns = "private"
# Seconds a dial and its handshakes may take before that address counts as unreachable (a host that
# drops packets holds a dial this long; the daemon does not wait on it for anything else).
handshake_timeout = 10

[routing]
# Seconds between re-announcements of every root this node holds (one batched sweep).
reannounce_interval = 3600
# Upper bound in seconds for a provider lookup; a miss never stalls a caller longer.
lookup_timeout = 5.0
# Seconds a "nobody has it" answer is remembered.
negative_ttl = 30

[transfer]
# How whole archives and NARs are fetched from peers: "dag" (the /p2pcache/dag/1.0.0 protocol, one
# stream per request, bitswap for peers that do not speak it) or "bitswap" (one want per block).
protocol = "dag"
# Seconds a DAG stream may stay silent before its peer is dropped (and banned) and others take over.
stall_timeout = 20.0

[exchange]
# Super-seeding: a block this node handed to one peer less than this many seconds ago is refused
# (DONT_HAVE) to others, so peers fetch it from each other and this node's uplink carries each block
# about once; they hear HAVE when the window ends. 0 turns it off. Measured in simnet (README).
superseed_window = {SUPERSEED_WINDOW:g}
# Swarm mode for fetches: ask providers for blocks and every other peer only whether it has them
# (want-have), for fleets that fetch one artifact at once. Measured in simnet (README).
swarm_fetch = {str(SWARM_FETCH).lower()}
# Seconds the HAVEs for blocks this node just got wait to go out together (one message per watching
# peer for all blocks added meanwhile, not one per block). 0 sends them at once. Measured in simnet (README).
have_batch_delay = {HAVE_BATCH_DELAY:g}
# With super-seeding: blocks lent to one peer that no other peer has got from it yet, at most, while
# other peers are refused; it gets more as they spread (BitTorrent's super-seeding). 0 = no bound.
superseed_share = {SUPERSEED_SHARE}
# With super-seeding: seconds a block this node fetched from the swarm (not one it added) is refused to
# others after it handed it to one peer (others hold it already; the window above guards the blocks only
# this node has). Measured in simnet (README).
superseed_relay_window = {SUPERSEED_RELAY_WINDOW:g}

[http]
# Local API (CLI, Nix substituter, hashed mirror). Keep it on loopback.
listen = "{DEFAULT_API}"
# Host names besides loopback and the listen address that requests may carry (DNS-rebinding guard).
allowed_hosts = []
# Web origins allowed to call the node from a browser, e.g. ["http://dashboard.internal:8080"].
# Empty: any request carrying an Origin header is refused.
allowed_origins = []

[nix]
# Priority this cache announces in nix-cache-info (lower wins; cache.nixos.org uses 40).
priority = 30
# Also share what this machine's /nix/store holds (read-only), like peerix.
serve_local_store = false
# Binary caches to pull through when no peer has a path, e.g. ["https://cache.nixos.org"].
upstreams = []
# Sign the narinfos of paths pushed to this node with its API token (nix-store --generate-binary-cache-key).
secret_key_file = ""
# Uploaded NARs wait this many seconds for their narinfo, then they are dropped.
upload_ttl = 600
# Bytes (NAR size) that uploads waiting for their narinfo may hold at once (16 GiB); beyond it: 507.
upload_quota = 17179869184
# Largest NAR (compressed upload or decompressed NAR) accepted by PUT /nar/… (8 GiB); bigger: 413.
max_upload_size = 8589934592
# Where a narinfo is looked for, in order: "repo" (this node's own, always asked), "nixstore" (this
# machine's store, with serve_local_store), "swarm" (peers and gateways), "upstreams" (the caches above).
lookup_order = ["repo", "nixstore", "swarm", "upstreams"]

[gc]
# Disk quota for stored blocks, e.g. "20G" (K/M/G/T are powers of 1024). Empty: no quota.
max_size = ""
# When stored blocks pass high_watermark x max_size, the daemon evicts least-recently-used unpinned
# archives (and withdraws them from the DHT) until they are under low_watermark x max_size.
high_watermark = 0.9
low_watermark = 0.7
# Seconds between quota checks (a check also follows every add and fetch).
interval = 60

[log]
# Our log level: debug, info, warning, error. Libraries (py-libp2p, hypercorn) log at warning
# unless `libraries` says otherwise.
level = "warning"
# "text" or "json" (one object per line, for CI log collectors).
format = "text"
libraries = ""
# Warn if no peer completed a handshake this many seconds after start (0: never).
alone_warning = 30

# [prefetch.registries]
# Registry base URLs for `p2pcache prefetch` / `lock2nix` when a lock file has no full URLs
# (--registry KIND=URL overrides): npm = "…", cargo = "<dl template>", pypi = "<simple index>", go = "<GOPROXY>", gem = "…"

[buildcache]
# A saved tree nobody saved or restored for this many days is evicted (pinned keys stay).
idle_expiry_days = 7
# Key records older than this are ignored (and the key may be saved again).
record_max_age_days = 30
# Who may write which keys: the first rule whose pattern matches a key decides (no match: nobody).
# peers are libp2p peer IDs, or "*" for any node in the swarm. Protect the default branch, e.g.:
#   writers = [{{ keys = "main/*", peers = ["12D3KooW…runner1", "12D3KooW…runner2"] }},
#              {{ keys = "pr/*", peers = ["*"] }}]
writers = [{{ keys = "*", peers = ["*"] }}]
"""


LOOKUP_SOURCES = ("repo", "nixstore", "swarm", "upstreams")


@dataclass
class NixConfig:
    """`[nix]`: the Nix binary cache service (p2pcache.nixcache)."""

    store_dir: str = "/nix/store"
    priority: int = 30
    want_mass_query: bool = True
    serve_local_store: bool = False  # share what this machine's Nix store holds (read-only)
    local_store_root: str = ""  # a chroot store (`--store DIR`) instead of the system store
    upstreams: list[str] = field(default_factory=list)
    secret_key_file: str = ""  # nix-store --generate-binary-cache-key output
    negative_ttl: float = 30.0
    upload_ttl: float = 600.0  # an uploaded NAR waits this long for its narinfo, then it is dropped
    # Room for two of the largest uploads in flight at once (`nix copy` pushes a few paths in parallel).
    upload_quota: int = 16 << 30  # NAR bytes that uploads waiting for their narinfo may hold at once
    max_upload_size: int = 8 << 30  # largest upload (compressed file or the NAR inside it)
    # A narinfo answered by a remote source starts lookups of its references, and theirs in turn (Nix asks
    # for them next, one closure level at a time), at most this many at once; 0 turns it off.
    lookahead_lookups: int = 8
    # A narinfo (or NAR) request waits this many seconds for a lookup in the swarm or upstreams (None: the
    # routing lookup_timeout); still going, it is answered 503, which Nix retries (download-attempts,
    # backing off from 250 ms) and caches nothing, and the lookup goes on for up to lookup_patience
    # seconds so the retry finds the answer. Nix 2.8's five attempts span at least 5 waits + 3.75 s: the
    # default patience (None) is 4 waits + 3 s, so the lookup has ended before Nix's last attempt gives up.
    lookup_wait: float | None = None
    lookup_patience: float | None = None
    # An answer found in the swarm or upstreams (by Nix's request or a look-ahead) waits this many seconds for
    # its NAR request; later, a request looks the path up again.
    pending_ttl: float = 600.0
    # A narinfo Nix asked for and got from the swarm starts the fetch of its NAR at once (Nix asks for the NAR
    # later, after every narinfo of the closure): at most this many such fetches at once; 0 (the default) turns
    # it off. Off by default: measured better on a loaded machine (closure 0.69-0.86x) but worse in the least
    # loaded run (1.69x; the prefetches hold up the lookups of the narinfos Nix still asks for).
    prefetch_nars: int = 0
    # The narinfo lookup chain, in order (names from LOOKUP_SOURCES; "repo" must be one of them).
    lookup_order: list[str] = field(default_factory=lambda: list(LOOKUP_SOURCES))


def check_lookup_order(order: list[str], where: str) -> None:
    unknown = [n for n in order if n not in LOOKUP_SOURCES]
    if unknown or len(set(order)) != len(order) or "repo" not in order:
        raise InvalidInput(f"{where}: nix.lookup_order must list distinct names from {', '.join(LOOKUP_SOURCES)} "
                           f"including \"repo\", not {order!r}")


@dataclass
class NodeConfig:
    listen: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/4011"])
    bootstrap: list[str] = field(default_factory=list)
    swarm_key: str = ""
    allow_peers: list[str] = field(default_factory=list)
    mdns: str = "private"
    handshake_timeout: float = 10.0
    reannounce_interval: float = 3600.0
    lookup_timeout: float = 5.0
    negative_ttl: float = 30.0
    api_listen: str = DEFAULT_API
    superseed_window: float = SUPERSEED_WINDOW
    swarm_fetch: bool = SWARM_FETCH
    have_batch_delay: float = HAVE_BATCH_DELAY
    superseed_share: int = SUPERSEED_SHARE
    superseed_relay_window: float = SUPERSEED_RELAY_WINDOW
    api_allowed_hosts: list[str] = field(default_factory=list)
    api_allowed_origins: list[str] = field(default_factory=list)
    transfer_protocol: str = "dag"  # "dag" or "bitswap"
    transfer_stall_timeout: float = 20.0
    nix: NixConfig = field(default_factory=lambda: NixConfig())
    max_size: int | None = None  # [gc]: bytes of stored blocks the daemon keeps under
    gc_high_watermark: float = 0.9
    gc_low_watermark: float = 0.7
    gc_interval: float = 60.0
    log_level: str = "warning"
    log_format: str = "text"
    log_libraries: str = ""
    alone_warning: float = 30.0
    base_dir: Path | None = field(default=None, compare=False)  # the config file's directory: relative paths start here
    buildcache: "BuildCacheConfig" = field(default_factory=lambda: _buildcache_config())

    def lan_discovery(self) -> bool:
        """Whether mDNS runs: `mdns` "on", or "private" with a swarm key."""
        return self.mdns == "on" or self.mdns == "private" and bool(self.swarm_key)

    def swarm_key_path(self, repo: Path) -> Path | None:
        if not self.swarm_key:
            return None
        p = Path(self.swarm_key).expanduser()
        return p if p.is_absolute() else (self.base_dir or repo) / p


_SECTIONS = {
    "swarm": {"listen": "listen", "bootstrap": "bootstrap", "swarm_key": "swarm_key", "allow_peers": "allow_peers",
              "mdns": "mdns", "handshake_timeout": "handshake_timeout"},
    "routing": {"reannounce_interval": "reannounce_interval", "lookup_timeout": "lookup_timeout",
                "negative_ttl": "negative_ttl"},
    "http": {"listen": "api_listen", "allowed_hosts": "api_allowed_hosts", "allowed_origins": "api_allowed_origins"},
    "transfer": {"protocol": "transfer_protocol", "stall_timeout": "transfer_stall_timeout"},
    "log": {"level": "log_level", "format": "log_format", "libraries": "log_libraries",
            "alone_warning": "alone_warning"},
    "exchange": {"superseed_window": "superseed_window", "swarm_fetch": "swarm_fetch",
                 "have_batch_delay": "have_batch_delay", "superseed_share": "superseed_share",
                 "superseed_relay_window": "superseed_relay_window"},
}
_GC = {"max_size": "max_size", "high_watermark": "gc_high_watermark", "low_watermark": "gc_low_watermark",
       "interval": "gc_interval"}
_NIX_TYPES = {"store_dir": str, "priority": int, "want_mass_query": bool, "serve_local_store": bool,
              "local_store_root": str, "upstreams": list, "secret_key_file": str, "negative_ttl": float,
              "upload_ttl": float, "upload_quota": int, "max_upload_size": int, "lookup_order": list,
              "lookup_wait": float, "lookup_patience": float, "lookahead_lookups": int, "pending_ttl": float,
              "prefetch_nars": int}


def _buildcache_config():
    from .buildcache import BuildCacheConfig

    return BuildCacheConfig()


def write_default(repo: Path) -> None:
    path = repo / "config.toml"
    if not path.exists():
        tmp = repo / "config.toml.tmp"
        tmp.write_text(DEFAULT_TOML)
        tmp.replace(path)


def load(repo: Path, file: Path | str | None = None) -> NodeConfig:
    """`REPO/config.toml`, or `file` (`daemon --config FILE`, which must exist)."""
    cfg = NodeConfig()
    path = Path(file).expanduser().absolute() if file is not None else repo / "config.toml"
    if file is None and not path.exists():
        return cfg
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, OSError) as e:
        raise InvalidInput(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    cfg.base_dir = path.parent
    types = {f.name: f.type for f in fields(NodeConfig)}
    for section, values in data.items():
        if section == "gc" and isinstance(values, dict):
            _load_gc(cfg, path, values)
            continue
        if section == "buildcache" and isinstance(values, dict):
            from .buildcache import BuildCacheConfig

            cfg.buildcache = BuildCacheConfig.from_toml(values, str(path))
            continue
        if section == "nix" and isinstance(values, dict):
            for key, value in values.items():
                want = _NIX_TYPES.get(key)
                if want is None:
                    raise InvalidInput(f"{path}: unknown setting nix.{key}")
                ok = isinstance(value, want) if want is not float else isinstance(value, (int, float))
                if want is int and isinstance(value, bool) or want is list and not all(isinstance(v, str) for v in value):
                    ok = False
                if not ok:
                    raise InvalidInput(f"{path}: nix.{key} has the wrong type ({type(value).__name__})")
                setattr(cfg.nix, key, float(value) if want is float else value)
            check_lookup_order(cfg.nix.lookup_order, str(path))
            continue
        if section == "prefetch" and isinstance(values, dict):
            _check_prefetch(path, values)  # read by `p2pcache prefetch` / `lock2nix`, not by the daemon
            continue
        mapping = _SECTIONS.get(section)
        if mapping is None or not isinstance(values, dict):
            raise InvalidInput(f"{path}: unknown section [{section}]")
        for key, value in values.items():
            if key not in mapping:
                raise InvalidInput(f"{path}: unknown setting {section}.{key}")
            attr = mapping[key]
            field_type = types[attr]
            ok = (isinstance(value, list) and all(isinstance(v, str) for v in value)) if "list" in str(field_type) else (
                isinstance(value, (int, float)) and not isinstance(value, bool) if "float" in str(field_type)
                else isinstance(value, bool) if "bool" in str(field_type)
                else isinstance(value, int) and not isinstance(value, bool) if str(field_type) == "int"
                else isinstance(value, str))
            if ok and attr == "mdns" and value not in ("private", "on", "off"):
                raise InvalidInput(f"{path}: {section}.{key} is \"private\", \"on\" or \"off\", not {value!r}")
            if ok and attr in ("superseed_window", "have_batch_delay", "superseed_relay_window") and value < 0:
                raise InvalidInput(f"{path}: {section}.{key} must be 0 (off) or a number of seconds, not {value}")
            if ok and attr == "handshake_timeout" and value <= 0:
                raise InvalidInput(f"{path}: {section}.{key} must be a positive number of seconds, not {value}")
            if ok and attr == "superseed_share" and value < 0:
                raise InvalidInput(f"{path}: {section}.{key} must be 0 (no bound) or a number of blocks, not {value}")
            if not ok:
                raise InvalidInput(f"{path}: {section}.{key} has the wrong type ({type(value).__name__})")
            setattr(cfg, attr, float(value) if "float" in str(field_type) else value)
    if cfg.transfer_protocol not in ("dag", "bitswap"):
        raise InvalidInput(f"{path}: transfer.protocol must be \"dag\" or \"bitswap\", not {cfg.transfer_protocol!r}")
    return cfg


def _load_gc(cfg: NodeConfig, path: Path, values: dict) -> None:
    for key, value in values.items():
        if key not in _GC:
            raise InvalidInput(f"{path}: unknown setting gc.{key}")
        if key == "max_size":
            if isinstance(value, str) and not value.strip():
                cfg.max_size = None
                continue
            try:
                cfg.max_size = value if isinstance(value, int) and not isinstance(value, bool) else parse_size(value)
            except (ValueError, TypeError):
                raise InvalidInput(f"{path}: gc.max_size {value!r} is not a size (try \"20G\" or 1073741824)") from None
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidInput(f"{path}: gc.{key} has the wrong type ({type(value).__name__})")
        setattr(cfg, _GC[key], float(value))
    check_gc(cfg, str(path))


def check_gc(cfg: NodeConfig, where: str) -> None:
    if not 0 < cfg.gc_low_watermark < cfg.gc_high_watermark <= 1:
        raise InvalidInput(f"{where}: gc watermarks need 0 < low_watermark < high_watermark <= 1, "
                           f"not {cfg.gc_low_watermark} and {cfg.gc_high_watermark}")
    if cfg.gc_interval <= 0:
        raise InvalidInput(f"{where}: gc.interval must be positive seconds")


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'500M', '2GiB', '1.5G', '1024' -> bytes (K/M/G/T are powers of 1024, as in du and Nix)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (try 500M, 2G, 1048576)")
    number, unit = float(m.group(1)), m.group(2).lower()
    return int(number * 1024 ** " kmgtp".index(unit or " "))


PREFETCH_REGISTRY_KINDS = ("npm", "cargo", "pypi", "go", "gem")


def _check_prefetch(path: Path, values: dict) -> None:
    """`[prefetch.registries]`: registry base URLs for lock files without full URLs (KIND = "URL")."""
    for key, value in values.items():
        if key != "registries" or not isinstance(value, dict):
            raise InvalidInput(f"{path}: unknown setting prefetch.{key} (only [prefetch.registries])")
        for kind, url in value.items():
            if kind not in PREFETCH_REGISTRY_KINDS or not isinstance(url, str):
                raise InvalidInput(f"{path}: prefetch.registries.{kind} must be a URL string, KIND one of "
                                   f"{', '.join(PREFETCH_REGISTRY_KINDS)}")
