// Node 20 lacks Promise.withResolvers (Node 22+), which it-queue (used by @helia/bitswap) calls.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function withResolvers () {
    let resolve, reject
    const promise = new Promise((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}
