"""Translate the routing model into Envoy xDS resources. Pure: no I/O, no state.

One cluster per model version (type EDS, endpoints from ADS), and per model a route
configuration `models/<m>` (so an edit to one model sends only its routes), in match order:
  1. `/v2/models/<m>/versions/<v>[/...]` -> that version only;
  2. the pin header naming a version    -> that version only;
  3. `/v2/models/<m>[/...]`             -> weighted split, with an optional mirror.
The gateway listener picks the route configuration by scoped routes (SRDS): the scope key is
the path's 2nd and 3rd segments, (`models`, `<m>`) or (`health`, `live`); see `_scopes`.

The messages are xds-protos' (Envoy's API compiled for Google's protobuf runtime, whose
C core builds and serializes a 1,000-model snapshot in milliseconds; envoy-data-plane's
pure-Python messages took 21 s, see docs/xds-scale.md).
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from envoy.config.cluster.v3.circuit_breaker_pb2 import CircuitBreakers
from envoy.config.cluster.v3.cluster_pb2 import Cluster, LoadBalancingPolicy
from envoy.config.cluster.v3.outlier_detection_pb2 import OutlierDetection
from envoy.config.common.mutation_rules.v3.mutation_rules_pb2 import HeaderMutation
from envoy.config.core.v3.address_pb2 import Address, SocketAddress
from envoy.config.core.v3.base_pb2 import (
    DataSource,
    HeaderValue,
    HeaderValueOption,
    RuntimeFractionalPercent,
    TransportSocket,
)
from envoy.config.core.v3.config_source_pb2 import (
    AggregatedConfigSource,
    ApiVersion,
    ConfigSource,
)
from envoy.config.core.v3.extension_pb2 import TypedExtensionConfig
from envoy.config.core.v3.health_check_pb2 import HealthCheck
from envoy.config.core.v3.protocol_pb2 import Http2ProtocolOptions
from envoy.config.endpoint.v3.endpoint_components_pb2 import (
    Endpoint,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.listener.v3.listener_components_pb2 import Filter, FilterChain
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.config.route.v3.route_components_pb2 import (
    DirectResponseAction,
    HeaderMatcher,
    RetryPolicy,
    Route,
    RouteAction,
    RouteMatch,
    VirtualHost,
    WeightedCluster,
)
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.config.route.v3.scoped_route_pb2 import ScopedRouteConfiguration
from envoy.extensions.filters.http.router.v3.router_pb2 import Router
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (  # noqa: E501
    HttpConnectionManager,
    HttpFilter,
    LocalReplyConfig,
    Rds,
    ScopedRds,
    ScopedRoutes,
)
from envoy.extensions.http.early_header_mutation.header_mutation.v3 import (
    header_mutation_pb2 as early_mutation,
)
from envoy.extensions.load_balancing_policies.client_side_weighted_round_robin.v3.client_side_weighted_round_robin_pb2 import (  # noqa: E501
    ClientSideWeightedRoundRobin,
)
from envoy.extensions.retry.host.previous_hosts.v3.previous_hosts_pb2 import (
    PreviousHostsPredicate,
)
from envoy.extensions.transport_sockets.tls.v3.secret_pb2 import SdsSecretConfig
from envoy.extensions.transport_sockets.tls.v3.tls_pb2 import (
    CommonTlsContext,
    UpstreamTlsContext,
)
from envoy.extensions.upstreams.http.v3.http_protocol_options_pb2 import HttpProtocolOptions
from envoy.type.matcher.v3.string_pb2 import StringMatcher
from envoy.type.v3.percent_pb2 import FractionalPercent
from google.protobuf.any_pb2 import Any
from google.protobuf.message import Message
from google.protobuf.wrappers_pb2 import BoolValue, UInt32Value

from control_plane import api_filters
from control_plane.config import Endpoint as ServerAddress
from control_plane.config import Model, RoutingConfig
from control_plane.resilience import HealthCheck as HealthCheckPolicy
from control_plane.resilience import Resilience, Retries
from control_plane.resources import Resources
from control_plane.upstream_tls import CA_SECRET, CLIENT_SECRET

LISTENER_NAME = "gateway"
GATEWAY_ROUTES = "gateway"  # the route configuration of the gateway's own paths
# The scope key's source: the path without its query, plus `/-/-` so that `/v2` has a key
# too (("-", "-"): server metadata); set before routing, never taken from the client.
SCOPE_HEADER = "x-infergate-scope"
METADATA_SCOPE = ("-", "-")
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
LB_POLICIES = {
    "least_request": Cluster.LEAST_REQUEST,
    "round_robin": Cluster.ROUND_ROBIN,
    "random": Cluster.RANDOM,
}


def cluster_name(model: str, version: str) -> str:
    return f"{model}/{version}"


def model_routes_name(model: str) -> str:
    """The route configuration of a model's HTTP routes on the gateway listener."""
    return f"models/{model}"


