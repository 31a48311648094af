"""LAN discovery: find the team's other nodes on the local network by mDNS (libp2p's mDNS discovery).

Owns: advertising this node on the LAN (a DNS-SD service whose TXT record carries its dialable
addresses as `dnsaddr=<multiaddr>/p2p/<id>`, as the libp2p mDNS spec has it) and browsing for the same
service type, handing every peer found to the host as a `PeerInfo`. It does not dial: the host does,
through its usual gates, so the swarm key (a peer without it fails the private-network handshake) and
the allowlist still decide every connection. Finding a peer is a hint, never trust. A node that listens
on loopback only sends no mDNS at all; otherwise mDNS runs only on the interfaces it advertises.

Service type: `_p2p._udp.local.` for a public swarm; a private swarm advertises under
`_p2p-<fingerprint>._udp.local.` with a fingerprint derived from its swarm key (10 hex digits of a
sha256 over a fixed label and the key: the key itself is not recoverable from it), so nodes of one
team find each other and not every libp2p node on the LAN.

python-zeroconf does the multicast DNS (it runs its own thread and event loop); its callbacks are
forwarded to the trio side through a memory channel with `trio.from_thread`. Advertised addresses: a
listen address on 0.0.0.0 / :: is expanded to this machine's non-loopback interface addresses
(`ifaddr`, which zeroconf itself uses); a specific address is advertised as it is.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import secrets
import socket
from contextlib import asynccontextmanager
from typing import AsyncIterator, Iterable

import ifaddr
import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from zeroconf import ServiceBrowser, ServiceInfo, ServiceListener, Zeroconf

log = logging.getLogger(__name__)

__all__ = ["advertised_addrs", "lan_discovery", "service_type"]

PUBLIC_SERVICE = "_p2p._udp.local."


def service_type(swarm_key: bytes | None) -> str:
    """The DNS-SD service type nodes of this swarm advertise and browse."""
    if swarm_key is None:
        return PUBLIC_SERVICE
    fp = hashlib.sha256(b"p2pcache mdns service\n" + swarm_key).hexdigest()[:10]
    return f"_p2p-{fp}._udp.local."


def _interface_ips(family: int) -> list[str]:
    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            addr = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            try:
                parsed = ipaddress.ip_address(addr.split("%")[0])
            except ValueError:
                continue
            if parsed.is_loopback or parsed.is_link_local or (parsed.version == 4) != (family == socket.AF_INET):
                continue
            out.append(str(parsed))
    return out


def advertised_addrs(listen: Iterable[multiaddr.Multiaddr], peer_id: ID) -> list[str]:
    """Dialable forms of our listen addresses, each ending in /p2p/<id>: wildcard addresses expanded
    to the interface addresses, loopback ones left out (no other machine can dial them)."""
    suffix = f"/p2p/{peer_id.to_base58()}"
    out: list[str] = []
    for addr in listen:
        parts = str(addr).split("/p2p/")[0].split("/")  # ['', 'ip4', '0.0.0.0', 'tcp', '4011']
        if len(parts) < 5 or parts[1] not in ("ip4", "ip6"):
            continue
        family = socket.AF_INET if parts[1] == "ip4" else socket.AF_INET6
        ip = ipaddress.ip_address(parts[2])
        ips = _interface_ips(family) if ip.is_unspecified else [] if ip.is_loopback else [str(ip)]
        for a in ips:
            text = "/".join(["", parts[1], a, *parts[3:]]) + suffix
            if text not in out:
                out.append(text)
    return out


def _txt(addrs: list[str]) -> dict[bytes, bytes]:
    # One TXT key per address (python-zeroconf keeps one value per key); readers take every key
    # that starts with "dnsaddr".
    return {(b"dnsaddr" if i == 0 else b"dnsaddr%d" % (i + 1)): a.encode() for i, a in enumerate(addrs)}


def _peer_from(info: ServiceInfo) -> PeerInfo | None:
    peer: ID | None = None
    addrs: list[multiaddr.Multiaddr] = []
    for key, value in (info.properties or {}).items():
        if not key.startswith(b"dnsaddr") or not value:
            continue
        try:
            text = value.decode()
            base, pid = text.rsplit("/p2p/", 1)
            this = ID.from_base58(pid)
            addrs.append(multiaddr.Multiaddr(base))
        except Exception:
            continue  # a malformed record from some device on the LAN: ignore it
        if peer is not None and this != peer:
            return None  # addresses of two peers in one record: not a record we trust to parse
        peer = this
    return PeerInfo(peer, addrs) if peer is not None and addrs else None


class _Listener(ServiceListener):
    """zeroconf's browser callbacks (its thread) → PeerInfos on a trio channel."""

    def __init__(self, own_name: str, send: trio.MemorySendChannel, token: trio.lowlevel.TrioToken) -> None:
        self.own_name, self.send, self.token = own_name, send, token

    def _found(self, zc: Zeroconf, type_: str, name: str) -> None:
        if name == self.own_name:
            return
        info = zc.get_service_info(type_, name, timeout=3000)
        peer = _peer_from(info) if info is not None else None
        if peer is None:
            return
        try:
            trio.from_thread.run_sync(self.send.send_nowait, peer, trio_token=self.token)
        except (trio.RunFinishedError, trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    add_service = update_service = _found

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        pass  # a node that leaves is noticed by its connection closing


@asynccontextmanager
async def lan_discovery(peer_id: ID, listen: Iterable[multiaddr.Multiaddr],
                        swarm_key: bytes | None) -> AsyncIterator[trio.MemoryReceiveChannel]:
    """Advertise this node and browse for others for the duration of the block; yields a channel of
    the `PeerInfo`s found (each may come again when its record is refreshed or changes)."""
    addrs = advertised_addrs(listen, peer_id)
    stype = service_type(swarm_key)
    name = f"{secrets.token_hex(8)}.{stype}"
    ips = [a.split("/")[2] for a in addrs]
    port = int(addrs[0].split("/")[4]) if addrs else 0
    info = ServiceInfo(stype, name, port=port, properties=_txt(addrs),
                       server=f"{name.split('.')[0]}.local.",
                       addresses=[socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip) for ip in ips])
    send, recv = trio.open_memory_channel(math.inf)
    if not addrs:
        # Listening on loopback only: nobody on the LAN could dial us, and we send nothing there.
        log.info("LAN discovery: no non-loopback listen address, so no mDNS")
        send.close()
        yield recv
        return
    # Only on the interfaces we advertise: mDNS queries go nowhere this node does not listen.
    zc = await trio.to_thread.run_sync(lambda: Zeroconf(interfaces=sorted(set(ips))))
    browser = None
    try:
        await trio.to_thread.run_sync(zc.register_service, info)
        log.info("advertising on the LAN (mDNS %s): %s", stype, ", ".join(addrs))
        browser = ServiceBrowser(zc, stype, listener=_Listener(name, send, trio.lowlevel.current_trio_token()))
        yield recv
    finally:
        send.close()
        with trio.CancelScope(shield=True):
            def stop() -> None:
                if browser is not None:
                    browser.cancel()
                zc.unregister_service(info)
                zc.close()
            await trio.to_thread.run_sync(stop)

