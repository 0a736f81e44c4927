"""A simulated Envoy on one ADS stream (SotW or Delta), answering like Envoy does:
CDS, then EDS for the clusters, ACK EDS then CDS (clusters are warm), LDS, SRDS (the
scopes), RDS for the route configurations the scopes name.

Every RDS ACK is reported with its version and the `time.monotonic()` of the ACK, a
clock shared by all processes of the machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DiscoveryRequest

from bench.xds_scale import wire
from control_plane.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, SCOPED_ROUTE
from control_plane.xds_server import ADS_SERVICE

OnRoutes = Callable[[str, str, float], None]  # client, route version, ACK time


class SimEnvoy:
    """One simulated Envoy. `run()` returns when the stream ends."""

    def __init__(self, channel: grpc.aio.Channel, node_id: str, delta: bool, on_routes: OnRoutes):
        self.channel = channel
        self.node_id = node_id
        self.node: Node | None = None
        self.delta = delta
        self.on_routes = on_routes
        self.call: grpc.aio.StreamStreamCall | None = None

    async def run(self) -> None:
        """One ADS stream from scratch (a reconnecting Envoy starts over too)."""
        self.node = Node(id=self.node_id, cluster="xds-scale")
        self.eds_names: list[str] = []
        self.eds_ack: tuple[str, str] = ("", "")  # SotW: version, nonce of the last EDS
        self.cds_waiting: wire.Response | None = None  # CDS to ACK once EDS arrives
        self.lds_requested = self.srds_requested = False
        self.rds_names: list[str] = []
        self.rds_ack: tuple[str, str] = ("", "")  # SotW: version, nonce of the last RDS
        name = "DeltaAggregatedResources" if self.delta else "StreamAggregatedResources"
        method = self.channel.stream_stream(f"/{ADS_SERVICE}/{name}")
        self.call = method()
        handle = self._delta if self.delta else self._sotw
        await self._request(CLUSTER)
        while (raw := await self.call.read()) is not grpc.aio.EOF:
            await handle(wire.response(raw))

    async def close(self) -> None:
        if self.call is not None:
            self.call.cancel()

    async def _request(
        self, type_url: str, names: list[str] | None = None, version: str = "", nonce: str = ""
    ) -> None:
        """A SotW request, or a Delta one where `names` are subscriptions."""
        node, self.node = self.node, None
        if self.delta:
            msg: DiscoveryRequest | DeltaDiscoveryRequest = DeltaDiscoveryRequest(
                type_url=type_url, resource_names_subscribe=names or [], response_nonce=nonce
            )
        else:
            msg = DiscoveryRequest(
                type_url=type_url,
                resource_names=names or [],
                version_info=version,
                response_nonce=nonce,
            )
        if node is not None:
            msg.node.CopyFrom(node)
        assert self.call is not None
        await self.call.write(msg.SerializeToString())

    async def _after_eds(self) -> None:
        """Clusters are warm once their endpoints arrived: ACK CDS, then ask for listeners."""
        if self.cds_waiting is not None:
            cds, self.cds_waiting = self.cds_waiting, None
            await self._request(CLUSTER, None, cds.version, cds.nonce)
        if not self.lds_requested:
            self.lds_requested = True
            await self._request(LISTENER)

    async def _routes(self, resp: wire.Response, names: list[str] | None) -> None:
        await self._request(ROUTE, names, resp.version, resp.nonce)
        self.on_routes(self.node_id, resp.version, time.monotonic())

    async def _scopes(self, resp: wire.Response) -> None:
        """ACK the scopes, then ask for the route configurations they name."""
        names = sorted({wire.scope_route_config(r, self.delta) for r in resp.resources})
        if self.delta:
            await self._request(SCOPED_ROUTE, None, nonce=resp.nonce)
            added = sorted(set(names) - set(self.rds_names))
            self.rds_names = sorted((set(self.rds_names) | set(names)) - set(resp.removed))
            if added:
                await self._request(ROUTE, added)
            return
        await self._request(SCOPED_ROUTE, None, resp.version, resp.nonce)
        if names != self.rds_names:
            self.rds_names = names
            await self._request(ROUTE, names, *self.rds_ack)

    async def _listeners(self, resp: wire.Response) -> None:
        if self.delta:
            await self._request(LISTENER, None, nonce=resp.nonce)
        else:
            await self._request(LISTENER, None, resp.version, resp.nonce)
        if not self.srds_requested:
            self.srds_requested = True
            await self._request(SCOPED_ROUTE)

    async def _sotw(self, resp: wire.Response) -> None:
        t = resp.type_url
        if t == ROUTE:
            self.rds_ack = (resp.version, resp.nonce)
            await self._routes(resp, self.rds_names)
        elif t == SCOPED_ROUTE:
            await self._scopes(resp)
        elif t == CLUSTER:
            names = sorted(wire.sotw_cluster_name(r) for r in resp.resources)
            self.cds_waiting = resp
            if names != self.eds_names:
                self.eds_names = names
                await self._request(ENDPOINT, names, *self.eds_ack)
        elif t == ENDPOINT:
            self.eds_ack = (resp.version, resp.nonce)
            await self._request(ENDPOINT, self.eds_names, resp.version, resp.nonce)
            await self._after_eds()
        elif t == LISTENER:
            await self._listeners(resp)

    async def _delta(self, resp: wire.Response) -> None:
        t = resp.type_url
        if t == ROUTE:
            await self._routes(resp, None)
        elif t == SCOPED_ROUTE:
            await self._scopes(resp)
        elif t == CLUSTER:
            names = {wire.delta_resource_name(r) for r in resp.resources}
            added = sorted(names - set(self.eds_names))
            self.eds_names = sorted((set(self.eds_names) | names) - set(resp.removed))
            if not names:  # removals only: nothing to warm
                await self._request(CLUSTER, None, nonce=resp.nonce)
                return
            self.cds_waiting = resp
            if added:
                await self._request(ENDPOINT, added)
        elif t == ENDPOINT:
            await self._request(ENDPOINT, None, nonce=resp.nonce)
            await self._after_eds()
        elif t == LISTENER:
            await self._listeners(resp)
