"""Per-stream xDS state machines: state of the world (SotW) and incremental (Delta).

Both share the rules that keep Envoy serving (Envoy's xds_protocol docs):
- ACK / NACK: a request answering the last response of its type; a NACK carries
  `error_detail`. It is recorded with Envoy's message and the rejected content is not
  resent; the next change is.
- Stale nonces: a request answering an older response is not an ACK or NACK. SotW
  ignores it; Delta still applies its subscription changes.
- Make-before-break: responses go out in CDS, EDS, LDS, RDS order, one in flight per
  type. RDS waits until Envoy has ACKed clusters and endpoints for every cluster the
  routes name (Envoy ACKs CDS once new clusters are warm, which needs their EDS, so
  EDS never waits for the CDS ACK); clusters that the ACKed routes still name stay in
  CDS until Envoy ACKs routes without them.
- After a CDS push, EDS is resent (SotW: all; Delta: the changed clusters), so that
  re-warming clusters get their endpoints.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DiscoveryRequest,
)

from control_plane.nodes import NodeStatus
from control_plane.snapshot import (
    CLUSTER,
    ENDPOINT,
    PUSH_ORDER,
    ROUTE,
    SHORT_NAMES,
    WILDCARD_TYPES,
    Snapshot,
    SnapshotCache,
    content_version,
    encode_field,
)

log = logging.getLogger("infergate.xds")

WILDCARD = "*"


def encode_sotw_body(version: str, resources: list[bytes], type_url: str) -> bytes:
    """A DiscoveryResponse from pre-encoded Any resources, all but its nonce: protobuf
    fields may come in any order, so each stream appends its own nonce field."""
    parts = [encode_field(1, version.encode())]
    parts += [encode_field(2, blob) for blob in resources]
    parts.append(encode_field(4, type_url.encode()))
    return b"".join(parts)


def nack_message(req: DiscoveryRequest | DeltaDiscoveryRequest) -> str | None:
    """Envoy's error text when the request rejects the last response, else None."""
    error = req.error_detail
    return error.message if error.code or error.message else None


def encode_delta_response(
    version: str,
    resources: dict[str, tuple[str, bytes]],
    removed: list[str],
    type_url: str,
    nonce: str,
) -> bytes:
    """The wire bytes of a DeltaDiscoveryResponse; `resources` maps name -> (version, Any)."""
    parts = [encode_field(1, version.encode())]
    for name, (res_version, blob) in resources.items():
        resource = (
            encode_field(1, res_version.encode())
            + encode_field(2, blob)
            + encode_field(3, name.encode())
        )
        parts.append(encode_field(2, resource))
    parts.append(encode_field(4, type_url.encode()))
    parts.append(encode_field(5, nonce.encode()))
    parts += [encode_field(6, name.encode()) for name in removed]
    return b"".join(parts)


@dataclass
class Desired:
    """What a stream should hold for one type now: name -> (version, Any bytes)."""

    version: str
    resources: dict[str, tuple[str, bytes]]
    names: frozenset[str] = field(init=False)
    _sotw_body: bytes | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.names = frozenset(self.resources)

    def sotw_response(self, type_url: str, nonce: str) -> bytes:
        """The DiscoveryResponse; all but the nonce is encoded once and shared by streams."""
        if self._sotw_body is None:
            blobs = [blob for _, blob in self.resources.values()]
            self._sotw_body = encode_sotw_body(self.version, blobs, type_url)
        return self._sotw_body + encode_field(5, nonce.encode())


@dataclass
class TypeState:
    """One resource type on one stream."""

    names: frozenset[str] | None = None  # subscribed names; None: wildcard
    last_nonce: str | None = None
    pending: bool = False  # the last response has no ACK or NACK yet
    force: bool = False  # SotW: resend even if unchanged
    sent_version: str | None = None
    sent_names: frozenset[str] = frozenset()
    sent_snapshot: Snapshot | None = None
    acked_names: frozenset[str] | None = None
    acked_at: dict[str, float] = field(default_factory=dict)  # name -> first ACKed (monotonic)
    known: dict[str, str] = field(default_factory=dict)  # Delta: name -> version Envoy has


