"""Envoy filters for each model's `limits` (docs/api-management.md#limits). Pure: no I/O.

- rate: one `local_ratelimit` filter on the gateway listener (its config delivered by
  ECDS, see `api_filters`; it limits nothing without a `rate`); a token bucket per model
  and consumer (dynamic descriptors), the model told apart by the request path, so that
  the path, pin-header and split routes of a model share one bucket per consumer;
- quota: the `ratelimit` filter (its config, with the failure mode, by ECDS) asks the
  control plane's rate limit service (`control_plane/quota.py`) per request, through the
  bootstrap's `xds_cluster`; each route carries the descriptor (model, quota, consumer);
- max_body: the `buffer` filter, on for the model's routes only; a request that declares a
  larger body (content-length) takes the model's `oversize` route instead, to a model server
  that reads and drops the body before its 413 (`oversize_route`);
- priority: `low` consumers' requests take twin routes on Envoy's DEFAULT routing
  priority, whose per-version circuit-breaker pool is small (`with_priorities`).
The listener's filters are the same for every routing file (`http_filters`): an edit of
limits changes routes or an ECDS resource, never the listener.

The consumer is the `x-infergate-consumer` header (set by the auth filters when consumers
are configured); without it a request counts as the consumer `anonymous`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from datetime import timedelta

from envoy.config.cluster.v3.circuit_breaker_pb2 import CircuitBreakers
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.base_pb2 import (
    DataSource,
    HeaderValue,
    HeaderValueOption,
    RoutingPriority,
    RuntimeFractionalPercent,
)
from envoy.config.core.v3.config_source_pb2 import ApiVersion
from envoy.config.core.v3.grpc_service_pb2 import GrpcService
from envoy.config.ratelimit.v3.rls_pb2 import RateLimitServiceConfig
from envoy.config.route.v3.route_components_pb2 import (
    HeaderMatcher,
    Route,
    RouteAction,
    RouteMatch,
)
from envoy.config.route.v3.route_components_pb2 import RateLimit as Descriptor
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.extensions.common.ratelimit.v3.ratelimit_pb2 import (
    LocalRateLimitDescriptor,
    RateLimitDescriptor,
)
from envoy.extensions.filters.http.buffer.v3.buffer_pb2 import Buffer, BufferPerRoute
from envoy.extensions.filters.http.local_ratelimit.v3.local_rate_limit_pb2 import LocalRateLimit
from envoy.extensions.filters.http.lua.v3.lua_pb2 import Lua, LuaPerRoute
from envoy.extensions.filters.http.ratelimit.v3.rate_limit_pb2 import (
    RateLimit,
    RateLimitPerRoute,
)
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (  # noqa: E501
    HttpFilter,
)
from envoy.type.matcher.v3.regex_pb2 import RegexMatcher
from envoy.type.matcher.v3.string_pb2 import StringMatcher
from envoy.type.v3.percent_pb2 import FractionalPercent
from envoy.type.v3.range_pb2 import Int64Range
from envoy.type.v3.token_bucket_pb2 import TokenBucket
from google.protobuf.any_pb2 import Any
from google.protobuf.message import Message
from google.protobuf.wrappers_pb2 import BoolValue, UInt32Value

from control_plane.config import Limits, Model, Rate, RoutingConfig
from control_plane.resources import Resources

CONSUMER_HEADER = "x-infergate-consumer"
ANONYMOUS = "anonymous"
QUOTA_DOMAIN = "infergate"
XDS_CLUSTER = "xds_cluster"  # the bootstrap's cluster to the control plane (gateway/bootstrap.py)
QUOTA_TIMEOUT = timedelta(milliseconds=500)  # a slower answer counts as the service failing
MIN_FILL = 0.05  # Envoy's shortest token bucket fill interval, seconds
MAX_CONSUMERS = 10_000  # token buckets kept per model (least recently used go first)
RATE_FILTER = "envoy.filters.http.local_ratelimit"
QUOTA_FILTER = "envoy.filters.http.ratelimit"
BODY_FILTER = "envoy.filters.http.buffer"
REROUTE_FILTER = "envoy.filters.http.lua"
MAX_BODY_HEADER = "x-infergate-max-body"  # model_servers/server.py reads it
# A body up to this much over max_body is read by Envoy in one go and refused by the buffer
# filter (its 413 is read, no reset); beyond it the oversize route takes the request.
OVERSIZE_SLACK = 64 * 1024
REROUTE = "reroute"  # the Lua filter's source code
REROUTE_LUA = "function envoy_on_request(handle) handle:clearRouteCache() end"


def _pack(message: Message) -> Any:
    packed = Any()
    packed.Pack(message)
    return packed


def _all() -> RuntimeFractionalPercent:
    return RuntimeFractionalPercent(
        default_value=FractionalPercent(numerator=100, denominator=FractionalPercent.HUNDRED)
    )


def token_bucket(rate: Rate, burst: int | None) -> TokenBucket:
    """Refill `rate` in the smallest steps Envoy allows (at least 50 ms apart): 50/s adds
    5 tokens every 100 ms. The bucket holds `burst` (default: one unit of the rate)."""
    most = min(rate.requests, math.floor(rate.seconds / MIN_FILL))
    steps = next(k for k in range(most, 0, -1) if rate.requests % k == 0)
    return TokenBucket(
        max_tokens=burst or rate.requests,
        tokens_per_fill=UInt32Value(value=rate.requests // steps),
        fill_interval=timedelta(seconds=rate.seconds / steps),
    )


def _consumer_actions(*first: Descriptor.Action) -> list[Descriptor]:
    """Two descriptors, of which a request produces exactly one: `first` plus the consumer
    header, or `first` plus `consumer: anonymous` when the header is absent."""
    named = Descriptor.Action(
        request_headers=Descriptor.Action.RequestHeaders(
            header_name=CONSUMER_HEADER, descriptor_key="consumer"
        )
    )
    anonymous = Descriptor.Action(
        header_value_match=Descriptor.Action.HeaderValueMatch(
            descriptor_key="consumer",
            descriptor_value=ANONYMOUS,
            expect_match=BoolValue(value=False),
            headers=[HeaderMatcher(name=CONSUMER_HEADER, present_match=True)],
        )
    )
    return [Descriptor(actions=[*first, named]), Descriptor(actions=[*first, anonymous])]


def _model_of_path(model: str) -> Descriptor.Action:
    """`model: <name>` for every request to the model's routes (its path prefix)."""
    pattern = f"^/v2/models/{model}([/?#].*)?$"
    return Descriptor.Action(
        header_value_match=Descriptor.Action.HeaderValueMatch(
            descriptor_key="model",
            descriptor_value=model,
            headers=[
                HeaderMatcher(
                    name=":path",
                    string_match=StringMatcher(safe_regex=RegexMatcher(regex=pattern)),
                )
            ],
        )
    )