def _ads() -> ConfigSource:
    return ConfigSource(ads=AggregatedConfigSource(), resource_api_version=ApiVersion.V3)


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


def _u32(value: int) -> UInt32Value:
    return UInt32Value(value=value)


def _pack(message: Message) -> Any:
    packed = Any()
    packed.Pack(message)
    return packed


def _lb(policy: str) -> dict:
    if policy == "orca_weighted":
        # Weights from the ORCA load reports that model servers attach to each response.
        wrr = ClientSideWeightedRoundRobin(
            blackout_period=timedelta(seconds=1), weight_update_period=timedelta(seconds=1)
        )
        return {
            "load_balancing_policy": LoadBalancingPolicy(
                policies=[
                    LoadBalancingPolicy.Policy(
                        typed_extension_config=TypedExtensionConfig(
                            name="envoy.load_balancing_policies.client_side_weighted_round_robin",
                            typed_config=_pack(wrr),
                        )
                    )
                ]
            )
        }
    return {"lb_policy": LB_POLICIES[policy]}


def _health_checks(check: HealthCheckPolicy) -> list[HealthCheck]:
    if not check.enabled:
        return []
    return [
        HealthCheck(
            timeout=_seconds(check.timeout),
            interval=_seconds(check.interval),
            unhealthy_threshold=_u32(check.unhealthy_threshold),
            healthy_threshold=_u32(check.healthy_threshold),
            http_health_check=HealthCheck.HttpHealthCheck(path=check.path),
        )
    ]


def _cluster(name: str, policy: Resilience, tls: bool = False) -> Cluster:
    cluster = Cluster()
    cluster.CopyFrom(_cluster_template(policy))
    cluster.name = name
    if tls:
        cluster.transport_socket.CopyFrom(_upstream_tls())
    return cluster


def _upstream_tls() -> TransportSocket:
    """Mutual TLS to the model servers (health checks too): Envoy's client certificate and
    the CA it trusts are SDS secrets over ADS, so a rotation needs no cluster change."""
    context = UpstreamTlsContext(
        common_tls_context=CommonTlsContext(
            tls_certificate_sds_secret_configs=[
                SdsSecretConfig(name=CLIENT_SECRET, sds_config=_ads())
            ],
            validation_context_sds_secret_config=SdsSecretConfig(name=CA_SECRET, sds_config=_ads()),
        )
    )
    return TransportSocket(name="envoy.transport_sockets.tls", typed_config=_pack(context))


@functools.lru_cache(maxsize=256)
def _cluster_template(policy: Resilience) -> Cluster:
    """Everything of a cluster but its name; built once per policy (copy before changing)."""
    od, cb = policy.outlier_detection, policy.circuit_breakers
    return Cluster(
        type=Cluster.EDS,
        eds_cluster_config=Cluster.EdsClusterConfig(eds_config=_ads()),
        connect_timeout=timedelta(seconds=1),
        outlier_detection=OutlierDetection(
            consecutive_5xx=_u32(od.consecutive_5xx),
            consecutive_local_origin_failure=_u32(od.consecutive_connect_failures),
            split_external_local_origin_errors=True,
            interval=_seconds(od.interval),
            base_ejection_time=_seconds(od.ejection_time),
            max_ejection_percent=_u32(od.max_ejection_percent),
        ),
        circuit_breakers=CircuitBreakers(
            thresholds=[
                CircuitBreakers.Thresholds(
                    max_connections=_u32(cb.max_connections),
                    max_pending_requests=_u32(cb.max_pending_requests),
                    max_requests=_u32(cb.max_requests),
                    max_retries=_u32(cb.max_retries),
                )
            ]
        ),
        health_checks=_health_checks(policy.health_check),
        # An endpoint removed from EDS leaves at once, even while it passes health checks.
        ignore_health_on_host_removal=True,
        # A host that passes its first health check takes traffic at once: Envoy's default
        # merges health changes for 1 s, so a replica registered just before another one
        # died got no retry (its only "healthy" peer was the dead one) for up to a second.
        common_lb_config=Cluster.CommonLbConfig(update_merge_window=timedelta(0)),
        **_lb(policy.load_balancing),
    )


