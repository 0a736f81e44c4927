"""The seam where API management (the routing YAML's `consumers`, `access` and `limits`)
enters the translation: the HTTP filters of the `gateway` listener, in order, and each
model route's per-filter configuration. Without those keys both are empty and the gateway
is open to all, as before."""

from __future__ import annotations

from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (  # noqa: E501
    HttpFilter,
)
from google.protobuf.any_pb2 import Any

from control_plane.config import Model, RoutingConfig


def http_filters(config: RoutingConfig) -> list[HttpFilter]:
    """The filters that run before the router on the `gateway` listener: who the caller
    is (auth), then what the caller may spend (limits)."""
    return []


def per_route_configs(model: Model) -> dict[str, Any]:
    """Filter name -> typed per-route config, for every route of `model`."""
    return {}
