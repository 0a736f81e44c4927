"""Resilience policy: retries, outlier detection, circuit breakers, active health
checks and load balancing, with defaults that suit model servers.

A top-level `resilience:` block sets defaults for every model; a model's own block
overrides them key by key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import yaml

from control_plane.yaml_reader import Reader

RETRY_CONDITIONS = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "envoy-ratelimited",
        "http3-post-connect-failure",
    }
)
LOAD_BALANCING = ("least_request", "round_robin", "random", "orca_weighted")


@dataclass(frozen=True)
class Retries:
    attempts: int = 2
    conditions: tuple[str, ...] = ("connect-failure", "reset", "refused-stream")
    per_try_timeout: float = 0.0  # 0: only the route timeout applies
    backoff: float = 0.025  # base interval; Envoy's maximum is 10x


@dataclass(frozen=True)
class OutlierDetection:
    consecutive_5xx: int = 5
    consecutive_connect_failures: int = 2
    interval: float = 1.0
    ejection_time: float = 10.0
    max_ejection_percent: int = 100


@dataclass(frozen=True)
class CircuitBreakers:
    """Raised far above Envoy's defaults (1024) so that Envoy does not queue a benchmark."""

    max_connections: int = 100_000
    max_pending_requests: int = 100_000
    max_requests: int = 100_000
    max_retries: int = 1_000


@dataclass(frozen=True)
class HealthCheck:
    enabled: bool = True
    path: str = "/v2/health/ready"
    interval: float = 1.0
    timeout: float = 1.0
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1


@dataclass(frozen=True)
class Resilience:
    retries: Retries = field(default_factory=Retries)
    outlier_detection: OutlierDetection = field(default_factory=OutlierDetection)
    circuit_breakers: CircuitBreakers = field(default_factory=CircuitBreakers)
    health_check: HealthCheck = field(default_factory=HealthCheck)
    load_balancing: str = "least_request"


def read_resilience(r: Reader, node: yaml.Node, where: str, base: Resilience) -> Resilience:
    """Override `base` with the keys given in a `resilience:` block."""
    keys = r.mapping(node, where, {f.name for f in fields(Resilience)})
    changes: dict[str, object] = {}
    for key, (_, value_node) in keys.items():
        fieldname = f"{where}.{key}"
        if key == "load_balancing":
            value = r.scalar(value_node, fieldname)
            if value not in LOAD_BALANCING:
                r.fail(
                    value_node, fieldname, f"{value!r} is not one of: {', '.join(LOAD_BALANCING)}"
                )
            else:
                changes[key] = value
        elif key == "health_check" and isinstance(value_node, yaml.ScalarNode):
            value = r.scalar(value_node, fieldname)
            if not isinstance(value, bool):
                r.fail(value_node, fieldname, "must be a mapping, or false to turn it off")
            else:
                changes[key] = replace(base.health_check, enabled=value)
        else:
            changes[key] = r.block(value_node, fieldname, getattr(base, key))
    retries = changes.get("retries")
    if isinstance(retries, Retries):
        unknown = sorted(set(retries.conditions) - RETRY_CONDITIONS)
        if unknown:
            r.fail(
                keys["retries"][1],
                f"{where}.retries.conditions",
                f"unknown retry condition(s) {unknown}; known: {sorted(RETRY_CONDITIONS)}",
            )
    return replace(base, **changes)