def rate_config(config: RoutingConfig) -> Any:
    """The rate filter's config (by ECDS): one bucket per model and consumer; rejected
    requests get 429 and `retry-after` (the longest refill interval of the models: a client
    that waits that long finds a token). Without any `rate`, `rate_fallback`."""
    descriptors, rate_limits, waits = [], [], []
    for model in config.models:
        if not (model.limits and model.limits.rate):
            continue
        bucket = token_bucket(model.limits.rate, model.limits.burst)
        descriptors.append(
            LocalRateLimitDescriptor(
                entries=[
                    RateLimitDescriptor.Entry(key="model", value=model.name),
                    RateLimitDescriptor.Entry(key="consumer"),  # any value: one bucket each
                ],
                token_bucket=bucket,
            )
        )
        rate_limits += _consumer_actions(_model_of_path(model.name))
        waits.append(bucket.fill_interval.ToTimedelta().total_seconds())
    if not descriptors:
        return rate_fallback()
    return _pack(
        LocalRateLimit(
            stat_prefix="limits_rate",
            filter_enabled=_all(),
            filter_enforced=_all(),
            descriptors=descriptors,
            rate_limits=rate_limits,
            max_dynamic_descriptors=UInt32Value(value=MAX_CONSUMERS),  # per model descriptor
            response_headers_to_add=[
                HeaderValueOption(
                    header=HeaderValue(key="retry-after", value=str(math.ceil(max(waits))))
                )
            ],
        )
    )


