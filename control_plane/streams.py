"""Per-stream xDS state machines: state of the world (SotW) and incremental (Delta).

A stream is pure protocol state: the server hands it requests and the snapshot it should
converge to (`target`), and asks it for the responses due now (`responses()`). It reads
time only from its injected clock, and reports what happens through `Callbacks`.

Both variants share the rules that keep Envoy serving (Envoy's xds_protocol docs):
- ACK / NACK: a request answering the last response of its type; a NACK carries
  `error_detail`. It is reported with Envoy's message and the rejected content is not
  resent; the next change is.
- Stale nonces: a request answering an older response is not an ACK or NACK. SotW
  ignores it; Delta still applies its subscription changes.
- Make-before-break: responses go out in SDS, CDS, EDS, LDS, RDS order, one in flight
  per type. RDS waits until Envoy has ACKed the secrets (the clusters' TLS certificates,
  if any), and clusters and endpoints for every cluster the routes name (Envoy ACKs
  CDS once new clusters are warm, which needs their EDS and secrets, so EDS and SDS
  never wait for the CDS ACK), then for the first health check of clusters that
  the routes Envoy runs do not name yet (their timeout plus WARMUP_MARGIN after their
  endpoints were ACKed). Clusters that the ACKed routes still name stay in CDS until
  Envoy ACKs routes without them.
- After a CDS push, EDS is resent (SotW: all; Delta: the changed clusters), so that
  re-warming clusters get their endpoints.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar
from weakref import WeakKeyDictionary

from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DiscoveryRequest,
)

from control_plane.callbacks import Callbacks, NodeInfo
from control_plane.snapshot import (
    CLUSTER,
    ENDPOINT,
    PUSH_ORDER,
    ROUTE,
    SECRET,
    WILDCARD_TYPES,
    Snapshot,
    TypeSnapshot,
    content_version,
)
from control_plane.wire import encode_delta_body, encode_sotw_body, with_nonce

WILDCARD = "*"
# Routes wait this long beyond a new cluster's health-check timeout (Envoy's first check
# must have finished and marked the cluster warm).
WARMUP_MARGIN = 0.05

Clock = Callable[[], float]  # monotonic seconds


def nack_message(req: DiscoveryRequest | DeltaDiscoveryRequest) -> str | None:
    """Envoy's error text when the request rejects the last response, else None."""
    error = req.error_detail
    return error.message if error.code or error.message else None


@dataclass
class Desired:
    """What a stream should hold for one type now: name -> (version, Any bytes)."""

    version: str
    resources: dict[str, tuple[str, bytes]]
    names: frozenset[str] = field(init=False)
    _sotw_body: bytes | None = field(default=None, init=False)
    _delta_bodies: dict[tuple[frozenset[str], tuple[str, ...]], bytes] = field(
        default_factory=dict, init=False
    )

    def __post_init__(self) -> None:
        self.names = frozenset(self.resources)

    def sotw_response(self, type_url: str, nonce: str) -> bytes:
        """The DiscoveryResponse; all but the nonce is encoded once and shared by streams."""
        if self._sotw_body is None:
            blobs = [blob for _, blob in self.resources.values()]
            self._sotw_body = encode_sotw_body(self.version, blobs, type_url)
        return with_nonce(self._sotw_body, nonce)

    def delta_response(
        self, type_url: str, changed: frozenset[str], removed: tuple[str, ...], nonce: str
    ) -> bytes:
        """The DeltaDiscoveryResponse sending `changed` and removing `removed`; encoded once
        for all streams that need the same change (e.g. every Envoy on a weight edit)."""
        key = (changed, removed)
        body = self._delta_bodies.get(key)
        if body is None:
            sent = {n: vb for n, vb in self.resources.items() if n in changed}
            body = self._delta_bodies[key] = encode_delta_body(
                self.version, sent, list(removed), type_url
            )
        return with_nonce(body, nonce)


DesiredKey = tuple[frozenset[str] | None, str | None]  # subscribed names, lingering version


def _compute_desired(
    epoch: str, typed: TypeSnapshot, names: frozenset[str] | None, lingering: TypeSnapshot | None
) -> Desired:
    available = {n: (typed.versions[n], b) for n, b in typed.resources.items()}
    version = typed.version
    if lingering is not None:
        extras = {
            n: (lingering.versions[n], b)
            for n, b in lingering.resources.items()
            if n not in available
        }
        if extras:
            available.update(extras)
            version = content_version(epoch, {n: b for n, (_, b) in available.items()})
    if names is not None:
        available = {n: available[n] for n in sorted(names) if n in available}
    return Desired(version, available)


