"""The xDS stream state machines driven directly: no sockets, no sleeps, a fake clock.

A `Peer` plays Envoy's side of one ADS stream (SotW or Delta) and decodes what the
stream sends; `Recorder` is the stream's callbacks. The node registry (the callbacks
that `/status` reads) and per-node listener variants are tested here too.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.base_pb2 import Node
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.config.route.v3.scoped_route_pb2 import ScopedRouteConfiguration
from envoy.extensions.transport_sockets.tls.v3.secret_pb2 import Secret
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)
from google.protobuf.any_pb2 import Any

from control_plane import streams
from control_plane.callbacks import LISTEN_METADATA, NodeInfo
from control_plane.config import Endpoint, parse
from control_plane.nodes import FORGET_AFTER, NodeRegistry
from control_plane.snapshot import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    SCOPED_ROUTE,
    SECRET,
    SHORT_NAMES,
    Snapshot,
    SnapshotCache,
    build_snapshot,
)
from control_plane.streams import WARMUP_MARGIN, DeltaStream, DesiredCache, SotwStream
from control_plane.translate import LISTENER_NAME, translate
from tests.fake_clock import FakeClock
from tests.test_config import BASE as TWO_VERSIONS

EPOCH = "e1"
NO_CHECKS = TWO_VERSIONS + "    resilience: {health_check: false}\n"
MODES = pytest.mark.parametrize("mode", ["sotw", "delta"])
MESSAGES = {
    CLUSTER: (Cluster, "name"),
    ENDPOINT: (ClusterLoadAssignment, "cluster_name"),
    LISTENER: (Listener, "name"),
    SCOPED_ROUTE: (ScopedRouteConfiguration, "name"),
    ROUTE: (RouteConfiguration, "name"),
    SECRET: (Secret, "name"),
}


def snap(text: str, epoch: str = EPOCH) -> Snapshot:
    return build_snapshot(translate(parse(text)), epoch)


def with_v3(text: str) -> str:
    """A third version taking traffic."""
    return text.replace("      v2:", "      v3: {endpoints: [127.0.0.1:9003]}\n      v2:").replace(
        "v2: 10}", "v2: 5, v3: 5}"
    )


def without_v2(text: str) -> str:
    return text.replace("      v2: {endpoints: [127.0.0.1:9002]}\n", "").replace(
        "{v1: 90, v2: 10}", "{v1: 100}"
    )


def weights(text: str, v1: int, v2: int) -> str:
    return text.replace("90, v2: 10", f"{v1}, v2: {v2}")


def route_configs(scopes: Sent) -> set[str]:
    """The route configurations that the scopes name (scope `models/m` names `models/m`,
    the gateway's scopes name `gateway`)."""
    return {"gateway" if n.startswith("gateway/") else n for n in scopes.names}


class Recorder:
    """The stream's callbacks, as a list of events."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_connect(self, node: NodeInfo, mode: str) -> None:
        self.events.append(("connect", node.id, mode))

    def on_disconnect(self, node: NodeInfo) -> None:
        self.events.append(("disconnect", node.id))

    def on_sent(self, node: NodeInfo, type_url: str, version: str, resources: int) -> None:
        self.events.append(("sent", SHORT_NAMES[type_url], version))

    def on_ack(self, node: NodeInfo, type_url: str, version: str) -> None:
        self.events.append(("ack", SHORT_NAMES[type_url], version))

    def on_nack(self, node: NodeInfo, type_url: str, version: str, message: str) -> None:
        self.events.append(("nack", SHORT_NAMES[type_url], version, message))


@dataclass
class Sent:
    """One decoded response: its type (cds, eds, lds, rds), resource names, removals."""

    type: str
    names: set[str]
    removed: set[str]
    version: str


class Peer:
    """Envoy's side of one stream: sends requests as Envoy does, decodes the responses."""

    def __init__(self, mode: str, snapshot: Snapshot, clock: FakeClock | None = None) -> None:
        self.delta = mode == "delta"
        self.clock = clock or FakeClock()
        self.callbacks = Recorder()
        stream_class = DeltaStream if self.delta else SotwStream
        self.stream = stream_class(NodeInfo("envoy-1"), self.callbacks, self.clock)
        self.stream.target = snapshot
        self.stream.open()
        self.names: dict[str, list[str]] = {}
        self.nonces: dict[str, str] = {}  # of the last response per type
        self.wake_after: float | None = None

    def request(
        self,
        type_url: str,
        names: list[str] | None = None,
        nonce: str | None = None,
        error: str | None = None,
        initial: dict[str, str] | None = None,
    ) -> None:
        """Subscribe to `names` (None: as before), answering the response with `nonce`
        (default: the last one of this type)."""
        nonce = self.nonces.get(type_url, "") if nonce is None else nonce
        before = set(self.names.get(type_url, ()))
        if names is not None:
            self.names[type_url] = names
        if self.delta:
            req = DeltaDiscoveryRequest(
                type_url=type_url, response_nonce=nonce, initial_resource_versions=initial or {}
            )
            if names is not None:
                req.resource_names_subscribe.extend(sorted(set(names) - before))
                req.resource_names_unsubscribe.extend(sorted(before - set(names)))
        else:
            req = DiscoveryRequest(
                type_url=type_url, resource_names=self.names.get(type_url, []), response_nonce=nonce
            )
        if error:
            req.error_detail.code, req.error_detail.message = 3, error
        self.stream.handle_request(req)

    def ack(self, type_url: str) -> None:
        self.request(type_url)

    def nack(self, type_url: str, message: str) -> None:
        self.request(type_url, error=message)

    def pump(self) -> list[Sent]:
        """The responses due now, decoded."""
        out = self.stream.responses()
        self.wake_after = out.wake_after
        sent = []
        for blob in out.responses:
            if self.delta:
                resp = DeltaDiscoveryResponse.FromString(blob)
                names = {r.name for r in resp.resources}
                removed = set(resp.removed_resources)
                version = resp.system_version_info
            else:
                resp = DiscoveryResponse.FromString(blob)
                message, attribute = MESSAGES[resp.type_url]
                names = {getattr(message.FromString(a.value), attribute) for a in resp.resources}
                removed, version = set(), resp.version_info
            self.nonces[resp.type_url] = resp.nonce
            sent.append(Sent(SHORT_NAMES[resp.type_url], names, removed, version))
        return sent

    def types(self) -> list[str]:
        return [s.type for s in self.pump()]

    def retarget(self, text: str) -> None:
        self.stream.target = snap(text)

    def converge(self) -> dict[str, Sent]:
        """The initial handshake in Envoy's order; returns the response per type."""
        last = {}
        self.request(CLUSTER)
        (last["cds"],) = self.pump()
        self.request(ENDPOINT, sorted(last["cds"].names))
        (last["eds"],) = self.pump()
        self.ack(ENDPOINT)
        self.ack(CLUSTER)  # Envoy ACKs clusters once they are warm
        self.request(LISTENER)
        (last["lds"],) = self.pump()
        self.ack(LISTENER)
        self.request(SCOPED_ROUTE)
        (last["srds"],) = self.pump()
        self.ack(SCOPED_ROUTE)
        self.request(ROUTE, sorted(route_configs(last["srds"])))
        (last["rds"],) = self.pump()
        self.ack(ROUTE)
        assert self.pump() == []
        return last

    def add_v3_and_subscribe(self, text: str) -> list[str]:
        """Retarget to a config with v3; ask for its endpoints; ACK them. Returns the types
        sent right after the retarget."""
        self.retarget(with_v3(text))
        first = self.types()
        assert first[0] == "cds"
        self.request(ENDPOINT, ["iris/v1", "iris/v2", "iris/v3"])
        (eds,) = self.pump()
        assert eds.type == "eds" and "iris/v3" in eds.names
        self.ack(ENDPOINT)
        return first


# --- the rules -------------------------------------------------------------------------


@MODES
def test_handshake_sends_each_type_once_and_reports_every_event(mode):
    peer = Peer(mode, snap(TWO_VERSIONS))
    last = peer.converge()
    assert last["cds"].names == last["eds"].names == {"iris/v1", "iris/v2"}
    assert last["srds"].names == {
        "gateway/live",
        "gateway/ready",
        "gateway/metadata",
        "models/iris",
    }
    assert last["rds"].names == {"gateway", "models/iris"}
    peer.stream.close()
    events = peer.callbacks.events
    assert events[0] == ("connect", "envoy-1", mode) and events[-1] == ("disconnect", "envoy-1")
    assert [e[:2] for e in events[1:-1]] == [
        ("sent", "cds"),
        ("sent", "eds"),
        ("ack", "eds"),
        ("ack", "cds"),
        ("sent", "lds"),
        ("ack", "lds"),
        ("sent", "srds"),
        ("ack", "srds"),
        ("sent", "rds"),
        ("ack", "rds"),
    ]
    assert all(e[2].startswith(EPOCH + "-") for e in events[1:-1])


@MODES
def test_nack_is_reported_and_not_resent_until_the_next_change(mode):
    peer = Peer(mode, snap(TWO_VERSIONS))
    peer.converge()
    peer.retarget(weights(TWO_VERSIONS, 50, 50))
    (rejected,) = peer.pump()
    assert rejected.type == "rds"
    peer.nack(ROUTE, "weights rejected for test")
    assert peer.callbacks.events[-1] == (
        "nack",
        "rds",
        rejected.version,
        "weights rejected for test",
    )
    assert peer.pump() == [] and peer.pump() == []  # never resent in a loop
    peer.retarget(weights(TWO_VERSIONS, 40, 60))
    (fixed,) = peer.pump()
    assert fixed.type == "rds" and fixed.version != rejected.version
    peer.ack(ROUTE)
    assert peer.callbacks.events[-1] == ("ack", "rds", fixed.version)


def test_sotw_a_stale_request_is_no_ack_but_its_names_count():
    """Envoy dropped a route configuration (its scope went) and subscribed to it again
    while a newer response was in flight: it needs it sent again."""
    peer = Peer("sotw", snap(TWO_MODELS))
    peer.converge()
    stale = peer.nonces[ROUTE]
    peer.retarget(weights(TWO_MODELS, 50, 50))
    (rds,) = peer.pump()
    assert rds.names == {"models/iris"}
    events = len(peer.callbacks.events)
    peer.request(ROUTE, ["gateway", "models/iris"], nonce=stale)
    peer.request(ROUTE, ["gateway", "models/iris", "models/other"], nonce=stale)
    assert peer.pump() == [] and len(peer.callbacks.events) == events  # no ACK, no answer
    peer.ack(ROUTE)
    (rds,) = peer.pump()
    assert rds.names == {"models/other"}


def test_delta_applies_subscriptions_even_with_a_stale_nonce():
    peer = Peer("delta", snap(TWO_VERSIONS))
    peer.converge()
    peer.retarget(weights(TWO_VERSIONS, 50, 50))
    (rds,) = peer.pump()
    stale = peer.nonces[CLUSTER]
    peer.request(ENDPOINT, ["iris/v1"], nonce=stale)
    peer.request(ENDPOINT, ["iris/v1", "iris/v2"], nonce=stale)  # a resubscription
    sent = peer.pump()
    assert [(s.type, s.names) for s in sent] == [("eds", {"iris/v2"})]
    assert not any(e[0] in ("ack", "nack") and e[1] == "eds" for e in peer.callbacks.events[9:])


@MODES
def test_one_response_in_flight_per_type_and_changes_coalesce(mode):
    peer = Peer(mode, snap(TWO_VERSIONS))
    peer.converge()
    peer.retarget(weights(TWO_VERSIONS, 70, 30))
    assert peer.types() == ["rds"]  # a weight change: routes alone
    peer.retarget(weights(TWO_VERSIONS, 60, 40))
    peer.retarget(weights(TWO_VERSIONS, 50, 50))
    assert peer.pump() == []  # the first is not answered yet
    peer.ack(ROUTE)
    (rds,) = peer.pump()
    assert rds.version == snap(weights(TWO_VERSIONS, 50, 50)).types[ROUTE].version


@MODES
def test_endpoint_change_pushes_endpoints_alone(mode):
    peer = Peer(mode, snap(TWO_VERSIONS))
    peer.converge()
    peer.retarget(TWO_VERSIONS.replace("9002", "9012"))
    (eds,) = peer.pump()
    assert eds.type == "eds"
    assert eds.names == ({"iris/v2"} if mode == "delta" else {"iris/v1", "iris/v2"})


@MODES
def test_routes_wait_until_envoy_acked_the_new_clusters_and_endpoints(mode):
    """Make-before-break alone: without health checks nothing else delays the routes."""
    peer = Peer(mode, snap(NO_CHECKS))
    peer.converge()
    first = peer.add_v3_and_subscribe(NO_CHECKS)
    # SotW resends all endpoints right behind CDS; Delta waits for the subscription.
    assert first == (["cds", "eds"] if mode == "sotw" else ["cds"])
    assert peer.pump() == [] and peer.wake_after is None  # CDS is not ACKed yet
    peer.ack(CLUSTER)
    (rds,) = peer.pump()
    assert rds.type == "rds"


@MODES
def test_routes_to_a_new_cluster_wait_for_its_first_health_check(mode):
    clock = FakeClock()
    peer = Peer(mode, snap(TWO_VERSIONS), clock)
    peer.converge()
    peer.add_v3_and_subscribe(TWO_VERSIONS)  # endpoints ACKed now
    peer.ack(CLUSTER)
    timeout = 1.0  # the default health-check timeout
    assert peer.pump() == [] and peer.wake_after == pytest.approx(timeout + WARMUP_MARGIN)
    clock.advance(timeout)
    assert peer.pump() == [] and peer.wake_after == pytest.approx(WARMUP_MARGIN)
    clock.advance(WARMUP_MARGIN)
    assert peer.types() == ["rds"] and peer.wake_after is None


@MODES
def test_removed_clusters_linger_until_envoy_acks_routes_without_them(mode):
    peer = Peer(mode, snap(TWO_VERSIONS))
    peer.converge()
    peer.retarget(without_v2(TWO_VERSIONS))
    assert peer.types() == ["rds"]  # clusters the running routes name stay
    peer.ack(ROUTE)
    cds, eds = peer.pump()
    if mode == "sotw":
        assert (cds.type, cds.names, eds.names) == ("cds", {"iris/v1"}, {"iris/v1"})
    else:
        assert (cds.type, cds.removed, eds.removed) == ("cds", {"iris/v2"}, {"iris/v2"})


@MODES
def test_clusters_of_routes_in_flight_linger_until_routes_without_them_are_acked(mode):
    """Routes naming v3 are sent, not ACKed yet, when v3 is removed again: Envoy may apply
    them before any CDS response sent meanwhile, so v3 must stay until routes without it
    are ACKed (a CI churn run answered 132 requests 503 NC without this)."""
    peer = Peer(mode, snap(NO_CHECKS))
    peer.converge()
    peer.add_v3_and_subscribe(NO_CHECKS)
    peer.ack(CLUSTER)
    (rds,) = peer.pump()  # routes naming v3, in flight
    assert rds.type == "rds"
    peer.retarget(NO_CHECKS)
    for sent in peer.pump():  # SotW: a CDS response names v3; Delta: none removes it
        assert "iris/v3" not in sent.removed
        assert mode == "delta" or sent.type != "cds" or "iris/v3" in sent.names
    peer.ack(ROUTE)
    (rds,) = peer.pump()  # routes without v3
    assert rds.type == "rds"
    peer.ack(ROUTE)
    cds, eds = peer.pump()
    if mode == "sotw":
        assert "iris/v3" not in cds.names and "iris/v3" not in eds.names
    else:
        assert "iris/v3" in cds.removed


@MODES
def test_lingering_clusters_keep_endpoints_that_arrived_after_their_routes(mode):
    """A replica that registered after the routes were ACKed stays on its cluster while that
    cluster lingers: removing the version must not empty it under the running routes."""
    peer = Peer(mode, snap(TWO_VERSIONS))
    peer.converge()
    more = TWO_VERSIONS.replace("[127.0.0.1:9002]", "[127.0.0.1:9002, 127.0.0.1:9012]")
    peer.retarget(more)
    assert peer.types() == ["eds"]  # the registration: endpoints only
    peer.ack(ENDPOINT)
    peer.retarget(
        more.replace("      v2: {endpoints: [127.0.0.1:9002, 127.0.0.1:9012]}\n", "").replace(
            "{v1: 90, v2: 10}", "{v1: 100}"
        )
    )
    assert peer.types() == ["rds"]  # v2's endpoints stay as Envoy has them


TWO_MODELS = (
    TWO_VERSIONS
    + "  other:\n    versions:\n      a: {endpoints: [127.0.0.1:9005]}\n"
    + "      b: {endpoints: [127.0.0.1:9006]}\n    traffic: {a: 50, b: 50}\n"
    + "    resilience: {health_check: false}\n"
)


def other_weights(text: str) -> str:
    return text.replace("{a: 50, b: 50}", "{a: 10, b: 90}")


@MODES
def test_a_model_waiting_for_its_new_cluster_holds_only_its_own_routes(mode):
    clock = FakeClock()
    peer = Peer(mode, snap(TWO_MODELS), clock)
    peer.converge()
    edited = other_weights(with_v3(TWO_MODELS))
    peer.retarget(edited)
    sent = peer.pump()
    assert [(s.type, s.names) for s in sent if s.type == "rds"] == [("rds", {"models/other"})]
    peer.ack(ROUTE)
    peer.request(ENDPOINT, [*peer.names[ENDPOINT], "iris/v3"])
    peer.pump()
    peer.ack(ENDPOINT)
    peer.ack(CLUSTER)
    assert peer.pump() == [] and peer.wake_after == pytest.approx(1.0 + WARMUP_MARGIN)
    clock.advance(1.0 + WARMUP_MARGIN)
    (rds,) = peer.pump()
    assert (rds.type, rds.names) == ("rds", {"models/iris"})
    assert rds.version == snap(edited).types[ROUTE].version


@MODES
def test_a_route_configuration_sent_while_others_wait_is_sent_again_when_it_reverts(mode):
    """Streams take their route diff from the last state they fully held; a partial send
    leaves that state, so a configuration edited and then edited back is sent again."""
    peer = Peer(mode, snap(TWO_MODELS), FakeClock())
    peer.converge()
    peer.retarget(other_weights(with_v3(TWO_MODELS)))  # iris waits for v3; other goes
    assert [s.names for s in peer.pump() if s.type == "rds"] == [{"models/other"}]
    peer.ack(ROUTE)
    peer.retarget(with_v3(TWO_MODELS))  # other back as it was before; iris still waits
    assert [s.names for s in peer.pump() if s.type == "rds"] == [{"models/other"}]


@MODES
def test_a_cluster_added_again_warms_from_the_endpoints_sent_after_it_came_back(mode):
    """Endpoints that went out before CDS added a cluster (again) do not start its warm-up:
    Envoy had removed the cluster and warms a new one."""
    clock = FakeClock()
    peer = Peer(mode, snap(TWO_VERSIONS), clock)
    peer.converge()
    moved = TWO_VERSIONS.replace("9001", "9011")
    peer.retarget(moved)
    assert peer.types() == ["eds"]  # in flight until the end
    peer.retarget(without_v2(moved))
    assert peer.types() == ["rds"]
    peer.ack(ROUTE)
    assert peer.types() == ["cds"]  # v2 removed
    peer.ack(CLUSTER)
    peer.retarget(moved)  # v2 comes back
    assert peer.types() == ["cds"]
    peer.ack(ENDPOINT)  # the old endpoints, v2's among them
    peer.ack(CLUSTER)
    sent = peer.types()
    assert "eds" in sent and "rds" not in sent
    peer.ack(ENDPOINT)
    assert peer.pump() == [] and peer.wake_after == pytest.approx(1.0 + WARMUP_MARGIN)


@MODES
def test_clusters_of_held_back_routes_linger_until_envoy_acks_their_new_routes(mode):
    clock = FakeClock()
    peer = Peer(mode, snap(TWO_MODELS), clock)
    peer.converge()
    # iris: v2 leaves and v3 (health-checked) comes; other: new weights.
    edited = other_weights(without_v2(with_v3(TWO_MODELS)).replace("v2: 5, ", ""))
    assert "iris/v2" not in snap(edited).types[CLUSTER].resources
    peer.retarget(edited)
    sent = {s.type: s for s in peer.pump()}
    assert sent["rds"].names == {"models/other"} and "iris/v3" in sent["cds"].names
    peer.ack(ROUTE)
    peer.request(ENDPOINT, ["iris/v1", "iris/v2", "iris/v3", "other/a", "other/b"])
    peer.pump()
    peer.ack(ENDPOINT)
    peer.ack(CLUSTER)
    assert peer.pump() == []  # iris's running routes still name v2: it stays
    clock.advance(1.0 + WARMUP_MARGIN)
    (rds,) = peer.pump()
    assert rds.names == {"models/iris"}
    peer.ack(ROUTE)
    cds = next(s for s in peer.pump() if s.type == "cds")
    assert "iris/v2" in cds.removed if mode == "delta" else "iris/v2" not in cds.names


@MODES
def test_a_removed_models_clusters_go_once_envoy_dropped_its_scope(mode):
    peer = Peer(mode, snap(TWO_MODELS))
    peer.converge()
    peer.retarget(TWO_VERSIONS)  # `other` is removed
    assert peer.types() == ["srds"]  # its clusters stay while its scope may route to them
    peer.ack(SCOPED_ROUTE)
    sent = {s.type: s for s in peer.pump()}
    assert len(sent["rds"].names) == 1  # the routes' new version: one sent again as it is
    cds, eds = sent["cds"], sent["eds"]
    if mode == "sotw":
        assert cds.names == eds.names == {"iris/v1", "iris/v2"}
    else:
        assert cds.removed == eds.removed == {"other/a", "other/b"}


def test_sotw_sends_only_changed_route_configurations_and_again_when_resubscribed():
    peer = Peer("sotw", snap(TWO_MODELS))
    peer.converge()
    peer.retarget(other_weights(TWO_MODELS))
    (rds,) = peer.pump()
    assert rds.names == {"models/other"}
    peer.ack(ROUTE)
    peer.request(ROUTE, ["gateway", "models/other"])  # iris's scope went away
    assert peer.pump() == []
    peer.request(ROUTE, ["gateway", "models/iris", "models/other"])  # and came back
    (rds,) = peer.pump()
    assert rds.names == {"models/iris"}


@MODES
def test_endpoints_follow_every_cluster_push(mode):
    """A changed cluster re-warms in Envoy and needs its endpoints again."""
    peer = Peer(mode, snap(TWO_VERSIONS))
    peer.converge()
    peer.retarget(TWO_VERSIONS + "    resilience: {load_balancing: random}\n")
    cds, eds = peer.pump()
    assert (cds.type, eds.type) == ("cds", "eds")
    assert cds.names == eds.names == {"iris/v1", "iris/v2"}


def test_delta_reconnect_with_initial_resource_versions_gets_only_what_differs():
    current = snap(TWO_VERSIONS)
    held = dict(current.types[CLUSTER].versions)
    peer = Peer("delta", current)
    peer.request(CLUSTER, initial=held)
    assert peer.pump() == []  # it has every cluster at these versions
    other = Peer("delta", current)
    other.request(CLUSTER, initial={**held, "iris/v2": "0-old", "iris/gone": "0-old"})
    (cds,) = other.pump()
    assert (cds.names, cds.removed) == ({"iris/v2"}, {"iris/gone"})
    restarted = Peer("delta", snap(TWO_VERSIONS, epoch="e2"))  # another instance's versions
    restarted.request(CLUSTER, initial=held)
    (cds,) = restarted.pump()
    assert cds.names == {"iris/v1", "iris/v2"}


def test_streams_in_the_same_state_share_one_answer(monkeypatch):
    computed = []
    compute = streams._compute_desired
    monkeypatch.setattr(streams, "_compute_desired", lambda *a: computed.append(a) or compute(*a))
    shared, snapshot = DesiredCache(), snap(TWO_VERSIONS)
    peers = [Peer("sotw", snapshot) for _ in range(3)]
    for peer in peers:
        peer.stream.desired = shared
        peer.converge()
    assert len(computed) == 5  # one answer per type, for all three streams


def test_delta_streams_needing_the_same_change_share_one_encoding(monkeypatch):
    encoded = []
    encode = streams.encode_delta_body
    monkeypatch.setattr(streams, "encode_delta_body", lambda *a: encoded.append(a) or encode(*a))
    shared = DesiredCache()
    peers = [Peer("delta", snap(TWO_VERSIONS)) for _ in range(3)]
    for peer in peers:
        peer.stream.desired = shared
        peer.converge()
    encoded.clear()
    edited = snap(weights(TWO_VERSIONS, 50, 50))
    for peer in peers:
        peer.stream.target = edited
        (rds,) = peer.pump()
        assert (rds.type, rds.names) == ("rds", {"models/iris"})
    assert len(encoded) == 1  # one body for the three streams, each with its own nonce


# --- per-node listen -------------------------------------------------------------------


def test_a_node_with_its_own_listen_gets_its_own_listener_and_shares_the_rest():
    cache = SnapshotCache()
    base = snap(TWO_VERSIONS)
    cache.set(base)
    own = Endpoint("127.0.0.1", 8082)
    variant = cache.for_node(own)
    assert cache.for_node(None) is base and cache.for_node(own) is variant
    for type_url in (CLUSTER, ENDPOINT, ROUTE):
        assert variant.types[type_url] is base.types[type_url]
    assert variant.types[LISTENER].version != base.types[LISTENER].version
    blob = variant.types[LISTENER].resources[LISTENER_NAME]
    listener = Listener.FromString(Any.FromString(blob).value)
    assert listener.address.socket_address.port_value == 8082


def test_node_metadata_names_its_listen_address_or_a_clear_error():
    node = Node(id="envoy-2", cluster="c")
    assert NodeInfo.from_proto(node).listen is None
    node.metadata.fields[LISTEN_METADATA].string_value = "127.0.0.1:8082"
    assert NodeInfo.from_proto(node).listen == Endpoint("127.0.0.1", 8082)
    node.metadata.fields[LISTEN_METADATA].string_value = "localhost:8082"
    with pytest.raises(ValueError, match="node 'envoy-2': metadata infergate.listen: .*127.0.0.1"):
        NodeInfo.from_proto(node)


# --- the node registry -----------------------------------------------------------------


def test_registry_shows_a_disconnected_node_then_forgets_it():
    clock = FakeClock()
    registry = NodeRegistry(clock=clock)
    node = NodeInfo("envoy-1", "c")
    registry.on_connect(node, "delta")
    registry.on_sent(node, ROUTE, "e-1", 1)
    registry.on_ack(node, ROUTE, "e-1")
    clock.advance(5)
    registry.on_disconnect(node)
    clock.advance(30)
    (status,) = registry.as_list()
    assert (status["connected"], status["mode"], status["disconnected_for"]) == (False, "delta", 30)
    assert status["types"]["rds"]["acked_version"] == "e-1"
    clock.advance(FORGET_AFTER - 30)
    assert registry.as_list() != []  # exactly FORGET_AFTER: still shown
    clock.advance(1)
    assert registry.as_list() == []


def test_registry_forgets_nodes_in_the_order_they_left_and_keeps_those_back():
    clock = FakeClock()
    registry = NodeRegistry(clock=clock)
    a, b, c = NodeInfo("a"), NodeInfo("b"), NodeInfo("c")
    for node in (a, b, c):
        registry.on_connect(node, "sotw")
    registry.on_disconnect(a)
    clock.advance(10)
    registry.on_disconnect(b)
    registry.on_disconnect(c)
    registry.on_connect(b, "sotw")  # back: never forgotten while connected
    clock.advance(FORGET_AFTER - 5)
    assert [s["node_id"] for s in registry.as_list()] == ["b", "c"]  # a left 10 s earlier
    clock.advance(FORGET_AFTER)
    assert [s["node_id"] for s in registry.as_list()] == ["b"]


def test_registry_counts_streams_and_clears_a_nack_once_a_later_version_is_acked():
    registry = NodeRegistry(clock=FakeClock())
    node = NodeInfo("envoy-1")
    registry.on_connect(node, "sotw")
    registry.on_connect(node, "sotw")  # a new stream before the old one closed
    registry.on_disconnect(node)
    registry.on_nack(node, ROUTE, "e-2", "bad")
    status = registry.nodes["envoy-1"]
    assert status.connected and status.type(ROUTE).nack.message == "bad"
    registry.on_ack(node, ROUTE, "e-2")  # the NACKed version: the NACK stays
    assert status.type(ROUTE).nack is not None
    registry.on_ack(node, ROUTE, "e-3")
    assert status.type(ROUTE).nack is None
    assert (status.type(ROUTE).acked_count, status.type(ROUTE).nack_count) == (2, 1)


@MODES
def test_routes_held_back_then_undone_end_on_the_current_version(mode):
    """An edit undoes the change a route configuration was held back for: nothing is left
    to send, yet Envoy last heard a partial version; one configuration sent again as it is
    tells it the current one (else `/status` never shows it converged)."""
    peer = Peer(mode, snap(TWO_MODELS), FakeClock())
    peer.converge()
    peer.retarget(other_weights(with_v3(TWO_MODELS)))  # iris waits for v3; other goes
    (rds,) = [s for s in peer.pump() if s.type == "rds"]
    assert rds.version.endswith("-partial")
    peer.ack(ROUTE)
    final = other_weights(TWO_MODELS)  # v3 gone again: iris's routes are what Envoy has
    peer.retarget(final)
    (rds,) = [s for s in peer.pump() if s.type == "rds"]
    assert len(rds.names) == 1 and rds.version == snap(final).types[ROUTE].version
    peer.ack(ROUTE)
    assert peer.stream.types[ROUTE].acked_version == snap(final).types[ROUTE].version
    assert [s for s in peer.pump() if s.type == "rds"] == []


@MODES
def test_routes_subscribed_again_after_their_version_was_acked_show_it_is_not_held(mode):
    """A model comes back: Envoy ACKs the routes of that snapshot before its scope asks
    for the model's routes, which then wait for their clusters. Until they go out, Envoy
    must not count as holding that version (`/status` would say converged)."""
    peer = Peer(mode, snap(TWO_MODELS))
    peer.converge()
    peer.retarget(TWO_VERSIONS)  # `other` goes, with its scope and then its routes
    assert peer.types() == ["srds"]
    peer.ack(SCOPED_ROUTE)
    peer.request(ROUTE, ["gateway", "models/iris"])
    for sent in peer.pump():
        peer.ack({"rds": ROUTE, "cds": CLUSTER, "eds": ENDPOINT}[sent.type])
    final = weights(TWO_MODELS, 50, 50)  # `other` back, and iris's routes change
    peer.retarget(final)
    version = snap(final).types[ROUTE].version
    sent = {s.type: s for s in peer.pump()}
    assert sent["rds"].names == {"models/iris"} and sent["rds"].version == version
    peer.ack(SCOPED_ROUTE)
    peer.ack(ROUTE)
    peer.request(ROUTE, ["gateway", "models/iris", "models/other"])  # its scope is back
    (rds,) = peer.pump()  # other's routes wait for its clusters
    assert rds.version == f"{version}-partial" and len(rds.names) == 1
    peer.ack(ROUTE)
    assert peer.callbacks.events[-1] == ("ack", "rds", f"{version}-partial")
    peer.request(ENDPOINT, ["iris/v1", "iris/v2", "other/a", "other/b"])
    peer.pump()
    peer.ack(ENDPOINT)
    peer.ack(CLUSTER)
    (rds,) = peer.pump()
    assert rds.names == {"models/other"} and rds.version == version


@MODES
def test_a_cluster_in_flight_gets_its_endpoints_though_the_target_dropped_it(mode):
    """An edit adds v3 and the next removes it before Envoy ACKed the CDS response that
    adds it: Envoy warms v3 all the same and asks for its endpoints. Without them it would
    hold that CDS response (and every later one) until its 15 s initial fetch timeout."""
    peer = Peer(mode, snap(NO_CHECKS))
    peer.converge()
    peer.retarget(with_v3(NO_CHECKS))
    assert peer.types()[0] == "cds"
    if mode == "sotw":
        peer.ack(ENDPOINT)  # the endpoints that follow every CDS response
    peer.retarget(NO_CHECKS)  # v3 gone again
    peer.request(ENDPOINT, ["iris/v1", "iris/v2", "iris/v3"])  # Envoy warms v3
    (eds,) = [s for s in peer.pump() if s.type == "eds"]
    assert "iris/v3" in eds.names
    peer.ack(ENDPOINT)
    peer.ack(CLUSTER)  # v3 warm: Envoy ACKs; v3 goes with the next CDS response
    cds = next(s for s in peer.pump() if s.type == "cds")
    assert "iris/v3" in cds.removed if mode == "delta" else "iris/v3" not in cds.names


@MODES
def test_routes_wait_for_a_cluster_that_a_response_in_flight_removes(mode):
    """A version comes back while the CDS response that removes it is in flight: Envoy will
    drop the cluster first, so routes naming it wait for the response that adds it again."""
    peer = Peer(mode, snap(NO_CHECKS))
    peer.converge()
    peer.retarget(without_v2(NO_CHECKS))
    assert peer.types() == ["rds"]  # routes without v2 first
    peer.ack(ROUTE)
    assert peer.types() == ["cds", "eds"]  # then v2's cluster goes: not ACKed yet
    peer.retarget(NO_CHECKS)  # v2 back
    assert peer.pump() == []  # routes naming v2 would meet no cluster (503 NC)
    peer.ack(CLUSTER)
    peer.ack(ENDPOINT)
    assert peer.types() == ["cds", "eds"]  # v2 added again
    peer.ack(ENDPOINT)
    assert peer.pump() == []  # until Envoy ACKed the cluster
    peer.ack(CLUSTER)
    (rds,) = peer.pump()
    assert rds.type == "rds" and rds.version == snap(NO_CHECKS).types[ROUTE].version