@dataclass
class Stream:
    """What is common to both protocol variants."""

    cache: SnapshotCache
    node: NodeStatus | None = None
    types: dict[str, TypeState] = field(default_factory=dict)
    routes_acked: Snapshot | None = None  # snapshot of the last RDS that Envoy ACKed
    nonce: int = 0
    wake_after: float | None = None  # seconds until held-back routes may go out

    def _answer(self, type_url: str, state: TypeState, error_message: str | None) -> None:
        """Record the ACK or NACK of the last response of a type."""
        state.pending = False
        version = state.sent_version or ""
        if error_message is not None:
            node_id = self.node.node_id if self.node else "?"
            log.warning(
                "NACK from %s for %s %s: %s", node_id, SHORT_NAMES[type_url], version, error_message
            )
            if self.node:
                self.node.type(type_url).nack = {"version": version, "message": error_message}
            return
        now = time.monotonic()
        state.acked_at = {n: state.acked_at.get(n, now) for n in state.sent_names}
        state.acked_names = state.sent_names
        if type_url == ROUTE:
            self.routes_acked = state.sent_snapshot
        if self.node:
            status = self.node.type(type_url)
            status.acked_version = version
            if status.nack and status.nack["version"] != version:
                status.nack = None

    def _desired(self, type_url: str, snapshot: Snapshot) -> Desired | None:
        """What the stream should have for a type, or None to hold it back."""
        if type_url == ROUTE:
            wait = self._routes_wait(snapshot)
            if wait is None or wait > 0:
                self.wake_after = wait
                return None
        names = self.types[type_url].names
        acked = self.routes_acked
        lingering = type_url in (CLUSTER, ENDPOINT) and acked is not None and acked is not snapshot
        key = (
            type_url,
            names,
            acked.version if lingering else None,
        )
        desired = snapshot.memo.get(key)  # streams in the same state share one answer
        if desired is None:
            desired = snapshot.memo[key] = self._compute_desired(
                type_url, snapshot, names, acked if lingering else None
            )
        return desired

    @staticmethod
    def _compute_desired(
        type_url: str, snapshot: Snapshot, names: frozenset[str] | None, acked: Snapshot | None
    ) -> Desired:
        typed = snapshot.types[type_url]
        available = {n: (typed.versions[n], b) for n, b in typed.resources.items()}
        version = typed.version
        if acked is not None:
            old = acked.types[type_url]
            extras = {
                n: (old.versions[n], b) for n, b in old.resources.items() if n not in available
            }
            if extras:
                available.update(extras)
                version = content_version(snapshot.epoch, {n: b for n, (_, b) in available.items()})
        if names is not None:
            available = {n: available[n] for n in sorted(names) if n in available}
        return Desired(version, available)

    def _routes_wait(self, snapshot: Snapshot) -> float | None:
        """Seconds until routes may name every cluster of `snapshot`: None while Envoy has
        not ACKed clusters and endpoints for all of them; then the rest of the warm-up
        (first active health check) of clusters that the routes it runs do not name yet."""
        needed = snapshot.memo.get("clusters")
        if needed is None:
            needed = snapshot.memo["clusters"] = frozenset(snapshot.types[CLUSTER].resources)
        if not needed:
            return 0.0
        for type_url in (CLUSTER, ENDPOINT):
            state = self.types.get(type_url)
            if state is None or state.pending or state.acked_names is None:
                return None
            if not needed <= state.acked_names:
                return None
        if self.routes_acked is None:
            return 0.0  # Envoy's own start-up waits for clusters to warm
        running = self.routes_acked.types[CLUSTER].resources
        acked_at = self.types[ENDPOINT].acked_at
        now = time.monotonic()
        return max(
            [acked_at[n] + snapshot.warmup.get(n, 0.0) - now for n in needed if n not in running],
            default=0.0,
        )

    def _next_nonce(self, state: TypeState) -> str:
        self.nonce += 1
        state.last_nonce = str(self.nonce)
        state.pending = True
        return state.last_nonce

    def _sent(
        self,
        type_url: str,
        state: TypeState,
        version: str,
        names: frozenset[str],
        snapshot: Snapshot,
    ) -> None:
        state.sent_version, state.sent_names, state.sent_snapshot = version, names, snapshot
        if self.node:
            status = self.node.type(type_url)
            status.sent_version = version
            status.sent_count += 1

    def responses(self) -> list[bytes]:
        """The responses due now, in make-before-break order. A type with a response in
        flight waits for its ACK or NACK; the next change then goes out as one response."""
        snapshot = self.cache.snapshot
        self.wake_after = None
        if snapshot is None:
            return []
        out = []
        for type_url in PUSH_ORDER:
            state = self.types.get(type_url)
            if state is None or state.pending:
                continue
            want = self._desired(type_url, snapshot)
            if want is None:
                continue
            response = self._respond(type_url, state, want, snapshot)
            if response is not None:
                out.append(response)
        return out

    def _respond(
        self, type_url: str, state: TypeState, want: Desired, snapshot: Snapshot
    ) -> bytes | None:
        raise NotImplementedError


