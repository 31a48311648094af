"""The node's HTTP API (ASGI, served by hypercorn on trio): the local REST API the CLI uses, and the
Nix-facing binary cache endpoints."""
