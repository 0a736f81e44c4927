"""Parsing and validating a model's `limits` and `quota_service`, and what they translate to."""

from __future__ import annotations

import jsonschema
import pytest
import yaml
from envoy.config.core.v3.base_pb2 import RoutingPriority

from control_plane.config import ConfigError, Limits, Rate, parse
from control_plane.schema import routing_schema
from control_plane.translate import translate
from control_plane.translate_limits import RATE_FILTER, rate_fallback, token_bucket

BASE = """\
models:
  iris:
    versions: {v1: {endpoints: [127.0.0.1:9001]}}
"""
FULL = (
    BASE + "    limits: {rate: {per_consumer: 50/s, burst: 100}, quota: {per_consumer: 10000/h},"
    " max_body: 1MiB, low_priority_requests: 4}\nquota_service: {on_failure: closed}\n"
    "consumers: {keys_file: keys.yaml, priority: {batch-job: low, web: high}}\n"
)

KEYS = "batch-job: batch-job-key-00001\nweb: web-key-0000000001\n"


def with_limits(limits: str) -> str:
    return BASE + f"    limits: {limits}\n"


def test_limits_and_quota_service_parse(tmp_path):
    (tmp_path / "keys.yaml").write_text(KEYS)
    config = parse(FULL, str(tmp_path / "r.yaml"))
    assert config.models[0].limits == Limits(
        rate=Rate(50, 1),
        burst=100,
        quota=Rate(10000, 3600),
        max_body=1 << 20,
        low_priority_requests=4,
    )
    assert config.quota_on_failure == "closed"
    assert config.consumers.priority == {"batch-job": "low", "web": "high"}
    jsonschema.validate(yaml.safe_load(FULL), routing_schema())


def test_without_limits_nothing_changes():
    config = parse(BASE)
    assert config.models[0].limits is None and config.quota_on_failure == "open"
    resources = translate(config)
    # The limit filters are in the listener, as for every file (docs/api-management.md),
    # but no route turns one on and the rate filter's config limits nothing.
    (host,) = resources.routes["models/iris"].virtual_hosts
    assert not host.typed_per_filter_config
    assert not any(r.typed_per_filter_config for r in host.routes)
    rate = resources.extension_configs[RATE_FILTER].typed_config
    assert rate == rate_fallback()


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (
            "{rate: {per_consumer: 50/fortnight}}",
            "r.yaml:4:35: models.iris.limits.rate.per_consumer: '50/fortnight' is not a rate "
            "like 50/s, 600/m, 10000/h or 1000000/d",
        ),
        (
            "{rate: {per_consumer: 0/s}}",
            "r.yaml:4:35: models.iris.limits.rate.per_consumer: '0/s': the number of requests "
            "must be 1-4294967295",
        ),
        (
            "{quota: {per_consumer: -5/h}}",
            "r.yaml:4:36: models.iris.limits.quota.per_consumer: '-5/h': the number of "
            "requests must be 1-4294967295",
        ),
        (
            "{rate: {per_consumer: 5/s, burst: 0}}",
            "r.yaml:4:47: models.iris.limits.rate.burst: must be an integer at least 1, got 0",
        ),
        (
            "{max_body: 0}",
            "r.yaml:4:24: models.iris.limits.max_body: 0 is not a positive size like 1MiB, "
            "512KiB or 65536",
        ),
        (
            "{max_body: 1XB}",
            "r.yaml:4:24: models.iris.limits.max_body: '1XB' is not a positive size like 1MiB, "
            "512KiB or 65536",
        ),
        (
            "{quota: {}}",
            "r.yaml:4:21: models.iris.limits.quota: missing required key 'per_consumer'",
        ),
    ],
)
def test_bad_limits_are_reported_with_their_position(limits: str, message: str):
    with pytest.raises(ConfigError) as err:
        parse(with_limits(limits), "r.yaml")
    assert [str(p) for p in err.value.problems] == [message]


def test_bad_quota_failure_mode():
    with pytest.raises(ConfigError, match=r"r.yaml:4:29: quota_service.on_failure: 'maybe'"):
        parse(BASE + "quota_service: {on_failure: maybe}\n", "r.yaml")


@pytest.mark.parametrize(
    ("rate", "tokens", "interval"),
    [
        (Rate(50, 1), 5, 0.1),
        (Rate(10000, 3600), 1, 0.36),
        (Rate(7, 1), 1, 1 / 7),
        (Rate(1, 86400), 1, 86400),
    ],
)
def test_token_bucket_refills_the_rate_in_steps_of_at_least_50ms(rate, tokens, interval):
    bucket = token_bucket(rate, None)
    assert bucket.tokens_per_fill.value == tokens
    assert bucket.fill_interval.ToTimedelta().total_seconds() == pytest.approx(interval)
    assert bucket.max_tokens == rate.requests


def test_low_consumers_get_twin_routes_and_a_small_pool_on_http_clusters_only(tmp_path):
    (tmp_path / "keys.yaml").write_text(KEYS)
    path = str(tmp_path / "r.yaml")
    text = (
        "consumers: {keys_file: keys.yaml, priority: {batch-job: low, web: high}}\n"
        "models:\n  iris:\n    grpc_listen: 127.0.0.1:8081\n"
        "    versions: {v1: {endpoints: [127.0.0.1:9001], grpc_endpoints: [127.0.0.1:9101]}}\n"
        "    limits: {low_priority_requests: 3}\n"
    )
    resources = translate(parse(text, path))
    routes = resources.routes["models/iris"].virtual_hosts[0].routes
    models = [r for r in routes if r.name.startswith("iris/")]
    assert [(r.name, r.route.priority) for r in models] == [
        ("iris/path/v1/low", RoutingPriority.DEFAULT),
        ("iris/path/v1", RoutingPriority.HIGH),
        ("iris/pin/v1/low", RoutingPriority.DEFAULT),
        ("iris/pin/v1", RoutingPriority.HIGH),
        ("iris/split/low", RoutingPriority.DEFAULT),
        ("iris/split", RoutingPriority.HIGH),
    ]
    assert models[0].match.headers[-1].string_match.safe_regex.regex == "^(batch\\-job)$"
    low, high = resources.clusters["iris/v1"].circuit_breakers.thresholds
    assert (low.priority, low.max_requests.value) == (RoutingPriority.DEFAULT, 3)
    assert (high.priority, high.max_requests.value) == (RoutingPriority.HIGH, 100_000)
    assert len(resources.clusters["iris/v1/grpc"].circuit_breakers.thresholds) == 1
    unprioritized = translate(parse(text.replace("batch-job: low", "batch-job: normal"), path))
    assert len(unprioritized.clusters["iris/v1"].circuit_breakers.thresholds) == 1
