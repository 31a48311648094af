// A js-libp2p + @helia/bitswap peer driven by JSON lines on stdin, answering JSON lines on stdout.
// Used by p2pcache's interop tests and benchmark as the foreign implementation (TCP, Noise, Yamux;
// optionally a private network with a kubo swarm.key given as --swarm-key FILE).
//
// Commands (one JSON object a line, each answered by one line with the same "id"):
//   {"cmd":"put","blocks":[{"cid":"…","data":"<base64>"}]}   store blocks and announce them
//   {"cmd":"gen","count":N,"size":S,"seed":K}                 make N random raw blocks of S bytes
//   {"cmd":"dial","addr":"/ip4/…/p2p/…"}
//   {"cmd":"want","cids":["…"],"timeout":ms,"return":true}   fetch; answers data (base64) and the
//                                                             sha-256 re-check done here
//   {"cmd":"stop"}
import { createLibp2p } from 'libp2p'
import { tcp } from '@libp2p/tcp'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import { preSharedKey } from '@libp2p/pnet'
import { createBitswap } from '@helia/bitswap'
import { MemoryBlockstore } from 'blockstore-core'
import { defaultLogger } from '@libp2p/logger'
import { multiaddr } from '@multiformats/multiaddr'
import { CID } from 'multiformats/cid'
import * as raw from 'multiformats/codecs/raw'
import { sha256 } from 'multiformats/hashes/sha2'
import { createHash } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { createInterface } from 'node:readline'

const args = process.argv.slice(2)
const opt = (name) => { const i = args.indexOf(name); return i >= 0 ? args[i + 1] : undefined }
const swarmKeyFile = opt('--swarm-key')

const libp2p = await createLibp2p({
  addresses: { listen: [opt('--listen') ?? '/ip4/127.0.0.1/tcp/0'] },
  transports: [tcp()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  connectionProtector: swarmKeyFile ? preSharedKey({ psk: readFileSync(swarmKeyFile) }) : undefined,
  services: { identify: identify() }
})

const blockstore = new MemoryBlockstore()
const noRouting = {
  async provide () {},
  async * findProviders () {},
  async put () {},
  async get () { throw new Error('no routing') },
  async findPeer () { throw new Error('no routing') },
  async * getClosestPeers () {},
  async cancelReprovide () {}
}
const bitswap = createBitswap({ libp2p, blockstore, routing: noRouting, logger: defaultLogger() })
await bitswap.start()

const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')

// deterministic bytes for `gen`: xorshift32 from the seed (fast, no need for crypto quality)
function randomBytes (n, seed) {
  const buf = Buffer.allocUnsafe(n)
  let x = (seed * 2654435761) >>> 0 || 1
  for (let i = 0; i + 4 <= n; i += 4) {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0
    buf.writeUInt32LE(x, i)
  }
  for (let i = n - (n % 4); i < n; i++) buf[i] = i & 0xff
  return buf
}

async function putBlock (cid, data) {
  await blockstore.put(cid, data)
  await bitswap.notify(cid, data)
}

const handlers = {
  async put (req) {
    for (const b of req.blocks) await putBlock(CID.parse(b.cid), Buffer.from(b.data, 'base64'))
    return { stored: req.blocks.length }
  },
  async gen (req) {
    const cids = []
    for (let i = 0; i < req.count; i++) {
      const data = randomBytes(req.size, req.seed * 1000003 + i)
      const cid = CID.createV1(raw.code, await sha256.digest(data))
      await putBlock(cid, data)
      cids.push(cid.toString())
    }
    return { cids }
  },
  async dial (req) {
    await libp2p.dial(multiaddr(req.addr))
    return { connected: true }
  },
  async want (req) {
    const signal = AbortSignal.timeout(req.timeout ?? 30000)
    const started = performance.now()
    const results = await Promise.all(req.cids.map(async (text) => {
      const cid = CID.parse(text)
      const data = await bitswap.want(cid, { signal })
      // bitswap verified the hash already; check again here, independently of it
      const digest = createHash('sha256').update(data).digest()
      const ok = Buffer.compare(digest, Buffer.from(cid.multihash.digest)) === 0
      return { cid: text, ok, size: data.length, data: req.return === false ? undefined : Buffer.from(data).toString('base64') }
    }))
    return { blocks: results, seconds: (performance.now() - started) / 1000 }
  },
  async stop () {
    setTimeout(async () => { await bitswap.stop(); await libp2p.stop(); process.exit(0) }, 10)
    return {}
  }
}

const rl = createInterface({ input: process.stdin })
rl.on('line', async (line) => {
  let req
  try { req = JSON.parse(line) } catch { return out({ error: 'bad json' }) }
  try {
    const handler = handlers[req.cmd]
    if (!handler) throw new Error(`unknown command ${req.cmd}`)
    out({ id: req.id, ...(await handler(req)) })
  } catch (err) {
    out({ id: req.id, error: String(err?.message ?? err) })
  }
})
rl.on('close', async () => { await libp2p.stop(); process.exit(0) })

out({ event: 'ready', peerId: libp2p.peerId.toString(), addrs: libp2p.getMultiaddrs().map(String) })