class DesiredCache:
    """What streams derive from snapshots: per type's resources, subscribed names and
    lingering resources, the `Desired` answer, computed once and shared by every stream in
    that state. Entries live as long as their snapshot's resources."""

    def __init__(self) -> None:
        self._by_type: WeakKeyDictionary[TypeSnapshot, dict[DesiredKey, Desired]] = (
            WeakKeyDictionary()
        )

    def get(
        self,
        epoch: str,
        typed: TypeSnapshot,
        names: frozenset[str] | None,
        lingering: TypeSnapshot | None,
    ) -> Desired:
        memo = self._by_type.get(typed)
        if memo is None:
            memo = self._by_type[typed] = {}
        key = (names, lingering.version if lingering else None)
        desired = memo.get(key)
        if desired is None:
            desired = memo[key] = _compute_desired(epoch, typed, names, lingering)
        return desired


@dataclass(frozen=True)
class Outgoing:
    """The responses due now, and when to look again if routes are held back."""

    responses: list[bytes]
    wake_after: float | None = None  # seconds until held-back routes may go out


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
    acked_at: dict[str, float] = field(default_factory=dict)  # EDS: name -> first ACKed
    known: dict[str, str] = field(default_factory=dict)  # Delta: name -> version Envoy has
    synced: str | None = None  # Delta: `known` holds all of this desired version (no diff)


class Stream:
    """What is common to both protocol variants."""

    mode: ClassVar[str]

    def __init__(
        self,
        node: NodeInfo,
        callbacks: Callbacks,
        clock: Clock,
        desired: DesiredCache | None = None,
    ) -> None:
        self.node = node
        self.callbacks = callbacks
        self.clock = clock
        self.desired = desired or DesiredCache()  # shared by the server's streams
        self.target: Snapshot | None = None  # the snapshot to converge to
        self.types: dict[str, TypeState] = {}
        self.routes_acked: Snapshot | None = None  # snapshot of the last RDS Envoy ACKed
        self.nonce = 0

    def open(self) -> None:
        self.callbacks.on_connect(self.node, self.mode)

    def close(self) -> None:
        self.callbacks.on_disconnect(self.node)

    def _answer(self, type_url: str, state: TypeState, error_message: str | None) -> None:
        """Record the ACK or NACK of the last response of a type."""
        state.pending = False
        version = state.sent_version or ""
        if error_message is not None:
            self.callbacks.on_nack(self.node, type_url, version, error_message)
            return
        if type_url == ENDPOINT:  # the warm-up of new clusters counts from here
            now = self.clock()
            state.acked_at = {n: state.acked_at.get(n, now) for n in state.sent_names}
        state.acked_names = state.sent_names
        if type_url == ROUTE:
            self.routes_acked = state.sent_snapshot
        elif type_url == ENDPOINT and self._same_routes(state.sent_snapshot):
            # Same routes, newer endpoints (e.g. registered since): clusters that linger
            # after a removal keep these endpoints, not the ones of the routes' first ACK.
            self.routes_acked = state.sent_snapshot
        self.callbacks.on_ack(self.node, type_url, version)

    def _same_routes(self, snapshot: Snapshot | None) -> bool:
        acked = self.routes_acked
        return (
            acked is not None
            and snapshot is not None
            and snapshot.types[ROUTE].version == acked.types[ROUTE].version
        )

    def _desired(self, type_url: str, snapshot: Snapshot) -> Desired:
        """What the stream should have for a type: the snapshot's resources, plus, for
        clusters and endpoints, those that the routes Envoy runs still name."""
        typed = snapshot.types[type_url]
        lingering = None
        if type_url in (CLUSTER, ENDPOINT) and self.routes_acked is not None:
            old = self.routes_acked.types[type_url]
            lingering = old if old.version != typed.version else None
        names = self.types[type_url].names
        return self.desired.get(snapshot.epoch, typed, names, lingering)

    def _routes_wait(self, snapshot: Snapshot) -> float | None:
        """Seconds until routes may name every cluster of `snapshot`: None while Envoy has
        not ACKed clusters and endpoints for all of them; then the rest of the warm-up
        (first active health check) of clusters that the routes it runs do not name yet."""
        needed = snapshot.types[CLUSTER].names
        if not needed:
            return 0.0
        secrets = snapshot.types.get(SECRET)  # the clusters' TLS certificates, if any
        wanted = (
            (SECRET, secrets.names if secrets else None),
            (CLUSTER, needed),
            (ENDPOINT, needed),
        )
        for type_url, names in wanted:
            if not names:
                continue
            state = self.types.get(type_url)
            if state is None or state.pending or state.acked_names is None:
                return None
            if not names <= state.acked_names:
                return None
        if self.routes_acked is None:
            return 0.0  # Envoy's own start-up waits for clusters to warm
        running = self.routes_acked.types[CLUSTER].resources
        acked_at = self.types[ENDPOINT].acked_at
        timeouts = snapshot.health_check_timeouts
        now = self.clock()
        return max(
            [
                acked_at[n] + timeouts[n] + WARMUP_MARGIN - now
                for n in needed
                if n not in running and n in timeouts
            ],
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
        resources: int,
    ) -> None:
        state.sent_version, state.sent_names, state.sent_snapshot = version, names, snapshot
        self.callbacks.on_sent(self.node, type_url, version, resources)

    def responses(self) -> Outgoing:
        """The responses due now, in make-before-break order. A type with a response in
        flight waits for its ACK or NACK; the next change then goes out as one response."""
        snapshot = self.target
        if snapshot is None:
            return Outgoing([])
        out = []
        wake_after = None
        for type_url in PUSH_ORDER:
            state = self.types.get(type_url)
            if state is None or state.pending or type_url not in snapshot.types:
                continue
            if type_url == ROUTE:
                wait = self._routes_wait(snapshot)
                if wait is None or wait > 0:
                    wake_after = wait
                    continue
            response = self._respond(type_url, state, self._desired(type_url, snapshot), snapshot)
            if response is not None:
                out.append(response)
        return Outgoing(out, wake_after)

    def _respond(
        self, type_url: str, state: TypeState, want: Desired, snapshot: Snapshot
    ) -> bytes | None:
        raise NotImplementedError


