"""What an xDS stream reports, and to whom: the seam between the protocol state machines
(`streams.py`) and whatever keeps or shows their state (the node registry, the log).

Like go-control-plane's `Callbacks`: a stream calls these on its own events and never
writes status or logs itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from control_plane.config import Endpoint, parse_endpoint

if TYPE_CHECKING:  # kept light: gateway/bootstrap.py imports LISTEN_METADATA
    from envoy.config.core.v3.base_pb2 import Node

# Node metadata key: this Envoy serves the `gateway` listener here instead of `listen`.
LISTEN_METADATA = "infergate.listen"

log = logging.getLogger("infergate.xds")


@dataclass(frozen=True)
class NodeInfo:
    """Who is on the other end of a stream (from the first request's `node`)."""

    id: str
    cluster: str = ""
    listen: Endpoint | None = None

    @classmethod
    def from_proto(cls, node: Node) -> NodeInfo:
        """ValueError names the node and the problem when its `infergate.listen` is bad."""
        listen = None
        field = node.metadata.fields.get(LISTEN_METADATA)
        if field is not None:
            try:
                listen = parse_endpoint(field.string_value)
            except ValueError as exc:
                raise ValueError(f"node {node.id!r}: metadata {LISTEN_METADATA}: {exc}") from None
        return cls(node.id, node.cluster, listen)


class Callbacks(Protocol):
    """Events of one stream; `mode` is "sotw" or "delta"."""

    def on_connect(self, node: NodeInfo, mode: str) -> None: ...
    def on_disconnect(self, node: NodeInfo) -> None: ...
    def on_sent(self, node: NodeInfo, type_url: str, version: str, resources: int) -> None: ...
    def on_ack(self, node: NodeInfo, type_url: str, version: str) -> None: ...
    def on_nack(self, node: NodeInfo, type_url: str, version: str, message: str) -> None: ...


class LogCallbacks:
    """Connections at info, NACKs at warning (with Envoy's message)."""

    def on_connect(self, node: NodeInfo, mode: str) -> None:
        listen = f", serving on {node.listen}" if node.listen else ""
        log.info("node %s connected (%s xDS%s)", node.id, mode, listen)

    def on_disconnect(self, node: NodeInfo) -> None:
        log.info("node %s disconnected", node.id)

    def on_sent(self, node: NodeInfo, type_url: str, version: str, resources: int) -> None:
        pass

    def on_ack(self, node: NodeInfo, type_url: str, version: str) -> None:
        pass

    def on_nack(self, node: NodeInfo, type_url: str, version: str, message: str) -> None:
        kind = type_url.rsplit(".", 1)[-1]  # Cluster, RouteConfiguration, ...
        log.warning("NACK from %s for %s %s: %s", node.id, kind, version, message)


class Fanout:
    """Several callbacks as one, called in order."""

    def __init__(self, *targets: Callbacks) -> None:
        self.targets = targets

    def on_connect(self, node: NodeInfo, mode: str) -> None:
        for t in self.targets:
            t.on_connect(node, mode)

    def on_disconnect(self, node: NodeInfo) -> None:
        for t in self.targets:
            t.on_disconnect(node)

    def on_sent(self, node: NodeInfo, type_url: str, version: str, resources: int) -> None:
        for t in self.targets:
            t.on_sent(node, type_url, version, resources)

    def on_ack(self, node: NodeInfo, type_url: str, version: str) -> None:
        for t in self.targets:
            t.on_ack(node, type_url, version)

    def on_nack(self, node: NodeInfo, type_url: str, version: str, message: str) -> None:
        for t in self.targets:
            t.on_nack(node, type_url, version, message)