def rate_fallback() -> Any:
    """The rate filter's config without any `rate`, and for when Envoy has none from the
    control plane (its ECDS default: the config never arrived): no limit. Its
    `filter_enabled` is unset, so the filter passes every request on at once (0% enabled)."""
    return _pack(LocalRateLimit(stat_prefix="limits_rate"))


def quota_config(on_failure: str = "closed") -> Any:
    """The quota filter's config (by ECDS, as the failure mode may change): it asks the
    control plane on the routes that carry a quota descriptor (on for those routes only);
    `quota_service.on_failure: closed` rejects with 503 when it can't. Closed is also the
    default, for an Envoy that never got the config (the control plane is then unreachable
    anyway)."""
    closed = on_failure == "closed"
    rls = RateLimit(
        domain=QUOTA_DOMAIN,
        timeout=QUOTA_TIMEOUT,
        failure_mode_deny=closed,
        rate_limit_service=RateLimitServiceConfig(
            grpc_service=GrpcService(envoy_grpc=GrpcService.EnvoyGrpc(cluster_name=XDS_CLUSTER)),
            transport_api_version=ApiVersion.V3,
        ),
        stat_prefix="limits_quota",
    )
    if closed:
        rls.status_on_error.code = 503
    return _pack(rls)


def http_filters() -> list[HttpFilter]:
    """The limit filters of the gateway listener, the same for every routing file: each off
    (`disabled`) until a route or virtual host turns it on, except the rate filter, whose
    config (by ECDS, see `api_filters`) limits nothing without a `rate`. The configs given
    here for the rate and quota filters are their defaults."""
    # Routes were matched before the auth filters named the consumer: with low consumers
    # the route cache is cleared, so that a low consumer's request takes its twin route.
    reroute = Lua(source_codes={REROUTE: DataSource(inline_string=REROUTE_LUA)})
    return [
        HttpFilter(name=REROUTE_FILTER, typed_config=_pack(reroute), disabled=True),
        # The body first: a request too large spends no rate or quota.
        HttpFilter(
            name=BODY_FILTER,
            typed_config=_pack(Buffer(max_request_bytes=UInt32Value(value=1))),
            disabled=True,
        ),
        HttpFilter(name=RATE_FILTER, typed_config=rate_fallback()),
        HttpFilter(name=QUOTA_FILTER, typed_config=quota_config(), disabled=True),
    ]


def virtual_host_configs(config: RoutingConfig) -> dict[str, Any]:
    """Per-filter configs of the gateway's virtual host: with low consumers, the route
    cache is cleared after the auth filters (see with_priorities)."""
    return {REROUTE_FILTER: _pack(LuaPerRoute(name=REROUTE))} if low_consumers(config) else {}


def quota_key(rate: Rate) -> str:
    """The descriptor value that tells the quota service the budget: `requests/seconds`."""
    return f"{rate.requests}/{rate.seconds}"


def per_route_configs(model: Model) -> dict[str, Any]:
    """The quota descriptor and the body limit on each route of `model`."""
    limits = model.limits
    out: dict[str, Any] = {}
    if limits and limits.quota:
        keys = [("model", model.name), ("quota", quota_key(limits.quota))]
        first = [
            Descriptor.Action(
                generic_key=Descriptor.Action.GenericKey(descriptor_key=k, descriptor_value=v)
            )
            for k, v in keys
        ]
        out[QUOTA_FILTER] = _pack(RateLimitPerRoute(rate_limits=_consumer_actions(*first)))
    if limits and limits.max_body:
        size = UInt32Value(value=limits.max_body)
        out[BODY_FILTER] = _pack(BufferPerRoute(buffer=Buffer(max_request_bytes=size)))
    return out


