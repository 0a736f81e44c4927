"""The ADS server: the state-of-the-world protocol state machine, one per gRPC stream.

The server never builds resources; it sends the bytes of the cache's snapshot.
Rules kept here (Envoy's xds_protocol docs):
- ACK: a request whose `response_nonce` is the last nonce sent for its type and has no
  `error_detail`. NACK: the same with `error_detail`: recorded, and the rejected version
  is not resent; the next snapshot is.
- A request with a stale nonce is ignored.
- Make-before-break: a type is pushed only when every type before it in CDS, EDS, LDS,
  RDS order has no unanswered response; RDS waits until Envoy has ACKed endpoints for
  every cluster its routes name; clusters the ACKed routes still name are kept in CDS
  until Envoy ACKs routes that no longer name them.
- After every CDS push, EDS is resent, so that re-warming clusters get their endpoints.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from envoy_data_plane.envoy.service.discovery.v3 import DiscoveryRequest

from control_plane.nodes import NodeRegistry, NodeStatus
from control_plane.snapshot import (
    CLUSTER,
    ENDPOINT,
    PUSH_ORDER,
    ROUTE,
    SHORT_NAMES,
    WILDCARD_TYPES,
    Snapshot,
    SnapshotCache,
    content_version,
    encode_field,
)

log = logging.getLogger("infergate.xds")

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"


def encode_response(version: str, resources: list[bytes], type_url: str, nonce: str) -> bytes:
    """The wire bytes of a DiscoveryResponse from pre-encoded Any resources."""
    parts = [encode_field(1, version.encode())]
    parts += [encode_field(2, blob) for blob in resources]
    parts += [encode_field(4, type_url.encode()), encode_field(5, nonce.encode())]
    return b"".join(parts)


@dataclass
class Sent:
    version: str
    names: frozenset[str]
    snapshot: Snapshot


@dataclass
class TypeState:
    """One resource type on one stream."""

    names: frozenset[str] | None = None  # None: wildcard (all resources of the type)
    sent: Sent | None = None
    acked: Sent | None = None
    last_nonce: str | None = None
    pending: bool = False  # the last response has no ACK or NACK yet
    force: bool = False


@dataclass
class Desired:
    version: str
    resources: dict[str, bytes]
    snapshot: Snapshot


@dataclass
class SotwStream:
    cache: SnapshotCache
    node: NodeStatus | None = None
    types: dict[str, TypeState] = field(default_factory=dict)
    routes_acked: Snapshot | None = None  # snapshot of the last RDS that Envoy ACKed
    nonce: int = 0

    def handle_request(self, req: DiscoveryRequest) -> None:
        """Update state from one request: ACK, NACK, subscription change, or stale."""
        state = self.types.setdefault(req.type_url, TypeState())
        if req.response_nonce and req.response_nonce != state.last_nonce:
            return  # stale: answers a response that a newer one replaced
        if req.response_nonce and state.pending and state.sent is not None:
            state.pending = False
            error = req.error_detail
            if error is not None and (error.code or error.message):
                self._record_nack(req.type_url, state.sent.version, error.message)
            else:
                state.acked = state.sent
                self._record_ack(req.type_url, state.sent.version)
                if req.type_url == ROUTE:
                    self.routes_acked = state.sent.snapshot
        if req.type_url not in WILDCARD_TYPES:
            state.names = frozenset(req.resource_names)

    def _record_nack(self, type_url: str, version: str, message: str) -> None:
        node_id = self.node.node_id if self.node else "?"
        log.warning("NACK from %s for %s %s: %s", node_id, SHORT_NAMES[type_url], version, message)
        if self.node:
            self.node.type(type_url).nack = {"version": version, "message": message}

    def _record_ack(self, type_url: str, version: str) -> None:
        if self.node:
            status = self.node.type(type_url)
            status.acked_version = version
            if status.nack and status.nack["version"] != version:
                status.nack = None

    def _extras(self, type_url: str, current: Snapshot) -> dict[str, bytes]:
        """Resources the routes Envoy runs still name but the new snapshot lacks."""
        if self.routes_acked is None or self.routes_acked is current:
            return {}
        old = self.routes_acked.types[type_url].resources
        new = current.types[type_url].resources
        return {n: b for n, b in old.items() if n not in new}

    def desired(self, type_url: str, snapshot: Snapshot) -> Desired | None:
        """What this stream should have for one type now, or None to hold back."""
        state = self.types[type_url]
        typed = snapshot.types[type_url]
        available = dict(typed.resources)
        extras = self._extras(type_url, snapshot) if type_url in (CLUSTER, ENDPOINT) else {}
        available.update(extras)
        if state.names is None:
            chosen = available
        else:
            chosen = {n: available[n] for n in sorted(state.names) if n in available}
        version = content_version(snapshot.epoch, available) if extras else typed.version
        if type_url == ROUTE and not self._routes_ready(snapshot):
            return None
        return Desired(version, chosen, snapshot)

    def _routes_ready(self, snapshot: Snapshot) -> bool:
        """Envoy has ACKed clusters and endpoints for every cluster the routes name."""
        needed = set(snapshot.types[CLUSTER].resources)
        clusters = self.types.get(CLUSTER)
        endpoints = self.types.get(ENDPOINT)
        if not needed:
            return True
        if clusters is None or clusters.acked is None or clusters.pending:
            return False
        if endpoints is None or endpoints.acked is None or endpoints.pending:
            return False
        return needed <= clusters.acked.names and needed <= endpoints.acked.names

    def responses(self) -> list[bytes]:
        """Responses due now, in make-before-break order."""
        snapshot = self.cache.snapshot
        if snapshot is None:
            return []
        out: list[bytes] = []
        for type_url in PUSH_ORDER:
            state = self.types.get(type_url)
            if state is None:
                continue
            if state.pending:
                break
            want = self.desired(type_url, snapshot)
            if want is None:
                break
            names = frozenset(want.resources)
            sent = state.sent
            if sent and sent.version == want.version and sent.names == names and not state.force:
                continue
            self.nonce += 1
            state.last_nonce = str(self.nonce)
            state.pending = True
            state.sent = Sent(want.version, names, snapshot)
            state.force = False
            if self.node:
                status = self.node.type(type_url)
                status.sent_version = want.version
                status.sent_count += 1
            out.append(
                encode_response(
                    want.version, list(want.resources.values()), type_url, state.last_nonce
                )
            )
            if type_url == CLUSTER and ENDPOINT in self.types:
                self.types[ENDPOINT].force = True
            break
        return out


class AdsServer:
    """grpcio handler for AggregatedDiscoveryService, serving a SnapshotCache."""

    def __init__(self, cache: SnapshotCache, registry: NodeRegistry):
        self.cache = cache
        self.registry = registry

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            ADS_SERVICE,
            {
                "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self.stream_sotw,
                    request_deserializer=DiscoveryRequest.FromString,
                    response_serializer=bytes,
                )
            },
        )

    async def stream_sotw(
        self, requests: AsyncIterator[DiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        stream = SotwStream(self.cache)
        events: asyncio.Queue[DiscoveryRequest | Snapshot | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for req in requests:
                    await events.put(req)
            finally:
                await events.put(None)

        async def watch() -> None:
            seen = self.cache.snapshot
            while True:
                seen = await self.cache.wait_newer(seen)
                await events.put(seen)

        tasks = [asyncio.create_task(read()), asyncio.create_task(watch())]
        try:
            while (event := await events.get()) is not None:
                if isinstance(event, DiscoveryRequest):
                    if stream.node is None and event.node is not None:
                        stream.node = self.registry.connected(event.node.id, event.node.cluster)
                    stream.handle_request(event)
                for response in stream.responses():
                    yield response
        finally:
            for task in tasks:
                task.cancel()
            if stream.node:
                self.registry.disconnected(stream.node)
