"""Access log decoding and the logger added to Envoy's listeners (no Envoy needed)."""

from __future__ import annotations

from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from envoy.extensions.access_loggers.grpc.v3.als_pb2 import HttpGrpcAccessLogConfig
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (  # noqa: E501
    HttpConnectionManager,
)

from control_plane.access_log import (
    CONSUMER_HEADER,
    SAMPLE_TAG,
    XDS_CLUSTER,
    record_of,
    sample_key,
    with_access_log,
)
from control_plane.config import parse
from control_plane.telemetry import RequestRecord
from control_plane.translate import translate

YAML = """
listen: 127.0.0.1:8080
models:
  iris:
    grpc_listen: 127.0.0.1:8081
    versions:
      v1: {endpoints: [127.0.0.1:9001], grpc_endpoints: [127.0.0.1:9101]}
    traffic: {v1: 100}
"""


def entry(cluster: str, code: int = 200, sample: str | None = None) -> HTTPAccessLogEntry:
    e = HTTPAccessLogEntry()
    e.common_properties.upstream_cluster = cluster
    e.common_properties.duration.FromMilliseconds(12)
    e.common_properties.response_flags.upstream_connection_failure = True
    e.common_properties.response_flags.upstream_retry_limit_exceeded = True
    if sample:
        e.common_properties.custom_tags[SAMPLE_TAG] = sample
    e.request.request_id = "req-1"
    e.request.request_headers[CONSUMER_HEADER] = "team-a"
    e.response.response_code.value = code
    return e


def test_an_entry_becomes_a_record_with_its_weight():
    record, weight = record_of(entry("iris/v2", 503, sample="0.25"))
    assert record == RequestRecord("iris", "v2", 503, "UF,URX", 0.012, "req-1", "team-a")
    assert weight == 4


def test_grpc_clusters_count_for_their_version_and_unrouted_requests_for_none():
    record, weight = record_of(entry("iris/v1/grpc"))
    assert (record.model, record.version, weight) == ("iris", "v1", 1.0)
    assert record_of(entry("")) is None  # the gateway's own health routes, no route


def hcm_access_logs(resources) -> dict[str, list]:
    out = {}
    for name, listener in resources.listeners.items():
        hcm = HttpConnectionManager()
        listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
        out[name] = list(hcm.access_log)
    return out


def test_every_http_listener_logs_to_the_control_plane_without_changing_the_translation():
    resources = translate(parse(YAML))
    logged = with_access_log(resources, (0.5, 0.25))
    assert all(logs == [] for logs in hcm_access_logs(resources).values())  # copies
    logs = hcm_access_logs(logged)
    assert sorted(logs) == ["gateway", "grpc/iris"]
    for half, quarter in logs.values():
        for logger, tag, default in ((half, "0.5", 100), (quarter, "0.25", 0)):
            config = HttpGrpcAccessLogConfig()
            logger.typed_config.Unpack(config)
            assert config.common_config.grpc_service.envoy_grpc.cluster_name == XDS_CLUSTER
            assert config.common_config.custom_tags[0].literal.value == tag
            assert list(config.additional_request_headers_to_log) == [CONSUMER_HEADER]
            # Only the first logger is on until the runtime (RTDS) says otherwise.
            switch, sampler = (f.runtime_filter for f in logger.filter.and_filter.filters)
            assert (switch.runtime_key, switch.percent_sampled.numerator) == (
                sample_key(float(tag)),
                default,
            )
            assert sampler.percent_sampled.numerator == float(tag) * 1_000_000
