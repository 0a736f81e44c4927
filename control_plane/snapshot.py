"""Versioned snapshots of serialized resources, and the cache every xDS stream reads.

Each resource is serialized into the bytes of a `google.protobuf.Any` once, and again
only when translation gives a new message for it (unchanged models keep their messages);
streams reuse those bytes. A type's version is its content
hash prefixed by the instance epoch, so that an unchanged type keeps its version
across edits, and a restarted control plane never claims a version Envoy already has.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from dataclasses import dataclass, replace
from functools import cached_property

from envoy.config.listener.v3.listener_pb2 import Listener
from google.protobuf.any_pb2 import Any
from google.protobuf.message import Message

from control_plane.config import Endpoint
from control_plane.resources import Resources
from control_plane.translate import LISTENER_NAME
from control_plane.wire import encode_any

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SCOPED_ROUTE = "type.googleapis.com/envoy.config.route.v3.ScopedRouteConfiguration"
RUNTIME = "type.googleapis.com/envoy.service.runtime.v3.Runtime"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
EXTENSION = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"

# Make-before-break push order on one ADS stream: secrets before the clusters that name
# them; HTTP filter configs (ECDS) after the listeners that name them, as Envoy asks for
# them only then; scopes (SRDS) before the route configurations they name (runtime layers
# are independent: last).
PUSH_ORDER = (SECRET, CLUSTER, ENDPOINT, LISTENER, EXTENSION, SCOPED_ROUTE, ROUTE, RUNTIME)
SHORT_NAMES = {
    SECRET: "sds",
    CLUSTER: "cds",
    ENDPOINT: "eds",
    LISTENER: "lds",
    SCOPED_ROUTE: "srds",
    ROUTE: "rds",
    RUNTIME: "rtds",
    EXTENSION: "ecds",
}
# LDS, CDS and SRDS are full state of the world; EDS, RDS and SDS are asked for by name.
WILDCARD_TYPES = frozenset({CLUSTER, LISTENER, SCOPED_ROUTE})


def new_epoch() -> str:
    """A token unique to this control-plane instance."""
    return f"{time.time_ns():x}{os.getpid():x}"[-12:]


def content_version(epoch: str, versions: dict[str, str]) -> str:
    """A version naming exactly this set of resources (name -> the resource's own version,
    a digest of its bytes), for this control-plane instance."""
    listed = "\n".join(f"{name}\0{versions[name]}" for name in sorted(versions))
    return f"{epoch}-{hashlib.sha256(listed.encode()).hexdigest()[:16]}"


@dataclass(frozen=True, eq=False)
class TypeSnapshot:
    """All resources of one type: the type's version, and per name the Any-encoded bytes
    and the resource's own version (used by Delta xDS). Compared by identity."""

    version: str
    resources: dict[str, bytes]
    versions: dict[str, str]

    @cached_property
    def names(self) -> frozenset[str]:
        return frozenset(self.resources)


# The last build's type snapshots: a type whose content did not change keeps its object,
# so that what streams derived from it (`streams.DesiredCache`) stays valid.
_last_types: dict[str, TypeSnapshot] = {}


def _type_snapshot(epoch: str, type_url: str, encoded: dict[str, Encoded]) -> TypeSnapshot:
    versions = {name: f"{epoch}-{e.digest}" for name, e in encoded.items()}
    version = content_version(epoch, versions)
    last = _last_types.get(type_url)
    if last is not None and last.version == version:
        return last
    return TypeSnapshot(version, {name: e.blob for name, e in encoded.items()}, versions)


@dataclass(frozen=True, eq=False)
class Encoded:
    message: Message  # held, so that its id() is not reused while it is cached
    blob: bytes  # the Any-encoded resource
    digest: str


# The last build's encodings by the id() of their message. Translation shares an unchanged
# model's messages from one build to the next (they are never modified), so a one-model
# edit at 1,000 models serializes and hashes that model's resources only.
_last_build: dict[int, Encoded] = {}


def _encode(
    type_url: str, named: dict[str, Message], cache: dict[int, Encoded] | None = None
) -> dict[str, Encoded]:
    """Each message encoded, from `_last_build` if it is the same object; what it used
    goes into `cache` (the next build's)."""
    out = {}
    for name, msg in named.items():
        hit = _last_build.get(id(msg))
        if hit is None or hit.message is not msg:
            blob = encode_any(type_url, msg.SerializeToString(deterministic=True))
            hit = Encoded(msg, blob, hashlib.sha256(blob).hexdigest()[:16])
        if cache is not None:
            cache[id(msg)] = hit
        out[name] = hit
    return out


