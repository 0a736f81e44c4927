"""SDS in the pure stream state machines: secrets go out before the clusters that name
them, routes wait until Envoy ACKed them, and a rotation pushes the secrets alone."""

from __future__ import annotations

from control_plane.config import parse
from control_plane.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, build_snapshot
from control_plane.translate import model_routes_name, translate
from control_plane.upstream_tls import CA_SECRET, CLIENT_SECRET, Material, secrets
from tests.test_streams import EPOCH, MODES, TWO_VERSIONS, Peer, snap, with_v3

SECRETS = [CA_SECRET, CLIENT_SECRET]


def tls_snap(text: str, serial: int = 1):
    material = Material(b"cert %d" % serial, b"key %d" % serial, b"ca")
    return build_snapshot(translate(parse(text)), EPOCH, secrets=secrets(material))


def converge_with_secrets(peer: Peer) -> None:
    """Envoy's start: clusters; then their endpoints and secrets (asked for together);
    listeners; routes, which wait until the secrets are ACKed."""
    peer.request(CLUSTER)
    (cds,) = peer.pump()
    peer.request(SECRET, SECRETS)
    peer.request(ENDPOINT, sorted(cds.names))
    assert peer.types() == ["sds", "eds"]  # secrets first
    peer.ack(ENDPOINT)
    peer.ack(CLUSTER)
    peer.request(LISTENER)
    assert peer.types() == ["lds"]
    peer.ack(LISTENER)
    peer.request(ROUTE, [model_routes_name("iris")])
    assert peer.types() == []  # the clusters' certificates are not ACKed yet
    peer.ack(SECRET)
    assert peer.types() == ["rds"]
    peer.ack(ROUTE)


@MODES
def test_secrets_go_first_and_routes_wait_for_their_ack(mode):
    peer = Peer(mode, tls_snap(TWO_VERSIONS))
    converge_with_secrets(peer)
    assert peer.pump() == []


@MODES
def test_a_rotated_certificate_pushes_the_secrets_alone(mode):
    peer = Peer(mode, tls_snap(TWO_VERSIONS))
    converge_with_secrets(peer)
    peer.stream.target = tls_snap(TWO_VERSIONS, serial=2)
    (sds,) = peer.pump()
    # Delta sends only the changed secret (the client certificate), SotW both.
    assert sds.type == "sds" and CLIENT_SECRET in sds.names
    peer.ack(SECRET)
    assert peer.pump() == []


@MODES
def test_secrets_changed_with_clusters_go_out_before_them(mode):
    peer = Peer(mode, tls_snap(TWO_VERSIONS))
    converge_with_secrets(peer)
    peer.stream.target = tls_snap(with_v3(TWO_VERSIONS), serial=2)
    assert peer.types()[:2] == ["sds", "cds"]


def test_a_config_without_upstream_tls_has_no_secret_type():
    assert SECRET not in snap(TWO_VERSIONS).types
