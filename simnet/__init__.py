"""simnet: simulated networks of p2pcache nodes in one process, in virtual time (imports p2pcache, never
the reverse).

    python -m simnet run simnet/scenarios/fleet-fanout.toml --seed 1 --set runners=100 [--plot out.png]

Layers, bottom up:
- `core`: one event queue in trio's virtual time (`MockClock(autojump_threshold=0)`), seeded generators.
- `links`: named link profiles; per-node uplink/downlink queues, latency + jitter, loss as retransmits,
  connections, unlink/relink, partitions.
- `exchange`: the real `BitswapClient` / `BitswapServer` engines pumped over links (wire `bytes`: real
  encode/decode; wire `objects`: Message objects charged their exact encoded size), and `ArchiveFetch`.
- `payload`: real-byte artifacts (FastCDC, real manifests) or synthetic descriptor blocks for big runs.
- `dhtsim`: simulated Kademlia servers, lookups driven by the real `ProviderQuery`.
- `hostsim`: simulated libp2p hosts and streams with `NodeHost`'s interface (bytes over links), the
  `LiveSim` queue that shares trio with real tasks; `routingsim`: a simulated Kademlia with `DHT`'s
  interface whose RPCs are kademlia.proto messages on those streams.
- `scenario` (TOML files in `scenarios/`), `metrics` (JSON lines), `fanout` / `dhtsim` / `nodefetch`
  programs, `cli`, `plot` (matplotlib, optional).
What does not run: libp2p (Noise, Yamux, multistream, the host) and py-libp2p's KadDHT, anywhere. The
`fleet`, `bad-peer`, `partition-heal` and `dht-lookup` programs also leave out `BitswapExchange`'s trio
tasks, the repo on disk, the resolve protocol and `Node`; `node-fetch` runs all of those for real, over
`hostsim`/`routingsim` (see `nodefetch`'s docstring).
"""