def load_assignment(name: str, endpoints: Sequence[ServerAddress]) -> ClusterLoadAssignment:
    """The endpoints (`host`, `port`) of cluster `name`."""
    return ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            LocalityLbEndpoints(
                lb_endpoints=[
                    LbEndpoint(
                        endpoint=Endpoint(
                            address=Address(
                                socket_address=SocketAddress(address=e.host, port_value=e.port)
                            )
                        )
                    )
                    for e in endpoints
                ]
            )
        ],
    )


def _percent(value: float) -> FractionalPercent:
    return FractionalPercent(numerator=round(value * 10_000), denominator=FractionalPercent.MILLION)


def _retry_policy(retries: Retries) -> RetryPolicy:
    return RetryPolicy(
        retry_on=",".join(retries.conditions),
        num_retries=_u32(retries.attempts),
        per_try_timeout=_seconds(retries.per_try_timeout) if retries.per_try_timeout else None,
        retry_back_off=RetryPolicy.RetryBackOff(
            base_interval=_seconds(retries.backoff), max_interval=_seconds(retries.backoff * 10)
        ),
        # A retry goes to another replica than the one that just failed, where there is one.
        retry_host_predicate=[
            RetryPolicy.RetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts",
                typed_config=_pack(PreviousHostsPredicate()),
            )
        ],
        # Least-request prefers a dead host (it has no active request): with two hosts it is
        # picked 3 times in 4, so 12 re-picks would still choose it 3% of the time; 50 re-picks
        # make that 0.75^50 (host selection is cheap, and only retries do it).
        host_selection_retry_max_attempts=50,
    )


def _action(model: Model, cluster: str | None = None, **target) -> RouteAction:
    action = RouteAction()
    action.CopyFrom(_action_template(model.timeout, model.resilience.retries))
    if cluster is not None:
        action.cluster = cluster
    for name, value in target.items():
        getattr(action, name).CopyFrom(value)
    return action


@functools.lru_cache(maxsize=256)
def _action_template(timeout: float, retries: Retries) -> RouteAction:
    """Timeout and retry policy of a route, built once per setting (copy before changing)."""
    return RouteAction(timeout=_seconds(timeout), retry_policy=_retry_policy(retries))


def _split_action(model: Model, name_of: Callable[[str, str], str] = cluster_name) -> RouteAction:
    """The weighted split over the model's versions (clusters named by `name_of`)."""
    live = [(v, w) for v, w in model.traffic if w > 0]
    if len(live) == 1:
        action = _action(model, cluster=name_of(model.name, live[0][0]))
    else:
        action = _action(
            model,
            weighted_clusters=WeightedCluster(
                clusters=[
                    WeightedCluster.ClusterWeight(name=name_of(model.name, v), weight=_u32(w))
                    for v, w in live
                ]
            ),
        )
    if model.shadow and model.shadow.percent > 0:
        action.request_mirror_policies.append(
            RouteAction.RequestMirrorPolicy(
                cluster=name_of(model.name, model.shadow.version),
                runtime_fraction=RuntimeFractionalPercent(
                    default_value=_percent(model.shadow.percent)
                ),
            )
        )
    return action


def _pin_routes(
    model: Model, kind: str, match: RouteMatch, name_of: Callable[[str, str], str] = cluster_name
) -> list[Route]:
    """Per version, the route that `match` plus the pin header naming that version takes to
    the version's cluster (named by `name_of`)."""
    routes = []
    for v in model.versions:
        pinned = RouteMatch(
            headers=[HeaderMatcher(name=model.pin_header, string_match=StringMatcher(exact=v.name))]
        )
        pinned.MergeFrom(match)
        routes.append(
            Route(
                name=f"{model.name}/{kind}/{v.name}",
                match=pinned,
                route=_action(model, cluster=name_of(model.name, v.name)),
            )
        )
    return routes


