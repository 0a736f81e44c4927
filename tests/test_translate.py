"""The pure translator: routing model in, Envoy resources out."""

from __future__ import annotations

from pathlib import Path

from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (  # noqa: E501
    HttpConnectionManager,
)

from control_plane.config import parse
from control_plane.translate import GATEWAY_ROUTES, SCOPE_HEADER, translate

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


def routes(text: str = YAML, name: str = "models/iris"):
    return translate(parse(text)).routes[name].virtual_hosts[0].routes


def test_one_eds_cluster_per_version_with_its_endpoints():
    res = translate(parse(YAML))
    assert sorted(res.clusters) == ["iris/v1", "iris/v2", "iris/v3"]
    for cluster in res.clusters.values():
        assert cluster.type == Cluster.EDS
        assert cluster.eds_cluster_config.eds_config.HasField("ads")
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


def test_one_route_configuration_per_model_chosen_by_scope_from_the_path():
    res = translate(parse(YAML + "  other:\n    versions: {a: {endpoints: [127.0.0.1:9005]}}\n"))
    assert sorted(res.routes) == [GATEWAY_ROUTES, "models/iris", "models/other"]
    assert [r.name for r in routes(name=GATEWAY_ROUTES)] == [
        "gateway/live",
        "gateway/ready",
        "gateway/metadata",
    ]
    scopes = {
        name: ([f.string_key for f in s.key.fragments], s.route_configuration_name)
        for name, s in res.scoped_routes.items()
    }
    assert scopes == {
        "gateway/live": (["health", "live"], GATEWAY_ROUTES),
        "gateway/ready": (["health", "ready"], GATEWAY_ROUTES),
        "gateway/metadata": (["-", "-"], GATEWAY_ROUTES),
        "models/iris": (["models", "iris"], "models/iris"),
        "models/other": (["models", "other"], "models/other"),
    }
    assert res.route_clusters == {
        GATEWAY_ROUTES: frozenset(),
        "models/iris": {"iris/v1", "iris/v2", "iris/v3"},
        "models/other": {"other/a"},
    }
    hcm = HttpConnectionManager()
    res.listeners["gateway"].filter_chains[0].filters[0].typed_config.Unpack(hcm)
    assert hcm.WhichOneof("route_specifier") == "scoped_routes"
    fragments = hcm.scoped_routes.scope_key_builder.fragments
    assert [(f.header_value_extractor.name, f.header_value_extractor.index) for f in fragments] == [
        (SCOPE_HEADER, 2),
        (SCOPE_HEADER, 3),
    ]
    assert hcm.scoped_routes.scoped_rds.scoped_rds_config_source.HasField("ads")
    (early,) = hcm.early_header_mutation_extensions
    assert SCOPE_HEADER.encode() in early.typed_config.value
    assert res.routes["models/iris"].request_headers_to_remove == [SCOPE_HEADER]


def test_split_leaves_out_zero_weights_and_mirrors_the_shadow_fraction():
    action = routes()[-1].route
    weights = {c.name: c.weight.value for c in action.weighted_clusters.clusters}
    assert weights == {"iris/v1": 90, "iris/v2": 10}
    (mirror,) = action.request_mirror_policies
    assert mirror.cluster == "iris/v3"
    assert mirror.runtime_fraction.default_value.numerator == 125_000  # of a million
    assert action.timeout.ToTimedelta().total_seconds() == 2
    assert action.retry_policy.retry_on == "connect-failure,reset,refused-stream"
    assert action.retry_policy.num_retries.value == 2


def test_a_single_live_version_is_a_plain_cluster_route_without_mirror():
    text = YAML.replace("{v1: 90, v2: 10, v3: 0}", "{v1: 0, v2: 7}").replace(
        "    shadow: {version: v3, percent: 12.5}\n", ""
    )
    action = routes(text)[-1].route
    assert action.cluster == "iris/v2" and not action.HasField("weighted_clusters")
    assert not action.request_mirror_policies


POLICY = """
resilience:
  retries: {attempts: 4, conditions: [5xx, reset], per_try_timeout: 500ms, backoff: 10ms}
  load_balancing: round_robin
models:
  fast:
    versions: {a: {endpoints: [127.0.0.1:9001]}}
    resilience:
      health_check: {path: /healthz, interval: 3s}
      outlier_detection: {consecutive_5xx: 7, ejection_time: 30s}
  orca:
    versions: {a: {endpoints: [127.0.0.1:9002]}}
    resilience: {load_balancing: orca_weighted, health_check: false}
"""


def test_resilience_policy_defaults_and_overrides():
    res = translate(parse(POLICY))
    fast, orca = res.clusters["fast/a"], res.clusters["orca/a"]
    assert fast.lb_policy == Cluster.ROUND_ROBIN
    (check,) = fast.health_checks
    assert (
        check.http_health_check.path == "/healthz"
        and check.interval.ToTimedelta().total_seconds() == 3
    )
    assert fast.outlier_detection.consecutive_5xx.value == 7
    assert fast.outlier_detection.base_ejection_time.ToTimedelta().total_seconds() == 30
    assert fast.circuit_breakers.thresholds[0].max_requests.value == 100_000
    assert len(orca.health_checks) == 0
    (policy,) = orca.load_balancing_policy.policies
    assert "client_side_weighted_round_robin" in policy.typed_extension_config.name
    retry = res.routes["models/fast"].virtual_hosts[0].routes[-1].route.retry_policy
    assert retry.retry_on == "5xx,reset" and retry.num_retries.value == 4
    assert retry.per_try_timeout.ToTimedelta().total_seconds() == 0.5
    assert retry.retry_host_predicate[0].name == "envoy.retry_host_predicates.previous_hosts"


def test_default_cluster_has_readiness_health_check_and_least_request():
    cluster = translate(parse(YAML)).clusters["iris/v1"]
    assert cluster.lb_policy == Cluster.LEAST_REQUEST
    assert cluster.health_checks[0].http_health_check.path == "/v2/health/ready"


def test_health_check_timeouts_of_actively_checked_clusters_only():
    text = (Path(__file__).parent / "testdata" / "translate" / "in" / "resilience.yaml").read_text()
    grpc = (Path(__file__).parent / "testdata" / "translate" / "in" / "grpc.yaml").read_text()
    assert translate(parse(text)).health_check_timeouts == {"tuned/a": 0.25, "overridden/a": 0.25}
    timeouts = translate(parse(grpc)).health_check_timeouts
    assert timeouts == {f"iris/{v}": 1.0 for v in ("v1", "v2", "v3")} | {"single/a": 1.0}
