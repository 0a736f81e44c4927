"""What the translator produces: Envoy's resources of one config, by name, per xDS kind.

Its own module so that the translator's helpers (`api_filters`, `translate_limits`) and its
readers (`snapshot`, `access_log`) depend on the type, not on the translator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.extension_pb2 import TypedExtensionConfig
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.config.route.v3.scoped_route_pb2 import ScopedRouteConfiguration


@dataclass(frozen=True)
class Resources:
    """Envoy resources of one config, by name, per xDS resource kind."""

    clusters: dict[str, Cluster]
    endpoints: dict[str, ClusterLoadAssignment]
    listeners: dict[str, Listener]
    routes: dict[str, RouteConfiguration]
    scoped_routes: dict[str, ScopedRouteConfiguration]
    # Per route configuration, the clusters its routes name (make-before-break per config).
    route_clusters: dict[str, frozenset[str]]
    # Per actively health-checked cluster, its health-check timeout: how long a new
    # cluster may stay warming in Envoy after its endpoints arrive (its first check).
    health_check_timeouts: dict[str, float]
    # HTTP filter configs by name, delivered by ECDS (see api_filters.http_filters).
    extension_configs: dict[str, TypedExtensionConfig] = field(default_factory=dict)
