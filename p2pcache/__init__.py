"""p2pcache: a peer-to-peer cache node for CI runners and Nix."""

__version__ = "0.1.0"
