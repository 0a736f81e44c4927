"""The seam where API management (the routing YAML's `consumers`, `access` and `limits`)
enters the translation: the HTTP filters of the `gateway` listener, in order, the
per-filter configuration of its virtual host and of each route, and the one error shape of
its local replies. Without those keys the gateway is open to all, as before."""

from __future__ import annotations

from collections.abc import Callable

from envoy.config.accesslog.v3.accesslog_pb2 import (
    AccessLogFilter,
    ComparisonFilter,
    ExtensionFilter,
    ResponseFlagFilter,
    StatusCodeFilter,
)
from envoy.config.core.v3.base_pb2 import DataSource, RuntimeUInt32
from envoy.config.core.v3.config_source_pb2 import (
    AggregatedConfigSource,
    ApiVersion,
    ConfigSource,
    ExtensionConfigSource,
)
from envoy.config.core.v3.extension_pb2 import TypedExtensionConfig
from envoy.config.core.v3.substitution_format_string_pb2 import SubstitutionFormatString
from envoy.config.route.v3.route_components_pb2 import Route, RouteAction
from envoy.extensions.access_loggers.filters.cel.v3.cel_pb2 import ExpressionFilter
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (  # noqa: E501
    HttpFilter,
    LocalReplyConfig,
    ResponseMapper,
)
from google.protobuf.any_pb2 import Any
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct
from google.protobuf.wrappers_pb2 import UInt32Value

from control_plane import translate_auth, translate_limits
from control_plane.config import Model, RoutingConfig
from control_plane.resources import Resources


def _pack(message: Message) -> Any:
    packed = Any()
    packed.Pack(message)
    return packed


# The filters of the gateway listener before the router, the same for every routing file:
# who the caller is (auth), then what the caller may spend (limits). Each is off until the
# virtual host or a route turns it on with its per-filter config, except the rate filter,
# whose config limits nothing without a `rate`. So no edit of `consumers` or `limits`
# changes the listener (a listener update drains every open connection).
FILTERS = [*translate_auth.http_filters(), *translate_limits.http_filters()]

# Filters whose config changes with the routing file itself (the JWKS, the rates, the quota
# service's failure mode): Envoy takes their config by ECDS, so that such an edit changes
# no listener either. Each config listed in FILTERS is the default (see _discovered).
DISCOVERED: dict[str, Callable[[RoutingConfig], Any]] = {
    translate_auth.JWT: lambda config: translate_auth.jwt_config(config.consumers),
    translate_limits.RATE_FILTER: translate_limits.rate_config,
    translate_limits.QUOTA_FILTER: lambda config: translate_limits.quota_config(
        config.quota_on_failure
    ),
}


def _discovered(listed: HttpFilter) -> HttpFilter:
    """A filter whose config Envoy fetches by name over ADS. A new listener waits (warms)
    until the config arrives. The default config, the one listed, applies only when it does
    not (Envoy's initial fetch timeout); without one, the filter would answer every request
    with 500. The JWT default refuses every JWT (fail closed); the rate default limits
    nothing (as without a rate); the quota default fails closed."""
    ads = ConfigSource(ads=AggregatedConfigSource(), resource_api_version=ApiVersion.V3)
    return HttpFilter(
        name=listed.name,
        config_discovery=ExtensionConfigSource(
            config_source=ads,
            type_urls=[listed.typed_config.type_url],
            default_config=listed.typed_config,
        ),
        disabled=listed.disabled,
    )


def http_filters(config: RoutingConfig) -> tuple[list[HttpFilter], dict[str, TypedExtensionConfig]]:
    """The filters that run before the router on the `gateway` listener (the same for every
    file), and by name the configs of those that Envoy takes by extension config discovery
    (ECDS: they are not in the listener)."""
    filters = [_discovered(f) if f.name in DISCOVERED else f for f in FILTERS]
    discovered = {
        name: TypedExtensionConfig(name=name, typed_config=config_of(config))
        for name, config_of in DISCOVERED.items()
    }
    return filters, discovered


