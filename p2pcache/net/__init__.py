"""The network layer: a py-libp2p host (identity, TCP + Noise + Yamux, private network, allowlist,
bootstrap) and the trio drivers that pump the sans-IO engines over it (bitswap).

    async with open_host(HostConfig(identity=path, listen=("/ip4/0.0.0.0/tcp/4001",))) as host:
        exchange = BitswapExchange(host, RepoBlockSource(repo))
        await nursery.start(exchange.run)
        await exchange.fetch_archive(root, providers, repo)
"""

from .bitswap import BitswapExchange, DriverConfig, FetchError, RepoBlockSource
from .host import HostConfig, HostError, NodeHost, PeerEvent, load_identity, new_swarm_key_file, open_host, parse_peer_addr
from .pnet import format_swarm_key, new_swarm_key, parse_swarm_key, read_swarm_key, write_swarm_key

__all__ = [
    "BitswapExchange", "DriverConfig", "FetchError", "HostConfig", "HostError", "NodeHost", "PeerEvent",
    "RepoBlockSource", "format_swarm_key", "load_identity", "new_swarm_key", "new_swarm_key_file", "open_host",
    "parse_peer_addr", "parse_swarm_key", "read_swarm_key", "write_swarm_key",
]
