"""The ADS gRPC service: state-of-the-world and Delta streams over grpcio (asyncio).

The server only moves events: requests and new snapshots go into one stream's state
machine (`streams.py`), which answers with bytes picked from the snapshot; what happens
on the stream is reported through `Callbacks` (the node registry, the log).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator

import grpc
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DiscoveryRequest,
)

from control_plane.callbacks import Callbacks, NodeInfo
from control_plane.gc_pause import collect_when_quiet
from control_plane.snapshot import Snapshot, SnapshotCache
from control_plane.streams import (
    Clock,
    DeltaStream,
    DesiredCache,
    Outgoing,
    SotwStream,
    Stream,
)

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
WAKE = "wake"  # an event that only makes a stream look at its state again
# Streams that get their initial (full) config at once; 0: no bound. In a reconnect
# storm every stream's first responses hold a copy of the whole config in gRPC's send
# buffers, so this bounds the control plane's memory (docs/xds-scale.md).
INITIAL_SYNCS = int(os.environ.get("INFERGATE_XDS_INITIAL_SYNCS", "8"))
INITIAL_SYNC_TIMEOUT = 10.0  # seconds a stream may hold its slot without ACKing routes
# seconds after a snapshot's fan-out began: collect garbage, return freed memory to the OS
QUIET_AFTER = 2.0

log = logging.getLogger("infergate.xds")


class SyncSlot:
    """One stream's place among the streams getting their initial config: taken before
    its first response, given back once Envoy ACKed routes (the whole config is in
    place), when the stream ends, or after INITIAL_SYNC_TIMEOUT."""

    def __init__(self, slots: asyncio.Semaphore | None):
        self.slots = slots
        self.held = self.done = False
        self.timer: asyncio.TimerHandle | None = None

    async def take(self) -> None:
        if self.slots is None or self.held or self.done:
            return
        await self.slots.acquire()
        self.held = True
        self.timer = asyncio.get_running_loop().call_later(INITIAL_SYNC_TIMEOUT, self.give_back)

    def give_back(self) -> None:
        self.done = True
        if self.held:
            self.held = False
            assert self.slots is not None
            self.slots.release()
        if self.timer:
            self.timer.cancel()


class AdsServer:
    """grpcio handlers for AggregatedDiscoveryService, serving a SnapshotCache."""

    def __init__(
        self,
        cache: SnapshotCache,
        callbacks: Callbacks,
        clock: Clock = time.monotonic,
        initial_syncs: int | None = None,
    ):
        self.cache = cache
        self.callbacks = callbacks
        self.clock = clock
        self.desired = DesiredCache()  # shared by all streams
        bound = INITIAL_SYNCS if initial_syncs is None else initial_syncs
        self.initial_syncs = asyncio.Semaphore(bound) if bound > 0 else None
        self._streams: set[asyncio.Queue] = set()  # each open stream's events
        self._broadcaster: asyncio.Task | None = None

    def handler(self) -> grpc.GenericRpcHandler:
        def method(stream_class: type[Stream], request_class) -> grpc.RpcMethodHandler:
            async def serve(requests, context) -> None:
                await self._serve(stream_class, requests, context)

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

    async def _serve(self, stream_class: type[Stream], requests: AsyncIterator, context) -> None:
        """Feed requests and new snapshots into one stream; write its responses."""
        events: asyncio.Queue[object] = asyncio.Queue()

        async def read() -> None:
            try:
                async for req in requests:
                    events.put_nowait(req)
            finally:
                events.put_nowait(None)

        reader = asyncio.create_task(read())
        self._subscribe(events)
        loop = asyncio.get_running_loop()
        wake: asyncio.TimerHandle | None = None
        stream: Stream | None = None
        slot = SyncSlot(self.initial_syncs)
        try:
            while (event := await events.get()) is not None:
                if isinstance(event, DiscoveryRequest | DeltaDiscoveryRequest):
                    if stream is None:
                        stream = await self._open(stream_class, event, context)
                    stream.handle_request(event)
                if stream is None:
                    continue
                await slot.take()
                stream.target = self.cache.for_node(stream.node.listen)
                wake_after = await self._write(context, stream.responses())
                if stream.routes_acked is not None:
                    slot.give_back()
                if wake:
                    wake.cancel()
                if wake_after:  # routes held back while new clusters warm up
                    wake = loop.call_later(wake_after, events.put_nowait, WAKE)
        finally:
            self._unsubscribe(events)
            slot.give_back()
            if wake:
                wake.cancel()
            reader.cancel()
            if stream:
                stream.close()

    def _subscribe(self, events: asyncio.Queue) -> None:
        """Put every new snapshot into `events` (one task watches the cache for all streams,
        while any are open)."""
        self._streams.add(events)
        if self._broadcaster is None:
            self._broadcaster = asyncio.create_task(self._broadcast(self.cache.snapshot))

    def _unsubscribe(self, events: asyncio.Queue) -> None:
        self._streams.discard(events)
        if not self._streams and self._broadcaster:
            self._broadcaster.cancel()
            self._broadcaster = None

    async def _broadcast(self, seen: Snapshot | None) -> None:
        loop = asyncio.get_running_loop()
        trim: asyncio.TimerHandle | None = None
        while True:
            seen = await self.cache.wait_newer(seen)
            for events in self._streams:
                events.put_nowait(seen)
            if trim:
                trim.cancel()
            # The responses in flight to every stream are freed once written: give the
            # memory back (glibc keeps it otherwise, at about 20 kB per stream and edit),
            # after a full collection, which would have held up a fan-out.
            trim = loop.call_later(QUIET_AFTER, collect_when_quiet)

    @staticmethod
    async def _write(context, out: Outgoing) -> float | None:
        """Write the responses and forget them: an idle stream holds no response bytes
        (with an async generator, grpcio keeps the last one, e.g. the whole RDS)."""
        for response in out.responses:
            await context.write(response)
        return out.wake_after