def virtual_host_configs(config: RoutingConfig) -> dict[str, Any]:
    """Filter name -> typed config for every route of the gateway's virtual host (each
    virtual host that holds model routes must carry them: with `consumers` they turn the
    auth filters on, and without them a restricted model would be open)."""
    auth = translate_auth.virtual_host_configs(config.consumers) if config.consumers else {}
    return {**auth, **translate_limits.virtual_host_configs(config)}


def per_route_configs(model: Model) -> dict[str, Any]:
    """Filter name -> typed per-route config, for every route of `model`."""
    return {
        **translate_auth.access_route_configs(model),
        **translate_limits.per_route_configs(model),
    }


def oversize_route(model: Model, split: RouteAction, per_route: dict[str, Any]) -> Route | None:
    """The route of requests that declare a body over the model's `max_body`, with the
    model's per-route configs but the body limit (the model server reads that body)."""
    route = translate_limits.oversize_route(model, split)
    if route is not None:
        for name, config in per_route.items():
            if name != translate_limits.BODY_FILTER:
                route.typed_per_filter_config[name].CopyFrom(config)
    return route


def open_route_configs(config: RoutingConfig) -> dict[str, Any]:
    """Filter name -> typed per-route config of the gateway's own routes (health, server
    metadata), which need no credential."""
    return translate_auth.open_route_configs() if config.consumers else {}


def fallback_routes(config: RoutingConfig) -> list[Route]:
    """Routes after every model's."""
    return [translate_auth.not_found_route()] if config.consumers else []


def _status(op: ComparisonFilter.Op, status: int, runtime_key: str) -> AccessLogFilter:
    """Replies whose status compares `op` to `status`."""
    value = RuntimeUInt32(default_value=status, runtime_key=runtime_key)
    return AccessLogFilter(
        status_code_filter=StatusCodeFilter(comparison=ComparisonFilter(op=op, value=value))
    )


# jwt_authn answers 403 only for a genuine token of another audience (its details read
# `jwt_authn_access_denied{Audiences_in_Jwt_are_not_allowed}`); every other JWT failure is 401.
JWT_DENIED = "response.code == 403 && response.code_details.startsWith('jwt_authn_access_denied')"


def _jwt_audience_401(shape: SubstitutionFormatString) -> ResponseMapper:
    """A token for another audience is an invalid credential here: 401, like an expired one
    (403 stays the answer for a valid consumer without access to the model)."""
    cel = ExtensionFilter(
        name="envoy.access_loggers.extension_filters.cel",
        typed_config=_pack(ExpressionFilter(expression=JWT_DENIED)),
    )
    return ResponseMapper(
        filter=AccessLogFilter(extension_filter=cel),
        status_code=UInt32Value(value=401),
        body_format_override=shape,
    )


def local_reply_config() -> LocalReplyConfig:
    """Every error Envoy answers itself (401, 403, 404, 413, 429, 503, ...) in the Open
    Inference Protocol's shape, `{"error": "..."}` as application/json; its own successful
    answers (health, server metadata) stay as they are. The same for every routing file
    (it is in the listener)."""
    body = Struct()
    body.update({"error": "%LOCAL_REPLY_BODY%"})
    shape = SubstitutionFormatString(json_format=body)
    return LocalReplyConfig(
        mappers=[
            _jwt_audience_401(shape),  # in every file: the listener must not change with `jwt`
            ResponseMapper(
                filter=_status(ComparisonFilter.EQ, 404, "infergate.no_route_status"),
                body=DataSource(inline_string="no model at this path"),
                body_format_override=shape,
            ),
            ResponseMapper(  # Envoy's own text is empty for a cluster it does not have
                filter=AccessLogFilter(response_flag_filter=ResponseFlagFilter(flags=["NC"])),
                body=DataSource(inline_string="the version's cluster is not in the gateway yet"),
                body_format_override=shape,
            ),
            ResponseMapper(
                filter=_status(ComparisonFilter.GE, 400, "infergate.error_status"),
                body_format_override=shape,
            ),
        ]
    )


def finish(resources: Resources, config: RoutingConfig) -> Resources:
    """The translated resources with what needs the whole config: the routes and
    clusters that shed low-priority consumers first."""
    return translate_limits.with_priorities(resources, config)