class SotwStream(Stream):
    def handle_request(self, req: DiscoveryRequest) -> None:
        state = self.types.setdefault(req.type_url, TypeState())
        if req.response_nonce and req.response_nonce != state.last_nonce:
            return  # stale: answers a response that a newer one replaced
        if req.response_nonce and state.pending:
            self._answer(req.type_url, state, nack_message(req))
        if req.type_url not in WILDCARD_TYPES:
            state.names = frozenset(req.resource_names)

    def _respond(
        self, type_url: str, state: TypeState, want: Desired, snapshot: Snapshot
    ) -> bytes | None:
        names = want.names
        if state.sent_version == want.version and state.sent_names == names and not state.force:
            return None
        state.force = False
        nonce = self._next_nonce(state)
        self._sent(type_url, state, want.version, names, snapshot)
        if type_url == CLUSTER and ENDPOINT in self.types:
            self.types[ENDPOINT].force = True
        return want.sotw_response(type_url, nonce)


class DeltaStream(Stream):
    def handle_request(self, req: DeltaDiscoveryRequest) -> None:
        state = self.types.get(req.type_url)
        if state is None:
            state = self.types[req.type_url] = TypeState(names=frozenset())
            state.known = dict(req.initial_resource_versions)
            if req.type_url in WILDCARD_TYPES and not req.resource_names_subscribe:
                state.names = None
        if req.response_nonce and req.response_nonce == state.last_nonce and state.pending:
            self._answer(req.type_url, state, nack_message(req))
        # Subscription changes apply even on a stale nonce.
        subscribe, unsubscribe = set(req.resource_names_subscribe), req.resource_names_unsubscribe
        if WILDCARD in subscribe:
            state.names = None
            subscribe.discard(WILDCARD)
        if state.names is not None and (subscribe or unsubscribe):
            state.names = (state.names | subscribe) - set(unsubscribe)
        for name in unsubscribe:
            state.known.pop(name, None)
        for name in subscribe - set(req.initial_resource_versions):
            state.known.pop(name, None)  # a (re)subscription gets the resource sent

    def _respond(
        self, type_url: str, state: TypeState, want: Desired, snapshot: Snapshot
    ) -> bytes | None:
        changed = {n: vb for n, vb in want.resources.items() if state.known.get(n) != vb[0]}
        removed = sorted(
            n
            for n in state.known
            if n not in want.resources and (state.names is None or n in state.names)
        )
        if not changed and not removed:
            return None
        for name, (version, _) in changed.items():
            state.known[name] = version
        for name in removed:
            del state.known[name]
        if type_url == CLUSTER and ENDPOINT in self.types:
            for name in changed:  # re-warming clusters need their endpoints again
                self.types[ENDPOINT].known.pop(name, None)
        nonce = self._next_nonce(state)
        self._sent(type_url, state, want.version, frozenset(state.known), snapshot)
        return encode_delta_response(want.version, changed, removed, type_url, nonce)