def _model_routes(model: Model) -> list[Route]:
    base = f"/v2/models/{model.name}"
    routes = [
        Route(
            name=f"{model.name}/path/{v.name}",
            match=RouteMatch(path_separated_prefix=f"{base}/versions/{v.name}"),
            route=_action(model, cluster=cluster_name(model.name, v.name)),
        )
        for v in model.versions
    ]
    routes += _pin_routes(model, "pin", RouteMatch(path_separated_prefix=base))
    routes.append(
        Route(
            name=f"{model.name}/split",
            match=RouteMatch(path_separated_prefix=base),
            route=_split_action(model),
        )
    )
    per_route = api_filters.per_route_configs(model)
    for route in routes:
        for name, config in per_route.items():
            route.typed_per_filter_config[name].CopyFrom(config)
    if oversize := api_filters.oversize_route(model, routes[-1].route, per_route):
        routes.insert(0, oversize)
    return routes


# KServe V2 extensions the gateway passes through to the model servers (not
# `model_repository`: the gateway routes no repository endpoint).
GATEWAY_EXTENSIONS = ["binary_tensor_data", "parameters"]
VERSION = importlib.metadata.version("infergate")  # read once: a lookup takes about 0.4 ms


def _gateway_routes(config: RoutingConfig) -> list[Route]:
    """The gateway's own `/v2/health/live`, `/v2/health/ready` and server metadata `/v2`,
    answered by Envoy (per model readiness is `/v2/models/<m>[/versions/<v>]/ready`, routed
    to the model)."""
    answers = {name: (f"/v2/health/{name}", {name: True}) for name in ("live", "ready")}
    metadata = {
        "name": "infergate",
        "version": VERSION,
        "extensions": GATEWAY_EXTENSIONS,
    }
    answers["metadata"] = ("/v2", metadata)
    return [
        Route(
            name=f"gateway/{name}",
            match=RouteMatch(path=path),
            direct_response=DirectResponseAction(
                status=200, body=DataSource(inline_string=json.dumps(answer))
            ),
            response_headers_to_add=[
                HeaderValueOption(header=HeaderValue(key="content-type", value="application/json"))
            ],
            typed_per_filter_config=api_filters.open_route_configs(config),
        )
        for name, (path, answer) in answers.items()
    ]


def _scope_key_builder() -> ScopedRoutes.ScopeKeyBuilder:
    """The key of a request: segments 2 and 3 of SCOPE_HEADER, split on `/`."""
    extractor = ScopedRoutes.ScopeKeyBuilder.FragmentBuilder.HeaderValueExtractor
    return ScopedRoutes.ScopeKeyBuilder(
        fragments=[
            ScopedRoutes.ScopeKeyBuilder.FragmentBuilder(
                header_value_extractor=extractor(
                    name=SCOPE_HEADER, element_separator="/", index=index
                )
            )
            for index in (2, 3)
        ]
    )


def _scope_header() -> TypedExtensionConfig:
    """Sets SCOPE_HEADER before routing: the path without its query, plus `/-/-`, so that
    `/v2` has a key and `/v2/models/m?x=1` is in m's scope. A client's own value is
    replaced."""
    value = HeaderValueOption(
        header=HeaderValue(key=SCOPE_HEADER, value="%PATH(NQ)%/-/-"),
        append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )
    mutation = early_mutation.HeaderMutation(mutations=[HeaderMutation(append=value)])
    return TypedExtensionConfig(
        name="envoy.http.early_header_mutation.header_mutation", typed_config=_pack(mutation)
    )


def _scoped_routing() -> dict:
    """The gateway listener's routing: route configurations chosen per request by scope
    (SRDS), each fetched by RDS; all over ADS."""
    scoped = ScopedRoutes(
        name="gateway-scopes",
        scope_key_builder=_scope_key_builder(),
        rds_config_source=_ads(),
        scoped_rds=ScopedRds(scoped_rds_config_source=_ads()),
    )
    return {"scoped_routes": scoped, "early_header_mutation_extensions": [_scope_header()]}


