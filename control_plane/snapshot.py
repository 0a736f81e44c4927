"""Versioned snapshots of serialized resources, and the cache every xDS stream reads.

Each resource is serialized once per snapshot into the bytes of a
`google.protobuf.Any`; streams reuse those bytes. A type's version is its content
hash prefixed by the instance epoch, so that an unchanged type keeps its version
across edits, and a restarted control plane never claims a version Envoy already has.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from dataclasses import dataclass, field

from control_plane.translate import Resources

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

# Make-before-break push order on one ADS stream.
PUSH_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
SHORT_NAMES = {CLUSTER: "cds", ENDPOINT: "eds", LISTENER: "lds", ROUTE: "rds"}
# LDS and CDS are full state of the world; EDS and RDS are asked for by name.
WILDCARD_TYPES = frozenset({CLUSTER, LISTENER})


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_field(number: int, payload: bytes) -> bytes:
    """Protobuf length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_any(type_url: str, value: bytes) -> bytes:
    """The wire bytes of a google.protobuf.Any."""
    return encode_field(1, type_url.encode()) + encode_field(2, value)


def new_epoch() -> str:
    """A token unique to this control-plane instance."""
    return f"{time.time_ns():x}{os.getpid():x}"[-12:]


@dataclass(frozen=True)
class TypeSnapshot:
    """All resources of one type: the type's version, and per name the Any-encoded bytes
    and the resource's own version (used by Delta xDS)."""

    version: str
    resources: dict[str, bytes]
    versions: dict[str, str]


def content_version(epoch: str, resources: dict[str, bytes]) -> str:
    """A version naming exactly this set of resources, for this control-plane instance."""
    digest = hashlib.sha256()
    for name in sorted(resources):
        digest.update(name.encode() + b"\0" + resources[name])
    return f"{epoch}-{digest.hexdigest()[:16]}"


@dataclass(frozen=True, eq=False)
class Snapshot:
    epoch: str
    version: str
    types: dict[str, TypeSnapshot]
    warmup: dict[str, float]  # per cluster: see Resources.warmup
    # What streams derive from this snapshot, computed once for all of them.
    memo: dict = field(default_factory=dict)


def build_snapshot(resources: Resources, epoch: str) -> Snapshot:
    """Serialize every resource once and derive content-hash versions."""
    by_type = {
        CLUSTER: resources.clusters,
        ENDPOINT: resources.endpoints,
        LISTENER: resources.listeners,
        ROUTE: resources.routes,
    }
    types: dict[str, TypeSnapshot] = {}
    overall = hashlib.sha256()
    for type_url, named in by_type.items():
        encoded = {
            name: encode_any(type_url, msg.SerializeToString(deterministic=True))
            for name, msg in named.items()
        }
        version = content_version(epoch, encoded)
        overall.update(version.encode())
        versions = {
            name: f"{epoch}-{hashlib.sha256(blob).hexdigest()[:16]}"
            for name, blob in encoded.items()
        }
        types[type_url] = TypeSnapshot(version, encoded, versions)
    version = f"{epoch}-{overall.hexdigest()[:16]}"
    return Snapshot(epoch, version, types, dict(resources.warmup))


class SnapshotCache:
    """Holds the current snapshot; streams wait here for the next one."""

    def __init__(self) -> None:
        self._snapshot: Snapshot | None = None
        self._changed = asyncio.Event()

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def set(self, snapshot: Snapshot) -> None:
        if self._snapshot and snapshot.version == self._snapshot.version:
            return
        self._snapshot = snapshot
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_newer(self, than: Snapshot | None) -> Snapshot:
        """Return the current snapshot once it differs from `than`."""
        while self._snapshot is None or self._snapshot is than:
            await self._changed.wait()
        return self._snapshot