class SotwStream(Stream):
    mode = "sotw"

    def handle_request(self, req: DiscoveryRequest) -> None:
        state = self.types.setdefault(req.type_url, TypeState())
        if req.response_nonce and req.response_nonce != state.last_nonce:
            return  # stale: answers a response that a newer one replaced
        if req.response_nonce and state.pending:
            self._answer(req.type_url, state, nack_message(req))
        if req.type_url not in WILDCARD_TYPES:
            state.names = frozenset(map(sys.intern, req.resource_names))

    def _respond(
        self, type_url: str, state: TypeState, want: Desired, snapshot: Snapshot
    ) -> bytes | None:
        names = want.names
        if state.sent_version == want.version and state.sent_names == names and not state.force:
            return None
        state.force = False
        nonce = self._next_nonce(state)
        self._sent(type_url, state, want.version, names, snapshot, len(names))
        if type_url == CLUSTER and ENDPOINT in self.types:
            self.types[ENDPOINT].force = True
        return want.sotw_response(type_url, nonce)


class DeltaStream(Stream):
    mode = "delta"

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
        subscribe = set(map(sys.intern, req.resource_names_subscribe))
        unsubscribe = req.resource_names_unsubscribe
        if WILDCARD in subscribe:
            state.names = None
            subscribe.discard(WILDCARD)
        if state.names is not None and (subscribe or unsubscribe):
            state.names = (state.names | subscribe) - set(unsubscribe)
        for name in unsubscribe:
            state.known.pop(name, None)
        for name in subscribe - set(req.initial_resource_versions):
            state.known.pop(name, None)  # a (re)subscription gets the resource sent
        if subscribe or unsubscribe or not req.response_nonce:
            state.synced = None

    def _respond(
        self, type_url: str, state: TypeState, want: Desired, snapshot: Snapshot
    ) -> bytes | None:
        if state.synced == want.version:  # nothing changed since `known` matched it
            return None
        changed = {n: vb for n, vb in want.resources.items() if state.known.get(n) != vb[0]}
        removed = tuple(
            sorted(
                n
                for n in state.known
                if n not in want.resources and (state.names is None or n in state.names)
            )
        )
        state.synced = want.version
        if not changed and not removed:
            return None
        for name, (version, _) in changed.items():
            state.known[name] = version
        for name in removed:
            del state.known[name]
        if type_url == CLUSTER and ENDPOINT in self.types:
            for name in changed:  # re-warming clusters need their endpoints again
                self.types[ENDPOINT].known.pop(name, None)
            self.types[ENDPOINT].synced = None
        nonce = self._next_nonce(state)
        self._sent(type_url, state, want.version, frozenset(state.known), snapshot, len(changed))
        return want.delta_response(type_url, frozenset(changed), removed, nonce)