class _PerBuild:
    """Memoize a function from one translation to the next: what a build used is kept for
    the next build, the rest is dropped. (A fixed-size LRU cache thrashes once a config has
    more models than its size: at 5,000 models every edit translated and encoded every
    model again, 2.3 s instead of tens of ms.)"""

    def __init__(self, fn: Callable[..., typing.Any]) -> None:
        self.fn = fn
        self.last: dict[tuple, typing.Any] = {}
        self.now: dict[tuple, typing.Any] = {}
        functools.update_wrapper(self, fn)

    def __call__(self, *args: typing.Any) -> typing.Any:
        hit = self.now.get(args)
        if hit is None:
            hit = self.last.get(args)
            if hit is None:
                hit = self.fn(*args)
            self.now[args] = hit
        return hit

    def next_build(self) -> None:
        self.last, self.now = self.now, {}

    def cache_clear(self) -> None:
        self.last, self.now = {}, {}


@_PerBuild
def _scope(name: str, key: tuple[str, str], route_config: str) -> ScopedRouteConfiguration:
    """(shared: must not be modified)"""
    fragments = [ScopedRouteConfiguration.Key.Fragment(string_key=part) for part in key]
    return ScopedRouteConfiguration(
        name=name,
        route_configuration_name=route_config,
        key=ScopedRouteConfiguration.Key(fragments=fragments),
    )


def _listener(
    name: str,
    address: ServerAddress,
    routing: dict,
    filters: Sequence[HttpFilter] = (),
    local_reply: LocalReplyConfig | None = None,
) -> Listener:
    """An HTTP listener (HTTP/1.1, or HTTP/2 when the client starts with its preface, as
    gRPC does) whose routes come from `routing` (HCM fields: `_rds(name)` or
    `_scoped_routing()`); `filters` run before the router."""
    hcm = HttpConnectionManager(
        local_reply_config=local_reply,
        stat_prefix=name.replace("/", "_"),
        http_filters=[
            *filters,
            HttpFilter(name="envoy.filters.http.router", typed_config=_pack(Router())),
        ],
        **routing,
    )
    return Listener(
        name=name,
        # One socket per address: a second Envoy on the same address fails to bind instead
        # of silently taking a share of the connections.
        enable_reuse_port=BoolValue(value=False),
        address=Address(
            socket_address=SocketAddress(address=address.host, port_value=address.port)
        ),
        filter_chains=[
            FilterChain(
                filters=[
                    Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=_pack(hcm),
                    )
                ]
            )
        ],
    )


def _rds(route_config: str) -> dict:
    return {"rds": Rds(config_source=_ads(), route_config_name=route_config)}


def grpc_cluster_name(model: str, version: str) -> str:
    return f"{model}/{version}/grpc"


def _grpc_cluster(name: str, policy: Resilience, tls: bool = False) -> Cluster:
    """A version's gRPC ports: HTTP/2 upstream (over TLS Envoy offers ALPN h2 by itself),
    passive health (outlier detection) only."""
    cluster = _cluster(name, policy, tls)
    del cluster.health_checks[:]
    cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(
        _pack(
            HttpProtocolOptions(
                explicit_http_config=HttpProtocolOptions.ExplicitHttpConfig(
                    http2_protocol_options=Http2ProtocolOptions()
                )
            )
        )
    )
    return cluster


def _grpc_route_config(model: Model) -> RouteConfiguration:
    """Every gRPC call on the model's own listener: pinned by header, else split."""
    pins = _pin_routes(model, "grpc-pin", RouteMatch(prefix="/"), grpc_cluster_name)
    split = Route(
        name=f"{model.name}/grpc-split",
        match=RouteMatch(prefix="/"),
        route=_split_action(model, grpc_cluster_name),
    )
    host = VirtualHost(name=f"grpc-{model.name}", domains=["*"], routes=[*pins, split])
    return RouteConfiguration(name=f"grpc/{model.name}", virtual_hosts=[host])


