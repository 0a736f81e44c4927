"""Per-stream xDS state machines: state of the world (SotW) and incremental (Delta).

A stream is pure protocol state: the server hands it requests and the snapshot it should
converge to (`target`), and asks it for the responses due now (`responses()`). It reads
time only from its injected clock, and reports what happens through `Callbacks`.

Both variants share the rules that keep Envoy serving (Envoy's xds_protocol docs):
- ACK / NACK: a request answering the last response of its type; a NACK carries
  `error_detail`. It is reported with Envoy's message and the rejected content is not
  resent; the next change is.
- Stale nonces: a request answering an older response is not an ACK or NACK, but its
  subscription changes apply (a name Envoy dropped and subscribed to again meanwhile is
  sent again).
- Make-before-break: responses go out in SDS, CDS, EDS, LDS, SRDS, RDS order, one in
  flight per type. Each route configuration waits on its own (one model's new cluster
  holds only that model's routes) until Envoy has ACKed the secrets (the clusters' TLS
  certificates, if any), and clusters and endpoints for every cluster it names (Envoy
  ACKs CDS once new clusters are warm, which needs their EDS and secrets, so EDS and
  SDS never wait for the CDS ACK), then for the first health check of those clusters
  (their timeout plus WARMUP_MARGIN after the first endpoints ACKed since CDS added
  them). Clusters that routes Envoy holds still name stay in CDS until Envoy ACKs
  routes without them; the endpoints of clusters that a CDS response in flight adds stay
  in EDS until Envoy ACKs it (it warms them, even if the target dropped them meanwhile).
- RDS sends only the route configurations that changed, in SotW too (allowed for RDS:
  Envoy keeps those a response does not mention), so a one-model edit sends one.
- After a CDS push, EDS is resent (SotW: all; Delta: the changed clusters), so that
  re-warming clusters get their endpoints.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, KeysView
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
    SCOPED_ROUTE,
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
WARM = float("-inf")  # the ACK time of endpoints of a cluster known to be warm

Clock = Callable[[], float]  # monotonic seconds


def _shared(names: KeysView[str], like: frozenset[str]) -> frozenset[str]:
    """`names` as a frozenset: `like` itself when equal (shared by the streams that hold
    the same names, instead of one copy per stream)."""
    return like if names == like else frozenset(names)


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
    _delta_bodies: dict[tuple[frozenset[str], tuple[str, ...], str], bytes] = field(
        default_factory=dict, init=False
    )
    _partial_bodies: dict[tuple[frozenset[str], str], bytes] = field(
        default_factory=dict, init=False
    )

    _changes: dict[tuple[str, frozenset[str]], dict[str, tuple[str, bytes]]] = field(
        default_factory=dict, init=False
    )

    def __post_init__(self) -> None:
        self.names = frozenset(self.resources)

    def changed_from(self, old: Desired) -> dict[str, tuple[str, bytes]]:
        """The resources whose version is not the one in `old`: what a stream holding `old`
        lacks (computed once for all the streams that move from `old` to this)."""
        key = (old.version, old.names)
        changes = self._changes.get(key)
        if changes is None:
            before = old.resources
            changes = self._changes[key] = {
                n: vb for n, vb in self.resources.items() if before.get(n, ("",))[0] != vb[0]
            }
        return changes

    def sotw_response(self, type_url: str, nonce: str) -> bytes:
        """The DiscoveryResponse; all but the nonce is encoded once and shared by streams."""
        if self._sotw_body is None:
            blobs = [blob for _, blob in self.resources.values()]
            self._sotw_body = encode_sotw_body(self.version, blobs, type_url)
        return with_nonce(self._sotw_body, nonce)

    def sotw_partial_response(
        self, type_url: str, changed: frozenset[str], version: str, nonce: str
    ) -> bytes:
        """A DiscoveryResponse with only the `changed` resources (RDS: Envoy keeps the
        others); encoded once for all streams that need the same change."""
        key = (changed, version)
        body = self._partial_bodies.get(key)
        if body is None:
            blobs = [self.resources[n][1] for n in sorted(changed)]
            body = self._partial_bodies[key] = encode_sotw_body(version, blobs, type_url)
        return with_nonce(body, nonce)

    def delta_response(
        self,
        type_url: str,
        changed: frozenset[str],
        removed: tuple[str, ...],
        nonce: str,
        version: str | None = None,
    ) -> bytes:
        """The DeltaDiscoveryResponse sending `changed` and removing `removed`; encoded once
        for all streams that need the same change (e.g. every Envoy on a weight edit)."""
        version = version or self.version
        key = (changed, removed, version)
        body = self._delta_bodies.get(key)
        if body is None:
            sent = {n: vb for n, vb in self.resources.items() if n in changed}
            body = self._delta_bodies[key] = encode_delta_body(
                version, sent, list(removed), type_url
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
            version = content_version(epoch, {n: v for n, (v, _) in available.items()})
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
        self._names: dict[frozenset[str], frozenset[str]] = {}

    def shared(self, names: frozenset[str]) -> frozenset[str]:
        """One object per set of subscribed names, so that streams subscribed alike find
        their entries by identity (comparing two sets of 1,000 names is not free)."""
        if len(self._names) > 256:  # sets no stream may hold any more
            self._names.clear()
        return self._names.setdefault(names, names)

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


@dataclass(slots=True)
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
    acked_version: str | None = None
    sent_seq: int = 0  # the nonce number of the last response
    acked_at: dict[str, float] = field(default_factory=dict)  # EDS: name -> first ACKed
    # Delta, and RDS in SotW: name -> version Envoy has
    known: dict[str, str] = field(default_factory=dict)
    synced: Desired | None = None  # `known` holds all of this (no diff needed)
    # RDS: the route configurations of the last response, and per held-back one that
    # Envoy holds, where its version came from
    sent_changed: frozenset[str] = frozenset()
    sent_held: dict[str, Snapshot] = field(default_factory=dict)


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
        # Where the routes Envoy holds come from: the snapshot of the last RDS it ACKed,
        # except the route configurations held back since, by name.
        self.routes_acked: Snapshot | None = None
        self.routes_held: dict[str, Snapshot] = {}
        # Clusters by name: the nonce number of the CDS response that added them; their
        # warm-up counts from the first EDS response after it.
        self.clusters_added: dict[str, int] = {}
        self._lingering_memo: tuple[tuple, TypeSnapshot | None] | None = None
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
        state.acked_version = version
        if type_url == ENDPOINT:  # the warm-up of new clusters counts from here
            now, added, seq = self.clock(), self.clusters_added, state.sent_seq
            state.acked_at = {
                n: state.acked_at.get(n, now)
                for n in state.sent_names
                if added.get(n, 0) < seq  # sent after CDS added the cluster
            }
            state.acked_names = _shared(state.acked_at.keys(), state.sent_names)
        else:
            state.acked_names = state.sent_names
        if type_url == ROUTE:
            self.routes_acked = state.sent_snapshot
            self.routes_held = state.sent_held
            self._warm(state)
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
        clusters and endpoints, those that the routes Envoy holds still name."""
        typed = snapshot.types[type_url]
        lingering = None
        if type_url in (CLUSTER, ENDPOINT):
            lingering = self._lingering(type_url, typed, snapshot.epoch)
        names = self.types[type_url].names
        return self.desired.get(snapshot.epoch, typed, names, lingering)

    def _routes_other_than_acked(self) -> dict[str, Snapshot]:
        """Route configurations Envoy holds, or is about to, from another snapshot than the
        last one it ACKed: those held back since, and those of an RDS response in flight
        (Envoy may apply it before a CDS response sent meanwhile)."""
        sources = dict(self.routes_held)
        routes = self.types.get(ROUTE)
        if routes is not None and routes.pending and routes.sent_snapshot is not None:
            sources.update(dict.fromkeys(routes.sent_changed, routes.sent_snapshot))
        return sources

    def _clusters_in_flight(self, typed: TypeSnapshot) -> tuple[Snapshot, frozenset[str]] | None:
        """The snapshot and the names, of those not in `typed`, of the clusters a CDS
        response not ACKed yet holds: Envoy warms them, and each waits for its endpoints
        (else for Envoy's 15 s initial fetch timeout, and every later CDS with it)."""
        clusters = self.types.get(CLUSTER)
        if clusters is None or not clusters.pending or clusters.sent_snapshot is None:
            return None
        missing = clusters.sent_names - typed.resources.keys()
        return (clusters.sent_snapshot, missing) if missing else None

    def _lingering(self, type_url: str, typed: TypeSnapshot, epoch: str) -> TypeSnapshot | None:
        """Clusters or endpoints of the routes Envoy holds: those of the last RDS it ACKed,
        and of the route configurations held back or in flight since; for endpoints, also
        those of the clusters a CDS response in flight adds (computed once per change)."""
        acked = self.routes_acked
        others = self._routes_other_than_acked()
        warming = self._clusters_in_flight(typed) if type_url == ENDPOINT else None
        old = acked.types[type_url] if acked is not None else None
        if not others and warming is None:
            return old if old is not None and old.version != typed.version else None
        key = (type_url, old, tuple(others.items()), warming)
        if self._lingering_memo is not None and self._lingering_memo[0] == key:
            return self._lingering_memo[1]
        resources = dict(old.resources) if old is not None else {}
        versions = dict(old.versions) if old is not None else {}
        sources = [(s.types[type_url], s.route_clusters.get(n, ())) for n, s in others.items()]
        if warming is not None:
            sources.append((warming[0].types[ENDPOINT], warming[1]))
        for held, clusters in sources:
            for cluster in clusters:
                if cluster in held.resources and cluster not in resources:
                    resources[cluster] = held.resources[cluster]
                    versions[cluster] = held.versions[cluster]
        merged = TypeSnapshot(content_version(epoch, versions), resources, versions)
        self._lingering_memo = (key, merged)
        return merged

    def _route_wait(self, snapshot: Snapshot, name: str) -> float | None:
        """Seconds until route configuration `name` of `snapshot` may go out: None while
        Envoy has not ACKed clusters and endpoints for all clusters it names, or a response
        in flight removes one; then the rest of their warm-up (first active health check)."""
        needed = snapshot.route_clusters.get(name)
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
            if state is None or state.acked_names is None or not names <= state.acked_names:
                return None
            if state.pending and not names <= state.sent_names:
                return None  # the response in flight removes one: Envoy is about to drop it
        if self.routes_acked is None:
            return 0.0  # Envoy's own start-up waits for clusters to warm
        acked_at = self.types[ENDPOINT].acked_at
        timeouts = snapshot.health_check_timeouts
        now = self.clock()
        return max(
            [acked_at[n] + timeouts[n] + WARMUP_MARGIN - now for n in needed if n in timeouts],
            default=0.0,
        )

    def _next_nonce(self, state: TypeState) -> str:
        self.nonce += 1
        state.last_nonce = str(self.nonce)
        state.sent_seq = self.nonce
        state.pending = True
        return state.last_nonce

    def _clusters_added(self, names) -> None:
        """Record clusters that the response about to go out adds to Envoy: their
        endpoints count only once sent again, and their warm-up starts then."""
        endpoints = self.types.get(ENDPOINT)
        for name in names:
            self.clusters_added[name] = self.nonce + 1
            if endpoints is not None and endpoints.acked_at.pop(name, None) is not None:
                endpoints.acked_names = (endpoints.acked_names or frozenset()) - {name}

    def _warm(self, routes: TypeState) -> None:
        """Clusters that ACKed routes name are warm: later routes naming them never wait."""
        endpoints, snapshot = self.types.get(ENDPOINT), routes.sent_snapshot
        if endpoints is None or snapshot is None:
            return
        for name in routes.sent_changed:
            for cluster in snapshot.route_clusters.get(name, ()):
                if cluster in endpoints.acked_at:
                    endpoints.acked_at[cluster] = WARM

    def _scopes_acked(self, snapshot: Snapshot) -> bool:
        """Envoy ACKed the snapshot's scopes (or does not use them): a removed model's scope
        is gone, so nothing routes to its clusters any more."""
        scopes = self.types.get(SCOPED_ROUTE)
        if scopes is None or SCOPED_ROUTE not in snapshot.types:
            return True
        return not scopes.pending and scopes.acked_version == snapshot.types[SCOPED_ROUTE].version

    def _route_changes(
        self, state: TypeState, want: Desired, snapshot: Snapshot
    ) -> tuple[dict[str, tuple[str, bytes]], str, float | None]:
        """The route configurations to send now (changed, and their clusters ready), the
        version of the response, and when to look again for those held back."""
        changed, wake_after = {}, None
        held: dict[str, Snapshot | None] = {}
        candidates = want.resources if state.synced is None else want.changed_from(state.synced)
        for name, vb in candidates.items():
            if state.known.get(name) == vb[0]:
                continue
            wait = self._route_wait(snapshot, name)
            if wait is not None and wait <= 0:
                changed[name] = vb
                continue
            if wait is not None:
                wake_after = wait if wake_after is None else min(wake_after, wait)
            held[name] = self.routes_held.get(name, self.routes_acked)
        # What Envoy keeps running instead of the held-back ones (the clusters they name
        # linger): those it has.
        state.sent_held = {n: s for n, s in held.items() if s is not None and n in state.known}
        return changed, (f"{want.version}-partial" if held else want.version), wake_after

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
        routes_acked = self.routes_acked
        for type_url in PUSH_ORDER:
            state = self.types.get(type_url)
            if state is None or state.pending or type_url not in snapshot.types:
                continue
            want = self._desired(type_url, snapshot)
            if type_url == ROUTE:
                response, wake_after = self._respond_routes(state, want, snapshot)
            else:
                response = self._respond(type_url, state, want, snapshot)
            if response is not None:
                out.append(response)
        if self.routes_acked is not routes_acked:  # lingering clusters may go now
            more = self.responses()
            return Outgoing(out + more.responses, more.wake_after)
        return Outgoing(out, wake_after)

    def _respond_routes(
        self, state: TypeState, want: Desired, snapshot: Snapshot
    ) -> tuple[bytes | None, float | None]:
        """RDS, both variants: the changed route configurations whose clusters are ready
        (Delta removes unsubscribed ones itself: Envoy dropped them)."""
        if state.synced is not None and state.synced.version == want.version:
            # nothing changed since `known` matched it
            return None, None
        changed, version, wake_after = self._route_changes(state, want, snapshot)
        if not changed:
            first = self._route_to_resend(state, want, snapshot, version)
            if first is None:
                return None, wake_after
            changed = {first: want.resources[first]}
        # A partial send leaves the state `known` fully held (the next diff is a full one).
        state.synced = want if version == want.version else None
        for name, (res_version, _) in changed.items():
            state.known[name] = res_version
        state.sent_changed = frozenset(changed)
        nonce = self._next_nonce(state)
        self._sent(
            ROUTE, state, version, _shared(state.known.keys(), want.names), snapshot, len(changed)
        )
        return self._routes_response(want, frozenset(changed), version, nonce), wake_after

    def _route_to_resend(
        self, state: TypeState, want: Desired, snapshot: Snapshot, version: str
    ) -> str | None:
        """No route configuration changed that may go now: the one to send again, as it
        is, when Envoy must hear `version` (so that `/status` tells the truth), else None."""
        if version != want.version:  # all that changed is held back
            if state.sent_version != want.version:
                return None
            # Envoy ACKed this version, then subscribed to more (a model's scope came back)
            # that wait: the partial version tells it (and `/status`) it is not there yet.
            held = (n for n, vb in want.resources.items() if state.known.get(n) == vb[0])
            return next(held, None)
        if not self._scopes_acked(snapshot):
            return None
        # Envoy holds exactly these routes (e.g. a model's went with its scope, or an edit
        # undid one that was held back): clusters only older routes named may go.
        if self.routes_acked is not None:
            self.routes_acked, self.routes_held = snapshot, {}
        if state.sent_version == want.version or not want.resources:
            state.synced = want
            return None
        # It last heard an older version: this one tells it (Envoy keeps the others).
        return next(iter(want.resources))

    def _routes_response(
        self, want: Desired, changed: frozenset[str], version: str, nonce: str
    ) -> bytes:
        raise NotImplementedError

    def _respond(
        self, type_url: str, state: TypeState, want: Desired, snapshot: Snapshot
    ) -> bytes | None:
        raise NotImplementedError