def _overall_version(epoch: str, types: dict[str, TypeSnapshot]) -> str:
    digest = hashlib.sha256(b"".join(t.version.encode() for t in types.values()))
    return f"{epoch}-{digest.hexdigest()[:16]}"


@dataclass(frozen=True, eq=False)
class Snapshot:
    epoch: str
    version: str
    types: dict[str, TypeSnapshot]
    health_check_timeouts: dict[str, float]  # per cluster: see Resources
    route_clusters: dict[str, frozenset[str]]  # per route configuration: see Resources


def build_snapshot(
    resources: Resources,
    epoch: str,
    runtime: dict[str, Message] | None = None,
    secrets: dict[str, Message] | None = None,
) -> Snapshot:
    """Serialize every resource once and derive content-hash versions. `runtime`: the
    RTDS layers (`envoy.service.runtime.v3.Runtime` by name); `secrets`: the SDS secrets
    (the type is left out without any, so Envoys that never ask for it still converge)."""
    by_type = {
        **({SECRET: secrets} if secrets else {}),
        CLUSTER: resources.clusters,
        ENDPOINT: resources.endpoints,
        LISTENER: resources.listeners,
        SCOPED_ROUTE: resources.scoped_routes,
        ROUTE: resources.routes,
        RUNTIME: runtime or {},
        # Left out without any, like the secrets.
        **({EXTENSION: resources.extension_configs} if resources.extension_configs else {}),
    }
    global _last_build, _last_types
    cache: dict[int, Encoded] = {}
    types = {t: _type_snapshot(epoch, t, _encode(t, named, cache)) for t, named in by_type.items()}
    # One assignment each: a build in another thread at once only misses.
    _last_build, _last_types = cache, types
    return Snapshot(
        epoch,
        _overall_version(epoch, types),
        types,
        dict(resources.health_check_timeouts),
        resources.route_clusters,
    )


def with_listen(snapshot: Snapshot, listen: Endpoint) -> Snapshot:
    """The snapshot for a node that serves the `gateway` listener on its own address:
    only the listeners differ; every other type is the same object."""
    old, epoch = snapshot.types[LISTENER], snapshot.epoch
    # The snapshot's own gateway listener, moved: it keeps what was added after translation
    # (the access log).
    packed, gateway = Any(), Listener()
    packed.ParseFromString(old.resources[LISTENER_NAME])
    packed.Unpack(gateway)
    gateway.address.socket_address.address = listen.host
    gateway.address.socket_address.port_value = listen.port
    moved = _encode(LISTENER, {LISTENER_NAME: gateway})[LISTENER_NAME]
    blobs = {**old.resources, LISTENER_NAME: moved.blob}
    versions = {**old.versions, LISTENER_NAME: f"{epoch}-{moved.digest}"}
    types = {
        **snapshot.types,
        LISTENER: TypeSnapshot(content_version(epoch, versions), blobs, versions),
    }
    return replace(snapshot, version=_overall_version(snapshot.epoch, types), types=types)


def with_runtime(snapshot: Snapshot, runtime: dict[str, Message]) -> Snapshot:
    """The snapshot with other RTDS layers; every other type is the same object."""
    types = {
        **snapshot.types,
        RUNTIME: _type_snapshot(snapshot.epoch, RUNTIME, _encode(RUNTIME, runtime)),
    }
    return replace(snapshot, version=_overall_version(snapshot.epoch, types), types=types)


class SnapshotCache:
    """Holds the current snapshot; streams wait here for the next one. Per-node variants
    (a node's own `listen`) are derived once per snapshot and address, on first use."""

    def __init__(self) -> None:
        self._snapshot: Snapshot | None = None
        self._variants: dict[Endpoint, Snapshot] = {}
        self._changed = asyncio.Event()

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def for_node(self, listen: Endpoint | None) -> Snapshot | None:
        """The current snapshot as the node with this `listen` override should see it."""
        if listen is None or self._snapshot is None:
            return self._snapshot
        variant = self._variants.get(listen)
        if variant is None:
            variant = self._variants[listen] = with_listen(self._snapshot, listen)
        return variant

    def set(self, snapshot: Snapshot) -> None:
        if self._snapshot and snapshot.version == self._snapshot.version:
            return
        self._snapshot = snapshot
        self._variants = {}
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_newer(self, than: Snapshot | None) -> Snapshot:
        """Return the current snapshot once it differs from `than`."""
        while self._snapshot is None or self._snapshot is than:
            await self._changed.wait()
        return self._snapshot