@_PerBuild
def _translate_model(model: Model, tls: bool) -> Resources:
    """One model's resources but its gateway routes (`tls`: mutual TLS to its servers).
    Models are immutable values, so an edit translates only the models it changed; the
    results are shared and must not be modified."""
    out = Resources({}, {}, {}, {}, {}, {}, {})
    check = model.resilience.health_check
    http, grpc = [], []
    for version in model.versions:
        name = cluster_name(model.name, version.name)
        http.append(name)
        out.clusters[name] = _cluster(name, model.resilience, tls)
        if check.enabled:
            out.health_check_timeouts[name] = check.timeout
        out.endpoints[name] = load_assignment(name, version.endpoints)
        if model.grpc_listen:
            name = grpc_cluster_name(model.name, version.name)
            grpc.append(name)
            out.clusters[name] = _grpc_cluster(name, model.resilience, tls)
            out.endpoints[name] = load_assignment(name, version.grpc_endpoints)
    out.route_clusters[model_routes_name(model.name)] = frozenset(http)
    if model.grpc_listen:
        routes = _grpc_route_config(model)
        out.routes[routes.name] = routes
        out.route_clusters[routes.name] = frozenset(grpc)
        out.listeners[routes.name] = _listener(routes.name, model.grpc_listen, _rds(routes.name))
    return out


@dataclass(frozen=True)
class _Host:
    """What every gateway route configuration's virtual host shares, built once per
    translation; equal (for the cache) when their serialized forms are."""

    configs: dict[str, Any] = field(compare=False)
    fallback: tuple[Route, ...] = field(compare=False)
    key: tuple[bytes, ...] = field(init=False)

    def __post_init__(self) -> None:
        configs = [
            name.encode() + b"\0" + c.SerializeToString() for name, c in self.configs.items()
        ]
        routes = [r.SerializeToString(deterministic=True) for r in self.fallback]
        object.__setattr__(self, "key", (*sorted(configs), b"", *routes))


def _route_config(name: str, routes: Sequence[Route], host: _Host) -> RouteConfiguration:
    return RouteConfiguration(
        name=name,
        virtual_hosts=[
            VirtualHost(
                name="gateway",
                domains=["*"],
                routes=[*routes, *host.fallback],
                typed_per_filter_config=host.configs,
            )
        ],
        request_headers_to_remove=[SCOPE_HEADER],
    )


@_PerBuild
def _model_route_config(model: Model, host: _Host) -> RouteConfiguration:
    """A model's gateway routes (shared: must not be modified)."""
    return _route_config(model_routes_name(model.name), _model_routes(model), host)


def translate(config: RoutingConfig) -> Resources:
    """Build every Envoy resource for a routing config."""
    clusters: dict[str, Cluster] = {}
    endpoints: dict[str, ClusterLoadAssignment] = {}
    timeouts: dict[str, float] = {}
    listeners: dict[str, Listener] = {}
    route_configs: dict[str, RouteConfiguration] = {}
    route_clusters: dict[str, frozenset[str]] = {GATEWAY_ROUTES: frozenset()}
    host = _Host(
        api_filters.virtual_host_configs(config),
        tuple(api_filters.fallback_routes(config)),
    )
    scopes = {
        f"gateway/{name}": _scope(f"gateway/{name}", key, GATEWAY_ROUTES)
        for name, key in (
            ("live", ("health", "live")),
            ("ready", ("health", "ready")),
            ("metadata", METADATA_SCOPE),
        )
    }
    route_configs[GATEWAY_ROUTES] = _route_config(GATEWAY_ROUTES, _gateway_routes(config), host)
    for model in config.models:
        part = _translate_model(model, config.upstream_tls is not None)
        clusters.update(part.clusters)
        endpoints.update(part.endpoints)
        timeouts.update(part.health_check_timeouts)
        listeners.update(part.listeners)
        route_configs.update(part.routes)
        route_clusters.update(part.route_clusters)
        name = model_routes_name(model.name)
        route_configs[name] = _model_route_config(model, host)
        scopes[name] = _scope(name, ("models", model.name), name)
    gateway_filters, extension_configs = api_filters.http_filters(config)
    listeners[LISTENER_NAME] = _listener(
        LISTENER_NAME,
        config.listen,
        _scoped_routing(),
        gateway_filters,
        api_filters.local_reply_config(),
    )
    resources = Resources(
        clusters=clusters,
        endpoints=endpoints,
        listeners=listeners,
        routes=route_configs,
        scoped_routes=scopes,
        route_clusters=route_clusters,
        health_check_timeouts=timeouts,
        extension_configs=extension_configs,
    )
    for memo in (_scope, _translate_model, _model_route_config):
        memo.next_build()
    return api_filters.finish(resources, config)
