"""The cache-records protocol, `/p2pcache/cache-records/1.0.0`: ask a peer for the signed build-cache key
records it holds for an exact key or a key prefix.

Owns the messages (protobuf `CacheRecordsRequest` / `CacheRecordsResponse` in proto/p2pcache.proto,
length-prefixed like the resolve protocol, with the same `FrameReader` limits machinery) and their trio
driver: `CacheRecordsServer` answers from a lookup the node supplies, `ask_records(host, peer, key, prefix)`
asks one peer. Records come back as bytes and are decoded and signature-checked here
(`CacheRecord.decode`); a record that fails is dropped and counted, never returned. Whether a correctly
signed record is *trusted* (its writer may write that key) is the build cache service's decision.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import trio
from google.protobuf.message import DecodeError

from libp2p.custom_types import TProtocol

from ..content.cacherecord import MAX_RECORD, CacheRecord, check_cache_key
from ..errors import InvalidInput, MalformedBlock
from .errors import ResolveProtocolError, RoutingUsageError
from .pb import p2pcache_pb2 as pb
from .resolve import ask_once, close_stream, read_frame, reset_stream
from .resolve_wire import FrameReader, frame

if TYPE_CHECKING:
    from ..net.peers import Host

__all__ = ["CACHE_RECORDS_PROTOCOL", "CacheRecordsServer", "MAX_RECORDS", "ask_records", "decode_records",
           "encode_records"]

log = logging.getLogger(__name__)

CACHE_RECORDS_PROTOCOL = "/p2pcache/cache-records/1.0.0"
MAX_REQUEST = 1024
MAX_RECORDS = 64
MAX_RESPONSE = MAX_RECORDS * (MAX_RECORD + 8) + 16

RecordsLookup = Callable[[str, bool, int], "list[CacheRecord] | Awaitable[list[CacheRecord]]"]


def encode_request(key: str, prefix: bool, limit: int = MAX_RECORDS) -> bytes:
    try:
        check_cache_key(key, "cache-records key")
    except InvalidInput as e:
        raise RoutingUsageError(str(e)) from None
    return frame(pb.CacheRecordsRequest(key=key, prefix=prefix, limit=limit).SerializeToString())


def decode_request(payload: bytes) -> tuple[str, bool, int]:
    msg = pb.CacheRecordsRequest()
    try:
        msg.ParseFromString(payload)
    except DecodeError:
        raise ResolveProtocolError("cache-records request is not a valid protobuf") from None
    try:
        check_cache_key(msg.key, "cache-records key")
    except InvalidInput as e:
        raise ResolveProtocolError(str(e)) from None
    limit = msg.limit if 0 < msg.limit <= MAX_RECORDS else MAX_RECORDS
    return msg.key, msg.prefix, limit


def encode_records(records: list[CacheRecord]) -> bytes:
    return frame(pb.CacheRecordsResponse(records=[r.encode() for r in records[:MAX_RECORDS]]).SerializeToString())


@dataclass
class DecodedRecords:
    records: list[CacheRecord]
    rejected: int  # malformed or badly signed


def decode_records(payload: bytes, key: str, prefix: bool) -> DecodedRecords:
    """A peer's answer: the well-formed, correctly signed records that match what was asked."""
    msg = pb.CacheRecordsResponse()
    try:
        msg.ParseFromString(payload)
    except DecodeError:
        raise ResolveProtocolError("cache-records answer is not a valid protobuf") from None
    if len(msg.records) > MAX_RECORDS:
        raise ResolveProtocolError(f"cache-records answer holds {len(msg.records)} records, over {MAX_RECORDS}")
    out, rejected = [], 0
    for data in msg.records:
        try:
            record = CacheRecord.decode(data)
        except MalformedBlock as e:
            log.info("cache records: ignoring a record: %s", e)
            rejected += 1
            continue
        if record.key.startswith(key) if prefix else record.key == key:
            out.append(record)
        else:
            rejected += 1
    return DecodedRecords(out, rejected)


@dataclass
class CacheRecordsServerStats:
    requests: int = 0
    records_sent: int = 0
    violations: int = 0


class CacheRecordsServer:
    """Answers with `lookup(key, prefix, limit)`: the records this node holds (signed by their writers)."""

    def __init__(self, lookup: RecordsLookup, request_timeout: float = 10.0):
        self.lookup = lookup
        self.request_timeout = request_timeout
        self.stats = CacheRecordsServerStats()

    def register(self, host: Host) -> None:
        host.set_stream_handler(TProtocol(CACHE_RECORDS_PROTOCOL), self.handle_stream)

    async def handle_stream(self, stream: Any) -> None:
        try:
            with trio.fail_after(self.request_timeout):
                key, prefix, limit = decode_request(
                    await read_frame(stream, FrameReader(MAX_REQUEST, "cache-records request")))
        except Exception as e:  # a violation, a timeout or a broken stream: reset, nothing to answer
            self.stats.violations += 1
            log.debug("cache records: resetting a stream: %s", e)
            await reset_stream(stream)
            return
        self.stats.requests += 1
        try:
            records = self.lookup(key, prefix, limit)
            if inspect.isawaitable(records):
                records = await records
            data = encode_records(list(records)[:limit])
            await stream.write(data)
        except Exception as e:
            log.warning("cache records: answering %r failed: %s", key[:60], e)
            await reset_stream(stream)
            return
        self.stats.records_sent += len(records)
        await close_stream(stream)


async def ask_records(host: Host, peer_id: Any, key: str, prefix: bool, timeout: float = 5.0,
                      limit: int = MAX_RECORDS) -> DecodedRecords:
    """Ask one peer for its records of `key` (or keys starting with it). Raises ResolveUnavailable or
    ResolveProtocolError like `resolve`; the records returned are signature-checked, not trust-checked."""
    request = encode_request(key, prefix, limit)
    return await ask_once(host, peer_id, TProtocol(CACHE_RECORDS_PROTOCOL), request, MAX_RESPONSE,
                          "cache-records answer", lambda payload: decode_records(payload, key, prefix), timeout,
                          f"the records of cache key {key[:60]!r}")
