"""Envoy's per-request outcomes, over Envoy's gRPC access log service (ALS).

- `with_access_log` adds gRPC access loggers to every HTTP connection manager of a
  translated config: Envoy streams (and batches) one entry per request to the control
  plane over the bootstrap's xDS cluster (so the xDS TLS settings apply). There is one
  logger per sampling fraction, each tagging its entries with its fraction; the runtime
  (RTDS, `sample_runtime`) turns exactly one of them on, so the fraction changes without
  a listener update (which would drain connections).
- `AccessLogServer` is the grpcio service that receives the streams and feeds a
  `TelemetryStore`. A stream that cannot be decoded is dropped with a log line; Envoy
  opens a new one with its next batch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import timedelta

import grpc
from envoy.config.accesslog.v3.accesslog_pb2 import AccessLog, AccessLogFilter, RuntimeFilter
from envoy.config.core.v3.config_source_pb2 import ApiVersion
from envoy.config.core.v3.grpc_service_pb2 import GrpcService
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from envoy.extensions.access_loggers.grpc.v3.als_pb2 import (
    CommonGrpcAccessLogConfig,
    HttpGrpcAccessLogConfig,
)
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (  # noqa: E501
    HttpConnectionManager,
)
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage, StreamAccessLogsResponse
from envoy.service.runtime.v3.rtds_pb2 import Runtime
from envoy.type.tracing.v3.custom_tag_pb2 import CustomTag
from envoy.type.v3.percent_pb2 import FractionalPercent
from google.protobuf.message import DecodeError
from google.protobuf.struct_pb2 import Struct

from control_plane.resources import Resources
from control_plane.telemetry import RequestRecord, TelemetryStore

log = logging.getLogger("infergate.telemetry")

ALS_SERVICE = "envoy.service.accesslog.v3.AccessLogService"
XDS_CLUSTER = "xds_cluster"  # the bootstrap's cluster to the control plane (gateway/bootstrap.py)
LOG_NAME = "infergate"
CONSUMER_HEADER = "x-infergate-consumer"  # the only request header logged (never a key)
GATEWAY_ROUTES = "gateway"  # route names "gateway/...": the gateway's own (health, not found)
SAMPLE_TAG = "infergate.sample"
SAMPLE_RUNTIME_KEY = "infergate.telemetry.sample"  # + fraction: the logger's switch
FRACTION_RUNTIME_KEY = "infergate.telemetry.fraction"  # + fraction: never set (see access_log)
RUNTIME_LAYER = "infergate"  # the RTDS layer's resource name (gateway/bootstrap.py)
HCM_NAME = "envoy.filters.network.http_connection_manager"
FLUSH_INTERVAL = timedelta(milliseconds=200)
BUFFER_BYTES = 64 * 1024

# ResponseFlags fields -> Envoy's short names (as in %RESPONSE_FLAGS%).
FLAG_NAMES = {
    "failed_local_healthcheck": "LH",
    "no_healthy_upstream": "UH",
    "upstream_request_timeout": "UT",
    "local_reset": "LR",
    "upstream_remote_reset": "UR",
    "upstream_connection_failure": "UF",
    "upstream_connection_termination": "UC",
    "upstream_overflow": "UO",
    "no_route_found": "NR",
    "delay_injected": "DI",
    "fault_injected": "FI",
    "rate_limited": "RL",
    "unauthorized_details": "UAEX",
    "rate_limit_service_error": "RLSE",
    "downstream_connection_termination": "DC",
    "upstream_retry_limit_exceeded": "URX",
    "stream_idle_timeout": "SI",
    "invalid_envoy_request_headers": "IH",
    "downstream_protocol_error": "DPE",
    "upstream_max_stream_duration_reached": "UMSDR",
    "response_from_cache_filter": "RFCF",
    "no_filter_config_found": "NFCF",
    "duration_timeout": "DT",
    "upstream_protocol_error": "UPE",
    "no_cluster_found": "NC",
    "overload_manager": "OM",
    "dns_resolution_failure": "DF",
    "downstream_remote_reset": "DR",
}


# --- configuration (xDS) ------------------------------------------------------------------
def sample_key(fraction: float) -> str:
    """The runtime key that switches the logger of this sampling fraction on (100) or
    off (0)."""
    return f"{SAMPLE_RUNTIME_KEY}.{fraction:g}"


def _runtime_filter(key: str, numerator: int, denominator: int) -> AccessLogFilter:
    percent = FractionalPercent(numerator=numerator, denominator=denominator)
    return AccessLogFilter(runtime_filter=RuntimeFilter(runtime_key=key, percent_sampled=percent))


def access_log(fraction: float, default_on: bool) -> AccessLog:
    """The gRPC access logger of one sampling fraction for an HTTP connection manager:
    it logs `fraction` of the requests while switched on (its `sample_key` at 100, or
    unset and `default_on`).

    Two runtime filters, because Envoy reads a runtime integer as a numerator only up to
    100 and (with recent protobuf) fails to parse a fractional percent given as a
    struct: a switch in percent, and the fraction itself as a default in millionths
    under a key nothing sets."""
    config = HttpGrpcAccessLogConfig(
        common_config=CommonGrpcAccessLogConfig(
            log_name=LOG_NAME,
            grpc_service=GrpcService(envoy_grpc=GrpcService.EnvoyGrpc(cluster_name=XDS_CLUSTER)),
            transport_api_version=ApiVersion.V3,
            buffer_flush_interval=FLUSH_INTERVAL,
            buffer_size_bytes={"value": BUFFER_BYTES},
            custom_tags=[CustomTag(tag=SAMPLE_TAG, literal=CustomTag.Literal(value=f"{fraction}"))],
        ),
        additional_request_headers_to_log=[CONSUMER_HEADER],
    )
    logger = AccessLog(name="envoy.access_loggers.http_grpc")
    logger.typed_config.Pack(config)
    switch = _runtime_filter(
        sample_key(fraction), 100 if default_on else 0, FractionalPercent.HUNDRED
    )
    sampler = _runtime_filter(
        f"{FRACTION_RUNTIME_KEY}.{fraction:g}",
        round(fraction * 1_000_000),
        FractionalPercent.MILLION,
    )
    logger.filter.and_filter.filters.extend([switch, sampler])
    return logger


def sample_runtime(active: float, fractions: Sequence[float]) -> Runtime:
    """The RTDS layer that switches the logger of `active` on and every other one off.
    Envoy applies a layer as one snapshot, so each request is logged by at most one
    logger, tagged with the fraction it was sampled at."""
    layer = Struct()
    for fraction in fractions:
        layer[sample_key(fraction)] = 100 if fraction == active else 0
    return Runtime(name=RUNTIME_LAYER, layer=layer)


def _logged_listener(listener: Listener, loggers: list[AccessLog]) -> Listener:
    out = Listener()
    out.CopyFrom(listener)
    for chain in out.filter_chains:
        for f in chain.filters:
            if f.name == HCM_NAME:
                hcm = HttpConnectionManager()
                f.typed_config.Unpack(hcm)
                hcm.access_log.extend(loggers)
                f.typed_config.Pack(hcm)
    return out


def with_access_log(resources: Resources, fractions: Sequence[float]) -> Resources:
    """The same resources with every HTTP listener logging to the control plane through
    one logger per sampling fraction, the first on by default (the listeners are copied:
    translated resources are shared)."""
    loggers = [access_log(f, default_on=i == 0) for i, f in enumerate(fractions)]
    listeners = {n: _logged_listener(lis, loggers) for n, lis in resources.listeners.items()}
    return dataclasses.replace(resources, listeners=listeners)


# --- decoding -----------------------------------------------------------------------------
def _seconds(duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def model_of(entry: HTTPAccessLogEntry) -> tuple[str, str] | None:
    """(model, version) of an entry: from the upstream cluster ("model/version", gRPC
    "model/version/grpc"); for a request that reached no version (a filter rejected it,
    no route), the model from the route name ("iris/split") or else the path
    ("/v2/models/iris/..."), version "". None for other paths (health, server metadata)."""
    common = entry.common_properties
    model, _, version = common.upstream_cluster.partition("/")
    if model and version:
        return model, version.partition("/")[0]
    route_model = common.route_name.partition("/")[0]
    if route_model and route_model != GATEWAY_ROUTES:
        return route_model, ""
    path = entry.request.path.partition("?")[0].split("/")
    if len(path) > 3 and path[1:3] == ["v2", "models"] and path[3]:
        return path[3], ""
    return None


def record_of(entry: HTTPAccessLogEntry) -> tuple[RequestRecord, float] | None:
    """The request record of one entry and its weight (1 / sampling fraction); None for
    requests that named no model (health routes, other paths without a route)."""
    found = model_of(entry)
    if found is None:
        return None
    common = entry.common_properties
    flags = ",".join(FLAG_NAMES.get(f.name, f.name) for f, _ in common.response_flags.ListFields())
    duration = common.duration if common.HasField("duration") else None
    if duration is None:
        duration = common.time_to_last_downstream_tx_byte
    fraction = float(common.custom_tags.get(SAMPLE_TAG) or 1.0)
    request = entry.request
    record = RequestRecord(
        model=found[0],
        version=found[1],
        code=entry.response.response_code.value,
        flags=flags,
        duration=_seconds(duration),
        request_id=request.request_id,
        consumer=request.request_headers.get(CONSUMER_HEADER),
        details=entry.response.response_code_details,
    )
    return record, 1.0 / fraction if fraction > 0 else 1.0


def records_of(message: StreamAccessLogsMessage) -> Iterator[tuple[RequestRecord, float]]:
    for entry in message.http_logs.log_entry:
        if (found := record_of(entry)) is not None:
            yield found


# --- the service --------------------------------------------------------------------------
class AccessLogServer:
    """grpcio handler for AccessLogService.StreamAccessLogs, feeding a store."""

    def __init__(self, store: TelemetryStore):
        self.store = store
        self.dropped_streams = 0

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            ALS_SERVICE,
            {
                "StreamAccessLogs": grpc.stream_unary_rpc_method_handler(
                    self.stream,
                    request_deserializer=None,  # raw bytes: a bad message must not crash
                    response_serializer=StreamAccessLogsResponse.SerializeToString,
                )
            },
        )

    async def stream(self, requests: AsyncIterator[bytes], context) -> StreamAccessLogsResponse:
        node = "?"
        async for raw in requests:
            try:
                message = StreamAccessLogsMessage.FromString(raw)
                if message.HasField("identifier"):
                    node = message.identifier.node.id or node
                if message.HasField("tcp_logs"):
                    raise ValueError("TCP access logs are not expected")
                self.store.add_all(records_of(message))
            except (DecodeError, ValueError, TypeError) as exc:
                self.dropped_streams += 1
                log.warning("dropping the access log stream of %s: %s", node, exc)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return StreamAccessLogsResponse()
