"""What each Envoy (node) has been sent, has ACKed and has rejected: the `Callbacks` of
every xDS stream, kept per node for `/status` (and readable by metrics).

A node that disconnects stays listed, as disconnected, for `FORGET_AFTER` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from control_plane.callbacks import NodeInfo
from control_plane.snapshot import SHORT_NAMES

FORGET_AFTER = 600.0  # seconds a disconnected node stays in the registry


@dataclass
class Nack:
    version: str
    message: str
    at: float


@dataclass(slots=True)
class TypeStatus:
    """One resource type (cds, eds, lds, rds) of one node; times are wall-clock seconds."""

    sent_count: int = 0
    sent_version: str | None = None
    sent_resources: int = 0  # in the last response (Delta: changed resources only)
    sent_at: float | None = None
    acked_count: int = 0
    acked_version: str | None = None
    acked_at: float | None = None
    nack_count: int = 0
    nack: Nack | None = None  # the last NACK, until a later version is ACKed


@dataclass
class NodeStatus:
    node_id: str
    cluster: str
    mode: str  # "sotw" or "delta"
    listen: str | None  # the node's own `gateway` address, if it set one
    connected_since: float
    streams: int = 0
    disconnected_at: float | None = None
    types: dict[str, TypeStatus] = field(default_factory=dict)

    @property
    def connected(self) -> bool:
        return self.streams > 0

    def type(self, type_url: str) -> TypeStatus:
        return self.types.setdefault(SHORT_NAMES[type_url], TypeStatus())

    def as_dict(self, now: float) -> dict[str, Any]:
        gone = self.disconnected_at  # None while connected (a reconnect is a new status)
        return {
            "node_id": self.node_id,
            "cluster": self.cluster,
            "mode": self.mode,
            "listen": self.listen,
            "connected": self.connected,
            "connected_since": self.connected_since,
            "disconnected_at": gone,
            "disconnected_for": None if gone is None else round(now - gone, 1),
            "types": {
                name: {
                    "sent_count": t.sent_count,
                    "sent_version": t.sent_version,
                    "sent_at": t.sent_at,
                    "acked_count": t.acked_count,
                    "acked_version": t.acked_version,
                    "acked_at": t.acked_at,
                    "nack_count": t.nack_count,
                    "nack": t.nack and asdict(t.nack),
                }
                for name, t in sorted(self.types.items())
            },
        }


class NodeRegistry:
    """Per-node xDS state, fed by stream callbacks (`control_plane.callbacks.Callbacks`)."""

    def __init__(
        self, clock: Callable[[], float] = time.time, forget_after: float = FORGET_AFTER
    ) -> None:
        self.clock = clock
        self.forget_after = forget_after
        self.nodes: dict[str, NodeStatus] = {}
        # Disconnected nodes, the longest gone first: forgetting looks at the oldest only
        # (a scan of all nodes per connect was quadratic when thousands reconnect).
        self._gone: dict[str, float] = {}

    def on_connect(self, node: NodeInfo, mode: str) -> None:
        self.forget_old()
        status = self.nodes.get(node.id)
        if status is None or not status.connected:
            listen = str(node.listen) if node.listen else None
            status = NodeStatus(node.id, node.cluster, mode, listen, self.clock())
            self.nodes[node.id] = status
            self._gone.pop(node.id, None)
        status.streams += 1

    def on_disconnect(self, node: NodeInfo) -> None:
        status = self.nodes[node.id]
        status.streams -= 1
        if not status.connected:
            status.disconnected_at = self._gone[node.id] = self.clock()

    def on_sent(self, node: NodeInfo, type_url: str, version: str, resources: int) -> None:
        status = self.nodes[node.id].type(type_url)
        status.sent_count += 1
        status.sent_version, status.sent_resources, status.sent_at = (
            version,
            resources,
            self.clock(),
        )

    def on_ack(self, node: NodeInfo, type_url: str, version: str) -> None:
        status = self.nodes[node.id].type(type_url)
        status.acked_count += 1
        status.acked_version, status.acked_at = version, self.clock()
        if status.nack and status.nack.version != version:
            status.nack = None

    def on_nack(self, node: NodeInfo, type_url: str, version: str, message: str) -> None:
        status = self.nodes[node.id].type(type_url)
        status.nack_count += 1
        status.nack = Nack(version, message, self.clock())

    def forget_old(self) -> None:
        """Drop nodes disconnected for longer than `forget_after`."""
        cutoff = self.clock() - self.forget_after
        while self._gone:
            node_id, gone_at = next(iter(self._gone.items()))
            if gone_at >= cutoff:
                return
            del self._gone[node_id], self.nodes[node_id]

    def as_list(self) -> list[dict[str, Any]]:
        self.forget_old()
        now = self.clock()
        return [n.as_dict(now) for _, n in sorted(self.nodes.items())]
