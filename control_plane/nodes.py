"""What each connected Envoy (node) has been sent, has ACKed, and has rejected."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from control_plane.snapshot import SHORT_NAMES


@dataclass
class TypeStatus:
    sent_count: int = 0
    sent_version: str | None = None
    acked_version: str | None = None
    nack: dict[str, Any] | None = None


@dataclass
class NodeStatus:
    node_id: str
    cluster: str
    connected_since: float
    streams: int = 0
    disconnected_at: float | None = None
    types: dict[str, TypeStatus] = field(default_factory=dict)

    def type(self, type_url: str) -> TypeStatus:
        return self.types.setdefault(SHORT_NAMES.get(type_url, type_url), TypeStatus())

    def as_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "cluster": self.cluster,
            "connected": self.streams > 0,
            "connected_since": self.connected_since,
            "disconnected_at": self.disconnected_at,
            "types": {
                name: {
                    "sent_count": t.sent_count,
                    "sent_version": t.sent_version,
                    "acked_version": t.acked_version,
                    "nack": t.nack,
                }
                for name, t in sorted(self.types.items())
            },
        }


class NodeRegistry:
    """Per-node xDS state, kept after a node disconnects so that status can show it."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeStatus] = {}

    def connected(self, node_id: str, cluster: str) -> NodeStatus:
        node = self.nodes.get(node_id)
        if node is None or node.streams == 0:
            node = NodeStatus(node_id, cluster, time.time())
            self.nodes[node_id] = node
        node.streams += 1
        return node

    def disconnected(self, node: NodeStatus) -> None:
        node.streams -= 1
        if node.streams == 0:
            node.disconnected_at = time.time()

    def as_list(self) -> list[dict[str, Any]]:
        return [n.as_dict() for _, n in sorted(self.nodes.items())]
