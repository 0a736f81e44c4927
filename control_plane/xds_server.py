"""The ADS gRPC service: state-of-the-world and Delta streams over grpcio (asyncio).

The server only moves events: requests and new snapshots go into one stream's state
machine (`streams.py`), which answers with bytes picked from the snapshot; what happens
on the stream is reported through `Callbacks` (the node registry, the log).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DiscoveryRequest,
)

from control_plane.callbacks import Callbacks, NodeInfo
from control_plane.snapshot import SnapshotCache
from control_plane.streams import Clock, DeltaStream, DesiredCache, SotwStream, Stream

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
WAKE = "wake"  # an event that only makes a stream look at its state again

log = logging.getLogger("infergate.xds")


class AdsServer:
    """grpcio handlers for AggregatedDiscoveryService, serving a SnapshotCache."""

    def __init__(self, cache: SnapshotCache, callbacks: Callbacks, clock: Clock = time.monotonic):
        self.cache = cache
        self.callbacks = callbacks
        self.clock = clock
        self.desired = DesiredCache()  # shared by all streams

    def handler(self) -> grpc.GenericRpcHandler:
        def method(stream_class: type[Stream], request_class) -> grpc.RpcMethodHandler:
            async def serve(requests, context):
                async for response in self._serve(stream_class, requests, context):
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

    async def _open(self, stream_class: type[Stream], first, context) -> Stream:
        """The stream of the node named in the first request; a bad node ends the call."""
        try:
            node = NodeInfo.from_proto(first.node)
        except ValueError as exc:
            log.warning("refused an xDS stream: %s", exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        stream = stream_class(node, self.callbacks, self.clock, self.desired)
        stream.open()
        return stream

    async def _serve(
        self, stream_class: type[Stream], requests: AsyncIterator, context
    ) -> AsyncIterator[bytes]:
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
        stream: Stream | None = None
        try:
            while (event := await events.get()) is not None:
                if isinstance(event, DiscoveryRequest | DeltaDiscoveryRequest):
                    if stream is None:
                        stream = await self._open(stream_class, event, context)
                    stream.handle_request(event)
                if stream is None:
                    continue
                stream.target = self.cache.for_node(stream.node.listen)
                out = stream.responses()
                for response in out.responses:
                    yield response
                if wake:
                    wake.cancel()
                if out.wake_after:  # routes held back while new clusters warm up
                    wake = loop.call_later(out.wake_after, events.put_nowait, WAKE)
        finally:
            if wake:
                wake.cancel()
            for task in tasks:
                task.cancel()
            if stream:
                stream.close()