def oversize_route(model: Model, split: RouteAction) -> Route | None:
    """The route of requests to `model` that declare a body far over its `max_body`: to a
    version of the split (no mirror) with the limit in `x-infergate-max-body`, so that the
    model server reads and drops the body, then answers 413 (before it resolves the model).
    Envoy's own early 413 would close the connection with the body unread, and a client
    that sends the whole body before reading gets a reset (envoyproxy/envoy#36080)."""
    limit = model.limits.max_body if model.limits else 0
    if not limit:
        return None
    start = limit + OVERSIZE_SLACK + 1
    declared = HeaderMatcher(name="content-length", range_match=Int64Range(start=start))
    declared.range_match.end = 2**63 - 1
    action = RouteAction()
    action.CopyFrom(split)
    del action.request_mirror_policies[:]
    route = Route(
        name=f"{model.name}/oversize",
        match=RouteMatch(path_separated_prefix=f"/v2/models/{model.name}", headers=[declared]),
        route=action,
    )
    route.request_headers_to_add.append(
        HeaderValueOption(
            header=HeaderValue(key=MAX_BODY_HEADER, value=str(limit)),
            append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        )
    )
    return route


# --- priority: low consumers get a pool of their own, smaller than everyone else's ------------
def low_consumers(config: RoutingConfig) -> list[str]:
    priority = config.consumers.priority if config.consumers else {}
    return sorted(name for name, level in priority.items() if level == "low")


def _low_twin(route: Route, low: list[str]) -> Route:
    """`route` for low consumers only: routing priority DEFAULT (the small pool)."""
    twin = Route()
    twin.CopyFrom(route)
    twin.name = f"{route.name}/low"
    pattern = "^(" + "|".join(re.escape(n) for n in low) + ")$"
    twin.match.headers.append(
        HeaderMatcher(
            name=CONSUMER_HEADER,
            string_match=StringMatcher(safe_regex=RegexMatcher(regex=pattern)),
        )
    )
    twin.route.priority = RoutingPriority.DEFAULT
    return twin


def _two_pools(cluster: Cluster, low_requests: int) -> Cluster:
    """The cluster's circuit breakers as the HIGH pool (normal and high consumers) and a
    DEFAULT pool of `low_requests` (low consumers); overflow is shed at once with 503."""
    out = Cluster()
    out.CopyFrom(cluster)
    (everyone,) = out.circuit_breakers.thresholds
    high = CircuitBreakers.Thresholds()
    high.CopyFrom(everyone)
    high.priority = RoutingPriority.HIGH
    for name in ("max_connections", "max_requests", "max_pending_requests"):
        getattr(everyone, name).value = low_requests
    out.circuit_breakers.thresholds.append(high)
    return out


def _with_low_twins(config: RouteConfiguration, low: list[str]) -> RouteConfiguration:
    """A copy of a route configuration where each route has its `low` twin just before it."""
    routes = RouteConfiguration()
    routes.CopyFrom(config)
    host = routes.virtual_hosts[0]
    ordered = []
    for route in host.routes:
        if route.HasField("route"):
            route.route.priority = RoutingPriority.HIGH
            ordered.append(_low_twin(route, low))
        ordered.append(route)
    del host.routes[:]
    host.routes.extend(ordered)
    return routes


def with_priorities(resources: Resources, config: RoutingConfig) -> Resources:
    """Copies of the gateway routes and model clusters that shed `low` consumers first:
    each model route gets a twin for them just before it, on routing priority DEFAULT,
    while every other request takes priority HIGH; per version, the DEFAULT pool allows
    `limits.low_priority_requests` in flight. Unchanged without low consumers."""
    low = low_consumers(config)
    if not low:
        return resources
    budgets = {m.name: (m.limits or Limits()).low_priority_requests for m in config.models}
    routes = {
        name: _with_low_twins(routes, low)
        for name, routes in resources.routes.items()
        if name.startswith("models/")  # the gateway's model routes (translate.model_routes_name)
    }
    clusters = {}
    for name, cluster in resources.clusters.items():
        model, _, version = name.partition("/")
        http = "/" not in version  # `model/version/grpc` serves the gRPC listeners' routes
        clusters[name] = _two_pools(cluster, budgets[model]) if http else cluster
    return dataclasses.replace(
        resources,
        clusters=clusters,
        routes={**resources.routes, **routes},
    )
