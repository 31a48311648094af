"""simnet: simulated networks of p2pcache nodes in virtual time (imports p2pcache, never the reverse)."""