class SotwStream(Stream):
    mode = "sotw"

    def handle_request(self, req: DiscoveryRequest) -> None:
        state = self.types.setdefault(req.type_url, TypeState())
        # A stale nonce answers a response that a newer one replaced: no ACK or NACK, but
        # its names count (Envoy may drop a name and subscribe to it again meanwhile).
        if req.response_nonce and req.response_nonce == state.last_nonce and state.pending:
            self._answer(req.type_url, state, nack_message(req))
        if req.type_url not in WILDCARD_TYPES:
            listed, held = req.resource_names, state.names
            if held is not None and len(listed) == len(held) and held.issuperset(listed):
                return  # the same names again (every ACK lists them; each name once)
            names = self.desired.shared(frozenset(map(sys.intern, listed)))
            if names != state.names:
                # Envoy drops what it unsubscribes: a name subscribed again is sent again.
                state.known = {n: v for n, v in state.known.items() if n in names}
                state.synced = None
            state.names = names

    def _routes_response(
        self, want: Desired, changed: frozenset[str], version: str, nonce: str
    ) -> bytes:
        return want.sotw_partial_response(ROUTE, changed, version, nonce)

    def _respond(
        self, type_url: str, state: TypeState, want: Desired, snapshot: Snapshot
    ) -> bytes | None:
        names = want.names
        same_names = state.sent_names is names or state.sent_names == names  # `is`: O(1)
        if state.sent_version == want.version and same_names and not state.force:
            return None
        state.force = False
        if type_url == CLUSTER:
            self._clusters_added(names - state.sent_names)
            if ENDPOINT in self.types:
                self.types[ENDPOINT].force = True
        nonce = self._next_nonce(state)
        self._sent(type_url, state, want.version, names, snapshot, len(names))
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
            state.names = self.desired.shared((state.names | subscribe) - set(unsubscribe))
        for name in unsubscribe:
            state.known.pop(name, None)
        for name in subscribe - set(req.initial_resource_versions):
            state.known.pop(name, None)  # a (re)subscription gets the resource sent
        if subscribe or unsubscribe or not req.response_nonce:
            state.synced = None

    def _respond(
        self, type_url: str, state: TypeState, want: Desired, snapshot: Snapshot
    ) -> bytes | None:
        if state.synced is not None and state.synced.version == want.version:
            # nothing changed since `known` matched it
            return None
        changed = {n: vb for n, vb in want.resources.items() if state.known.get(n) != vb[0]}
        removed = tuple(
            sorted(
                n
                for n in state.known
                if n not in want.resources and (state.names is None or n in state.names)
            )
        )
        state.synced = want
        if not changed and not removed:
            return None
        for name in removed:
            del state.known[name]
        if type_url == CLUSTER:
            self._clusters_added(n for n in changed if n not in state.known)
            if ENDPOINT in self.types:
                for name in changed:  # re-warming clusters need their endpoints again
                    self.types[ENDPOINT].known.pop(name, None)
                self.types[ENDPOINT].synced = None
        for name, (version, _) in changed.items():
            state.known[name] = version
        nonce = self._next_nonce(state)
        held = _shared(state.known.keys(), want.names)
        self._sent(type_url, state, want.version, held, snapshot, len(changed))
        return want.delta_response(type_url, frozenset(changed), removed, nonce)

    def _routes_response(
        self, want: Desired, changed: frozenset[str], version: str, nonce: str
    ) -> bytes:
        return want.delta_response(ROUTE, changed, (), nonce, version)
