"""A minimal ADS client over real gRPC, for protocol tests: it sends what Envoy would."""

from __future__ import annotations

import asyncio

import grpc
from envoy_data_plane.envoy.config.core.v3 import Node
from envoy_data_plane.envoy.service.discovery.v3 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)
from envoy_data_plane.google.rpc import Status

from control_plane.xds_server import ADS_SERVICE


class AdsClient:
    METHOD = "StreamAggregatedResources"
    RESPONSE = DiscoveryResponse

    def __init__(self, address: str, node_id: str = "sim-1"):
        self.channel = grpc.aio.insecure_channel(address)
        self.node = Node(id=node_id, cluster="sim")
        self.requests: asyncio.Queue[DiscoveryRequest | None] = asyncio.Queue()
        self.responses: asyncio.Queue[DiscoveryResponse] = asyncio.Queue()
        self._sent_node = False
        self._call = None
        self._reader: asyncio.Task | None = None

    async def start(self):
        method = self.channel.stream_stream(
            f"/{ADS_SERVICE}/{self.METHOD}",
            request_serializer=bytes,
            response_deserializer=self.RESPONSE.FromString,
        )

        async def outgoing():
            while (req := await self.requests.get()) is not None:
                yield req

        self._call = method(outgoing())

        async def read():
            async for resp in self._call:
                await self.responses.put(resp)

        self._reader = asyncio.create_task(read())
        return self

    async def send(
        self, type_url: str, names=(), version: str = "", nonce: str = "", error: str | None = None
    ) -> None:
        req = DiscoveryRequest(
            type_url=type_url,
            resource_names=list(names),
            version_info=version,
            response_nonce=nonce,
        )
        await self._put(req, error)

    async def _put(self, req, error: str | None) -> None:
        """Queue a request: the node on the stream's first, `error_detail` for a NACK."""
        if not self._sent_node:
            req.node = self.node
            self._sent_node = True
        if error is not None:
            req.error_detail = Status(code=3, message=error)
        await self.requests.put(req)

    async def recv(self, timeout: float = 5.0) -> DiscoveryResponse:
        return await asyncio.wait_for(self.responses.get(), timeout)

    async def ack(self, resp: DiscoveryResponse, names=()) -> None:
        await self.send(resp.type_url, names, resp.version_info, resp.nonce)

    async def close(self) -> None:
        await self.requests.put(None)
        if self._reader:
            self._reader.cancel()
        await self.channel.close()


class DeltaClient(AdsClient):
    """The same, speaking incremental xDS (DeltaAggregatedResources)."""

    METHOD = "DeltaAggregatedResources"
    RESPONSE = DeltaDiscoveryResponse

    async def delta(
        self,
        type_url: str,
        subscribe=(),
        unsubscribe=(),
        nonce: str = "",
        error: str | None = None,
        initial: dict | None = None,
    ) -> None:
        req = DeltaDiscoveryRequest(
            type_url=type_url,
            resource_names_subscribe=list(subscribe),
            resource_names_unsubscribe=list(unsubscribe),
            response_nonce=nonce,
            initial_resource_versions=initial or {},
        )
        await self._put(req, error)

    async def ack(self, resp, names=()) -> None:
        await self.delta(resp.type_url, nonce=resp.nonce)
