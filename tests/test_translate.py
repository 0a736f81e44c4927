"""The pure translator: routing model in, Envoy resources out."""

from __future__ import annotations

from envoy_data_plane.envoy.config.cluster.v3 import ClusterDiscoveryType

from control_plane.config import parse
from control_plane.translate import RETRY_ON, ROUTE_CONFIG_NAME, translate

YAML = """
listen: 127.0.0.1:8181
models:
  iris:
    versions:
      v1: {endpoints: [127.0.0.1:9001, 127.0.0.1:9002]}
      v2: {endpoints: [127.0.0.1:9003]}
      v3: {endpoints: [127.0.0.1:9004]}
    traffic: {v1: 90, v2: 10, v3: 0}
    shadow: {version: v3, percent: 12.5}
    timeout: 2s
"""


def routes(text: str = YAML):
    return translate(parse(text)).routes[ROUTE_CONFIG_NAME].virtual_hosts[0].routes


def test_one_eds_cluster_per_version_with_its_endpoints():
    res = translate(parse(YAML))
    assert sorted(res.clusters) == ["iris/v1", "iris/v2", "iris/v3"]
    for cluster in res.clusters.values():
        assert cluster.type == ClusterDiscoveryType.EDS
        assert cluster.eds_cluster_config.eds_config.ads is not None
    ports = [
        e.endpoint.address.socket_address.port_value
        for e in res.endpoints["iris/v1"].endpoints[0].lb_endpoints
    ]
    assert ports == [9001, 9002]
    listener = res.listeners["gateway"]
    assert listener.address.socket_address.port_value == 8181


def test_route_order_path_then_pin_then_split():
    names = [r.name for r in routes()]
    assert names == [
        "iris/path/v1",
        "iris/path/v2",
        "iris/path/v3",
        "iris/pin/v1",
        "iris/pin/v2",
        "iris/pin/v3",
        "iris/split",
    ]
    path_v2 = routes()[1]
    assert path_v2.match.path_separated_prefix == "/v2/models/iris/versions/v2"
    assert path_v2.route.cluster == "iris/v2"
    pin_v3 = routes()[5]
    assert pin_v3.match.headers[0].name == "x-model-version"
    assert pin_v3.match.headers[0].string_match.exact == "v3"
    assert pin_v3.route.cluster == "iris/v3"


def test_split_leaves_out_zero_weights_and_mirrors_the_shadow_fraction():
    action = routes()[-1].route
    weights = {c.name: c.weight for c in action.weighted_clusters.clusters}
    assert weights == {"iris/v1": 90, "iris/v2": 10}
    (mirror,) = action.request_mirror_policies
    assert mirror.cluster == "iris/v3"
    assert mirror.runtime_fraction.default_value.numerator == 125_000  # of a million
    assert action.timeout.total_seconds() == 2
    assert action.retry_policy.retry_on == RETRY_ON


def test_a_single_live_version_is_a_plain_cluster_route_without_mirror():
    text = YAML.replace("{v1: 90, v2: 10, v3: 0}", "{v1: 0, v2: 7}").replace(
        "    shadow: {version: v3, percent: 12.5}\n", ""
    )
    action = routes(text)[-1].route
    assert action.cluster == "iris/v2" and action.weighted_clusters is None
    assert not action.request_mirror_policies
