"""Usage per consumer and model: classification of Envoy's access log entries, the store's
counts with an injected clock, and what /traffic, /metrics and `infergate usage` show."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from rich.console import Console

from control_plane.access_log import CONSUMER_HEADER, SAMPLE_TAG, record_of
from control_plane.metrics import PlaneCollector
from control_plane.telemetry import (
    ANONYMOUS,
    OTHER,
    OUTCOMES,
    RequestRecord,
    TelemetryStore,
    outcome,
    traffic_report,
)
from gateway.top import usage_table
from tests.fake_clock import FakeClock


def rec(
    code: int = 200,
    flags: str = "",
    details: str = "via_upstream",
    consumer: str | None = "alice",
    model: str = "iris",
    version: str = "v1",
) -> RequestRecord:
    return RequestRecord(model, version, code, flags, 0.01, "id", consumer, details)


# Response codes, flags and details as Envoy 1.40 logs them (the strings are in its binary;
# the overflow and no-route ones were read from a real Envoy in test_telemetry_e2e).
@pytest.mark.parametrize(
    ("code", "flags", "details", "want"),
    [
        (200, "", "via_upstream", "ok"),
        (401, "", "missing_api_key", "unauthorized"),  # api_key_auth
        (401, "", "jwt_authn_access_denied{Jwt_is_expired}", "unauthorized"),
        (403, "", "client_not_allowed", "forbidden"),  # api_key_auth's allowed clients
        (403, "", "rbac_access_denied_matched_policy[none]", "forbidden"),
        (413, "", "request_payload_too_large", "too_large"),  # buffer filter
        (413, "", "via_upstream", "too_large"),  # the model server's own limit
        (429, "RL", "local_rate_limited", "rate_limited"),
        (429, "RL", "request_rate_limited", "over_quota"),
        (500, "RLSE", "rate_limiter_error", "over_quota"),  # the quota service failed closed
        (503, "UO", "upstream_reset_before_response_started{overflow}", "shed"),
        (503, "", "reached_concurrency_limit", "shed"),  # adaptive concurrency
        (503, "", "denied_by_admission_control", "shed"),
        (503, "OM", "overload", "shed"),
        (429, "", "reached_concurrency_limit", "shed"),  # a local reply mapper's code
        (429, "", "via_upstream", "client_error"),  # not Envoy's rate limit
        (404, "NR", "route_not_found", "client_error"),
        (503, "UF,URX", "upstream_reset_before_response_started{connection_failure}", "error"),
        (500, "", "via_upstream", "error"),
        (0, "DC", "downstream_remote_disconnect", "error"),
    ],
)
def test_outcome_from_code_flags_and_details(code, flags, details, want):
    assert outcome(rec(code, flags, details)) == want


def entry(
    cluster: str = "", route: str = "", path: str = "", details: str = ""
) -> HTTPAccessLogEntry:
    e = HTTPAccessLogEntry()
    e.common_properties.upstream_cluster = cluster
    e.common_properties.route_name = route
    e.common_properties.custom_tags[SAMPLE_TAG] = "0.5"
    e.request.path = path
    e.request.request_headers[CONSUMER_HEADER] = "alice"
    e.response.response_code.value = 429
    e.response.response_code_details = details
    return e


def test_a_rejection_without_a_cluster_counts_for_the_model_of_its_route_or_path():
    record, weight = record_of(entry(route="iris/split", details="local_rate_limited"))
    assert (record.model, record.version, record.details, weight) == (
        "iris",
        "",
        "local_rate_limited",
        2,
    )
    record, _ = record_of(entry(path="/v2/models/resnet/versions/v3/infer?x=1"))
    assert (record.model, record.version) == ("resnet", "")
    record, _ = record_of(entry("iris/v2/grpc", route="iris/grpc-split"))
    assert (record.model, record.version) == ("iris", "v2")  # the cluster wins
    # The gateway's catch-all 404 (with API management): the model the client asked for.
    record, _ = record_of(entry(route="gateway/not-found", path="/v2/models/nosuch/infer"))
    assert (record.model, record.version) == ("nosuch", "")
    assert record_of(entry(route="gateway/ready", path="/v2/health/ready")) is None
    assert record_of(entry(path="/v2/health/live")) is None
    assert record_of(entry(route="gateway/metadata", path="/v2")) is None
    assert record_of(entry(path="/v2/models/")) is None


def test_store_counts_consumers_by_outcome_in_windows_and_since_start():
    clock = FakeClock()
    store = TelemetryStore(clock)
    store.add(rec(), weight=4)  # sampled at 1/4
    store.add(rec(429, "RL", "local_rate_limited", version=""), weight=4)
    store.add(rec(401, consumer="mallory", details="unknown_api_key", version=""))
    store.add(rec(consumer=None))
    clock.now += 30
    store.add(rec(413, details="request_payload_too_large", version=""))
    usage = store.usage
    assert usage.window("alice", "iris", 10) == {
        "requests": 1,
        "outcomes": dict.fromkeys(OUTCOMES, 0.0) | {"too_large": 1},
    }
    assert usage.window("alice", "iris", 60)["outcomes"] == dict.fromkeys(OUTCOMES, 0.0) | {
        "ok": 4,
        "rate_limited": 4,
        "too_large": 1,
    }
    assert usage.totals() == {
        (ANONYMOUS, "iris"): dict.fromkeys(OUTCOMES, 0.0) | {"ok": 1, "unauthorized": 1},
        ("alice", "iris"): dict.fromkeys(OUTCOMES, 0.0)
        | {"ok": 4, "rate_limited": 4, "too_large": 1},
    }
    clock.now += 61
    assert usage.window("alice", "iris", 60)["requests"] == 0
    assert usage.totals()[("alice", "iris")]["ok"] == 4
    # Rejections before a version count only per consumer; versions see what reached them.
    assert store.versions() == [("iris", "v1")]
    assert store.totals("iris", "v1") == {"2xx": 5}
    assert store.records == 5


def test_consumer_and_model_pairs_beyond_the_bound_count_as_other():
    store = TelemetryStore(FakeClock())
    store.usage.max_rows = 2
    for name in ("a", "b", "c", "d"):
        store.add(rec(consumer=name))
    store.add(rec(consumer="a"))
    assert {key: n["ok"] for key, n in store.usage.totals().items()} == {
        ("a", "iris"): 2,
        ("b", "iris"): 1,
        (OTHER, OTHER): 2,
    }


def test_traffic_metrics_and_the_usage_table_show_the_same_counts():
    store = TelemetryStore(FakeClock())
    store.add(rec(), weight=2)
    store.add(rec(503, "UO", "upstream_reset_before_response_started{overflow}"), weight=2)
    store.add(rec(404, "NR", "route_not_found", consumer="bob", model="nosuch", version=""))
    report = traffic_report(store, None, 0.5)
    rows = {(r["consumer"], r["model"]): r for r in report["consumers"]}
    assert list(rows) == [("alice", "iris"), ("bob", "nosuch")]
    assert rows["alice", "iris"]["windows"]["10s"]["requests"] == 4
    assert rows["alice", "iris"]["total"]["outcomes"]["shed"] == 2
    assert rows["bob", "nosuch"]["windows"]["60s"]["outcomes"]["client_error"] == 1

    plane = SimpleNamespace(store=store)
    samples = {
        tuple(s.labels.values()): s.value
        for s in PlaneCollector(plane)._consumers().samples  # type: ignore[arg-type]
        if s.name == "infergate_consumer_requests_total"
    }
    assert samples["alice", "iris", "ok"] == 2
    assert samples["alice", "iris", "shed"] == 2
    assert samples["bob", "nosuch", "client_error"] == 1
    assert samples["bob", "nosuch", "ok"] == 0
    assert len(samples) == 2 * len(OUTCOMES)

    console = Console(record=True, width=200, file=io.StringIO())
    console.print(usage_table(report["consumers"], "total"))
    lines = console.export_text().splitlines()
    header = next(line for line in lines if line.startswith("┃"))
    assert [c.strip() for c in header.split("┃")[1:-1]] == [
        "consumer",
        "model",
        "requests",
        "ok",
        "401",
        "403",
        "413",
        "429 rate",
        "429 quota",
        "shed",
        "other 4xx",
        "errors",
    ]
    alice_line = next(line for line in lines if "alice" in line)
    cells = [c.strip() for c in alice_line.split("│")[1:-1]]
    assert cells == ["alice", "iris", "4", "2", "0", "0", "0", "0", "0", "2", "0", "0"]
