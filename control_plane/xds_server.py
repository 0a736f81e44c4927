"""The ADS gRPC service: state-of-the-world and Delta streams over grpcio (asyncio).

The server never builds resources: each stream's state machine (`streams.py`) picks
bytes from the cache's current snapshot.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DiscoveryRequest,
)

from control_plane.nodes import NodeRegistry
from control_plane.snapshot import SnapshotCache
from control_plane.streams import DeltaStream, SotwStream, Stream

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
WAKE = "wake"  # an event that only makes a stream look at its state again


class AdsServer:
    """grpcio handlers for AggregatedDiscoveryService, serving a SnapshotCache."""

    def __init__(self, cache: SnapshotCache, registry: NodeRegistry):
        self.cache = cache
        self.registry = registry

    def handler(self) -> grpc.GenericRpcHandler:
        def method(stream_class: type[Stream], request_class) -> grpc.RpcMethodHandler:
            async def serve(requests, context):
                async for response in self._serve(stream_class(self.cache), requests):
                    yield response

            return grpc.stream_stream_rpc_method_handler(
                serve, request_deserializer=request_class.FromString, response_serializer=bytes
            )

        return grpc.method_handlers_generic_handler(
            ADS_SERVICE,
            {
                "StreamAggregatedResources": method(SotwStream, DiscoveryRequest),
                "DeltaAggregatedResources": method(DeltaStream, DeltaDiscoveryRequest),
            },
        )

    async def _serve(self, stream: Stream, requests: AsyncIterator) -> AsyncIterator[bytes]:
        """Feed requests and new snapshots into one stream; yield its responses."""
        events: asyncio.Queue[object] = asyncio.Queue()

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
        loop = asyncio.get_running_loop()
        wake: asyncio.TimerHandle | None = None
        try:
            while (event := await events.get()) is not None:
                if isinstance(event, DiscoveryRequest | DeltaDiscoveryRequest):
                    if stream.node is None and event.HasField("node"):
                        stream.node = self.registry.connected(event.node.id, event.node.cluster)
                    stream.handle_request(event)
                for response in stream.responses():
                    yield response
                if wake:
                    wake.cancel()
                if stream.wake_after:  # routes held back while new clusters warm up
                    wake = loop.call_later(stream.wake_after, events.put_nowait, WAKE)
        finally:
            if wake:
                wake.cancel()
            for task in tasks:
                task.cancel()
            if stream.node:
                self.registry.disconnected(stream.node)
