"""Per-model route updates, measured before building them: what a one-model weight edit
costs on the wire with today's single route configuration, and with the routes split
per model as scoped routes (SRDS: one `ScopedRouteConfiguration` keyed by the model
segment of `:path`, pointing at one `RouteConfiguration` per model, sent by RDS).

In-process and without Envoy: translate the benchmark's routing file, then encode the
RDS response each Envoy would get for the edit (SotW and Delta have the same size here):
serializing the whole route configuration, against building and serializing the edited
model's own one."""

from __future__ import annotations

import time
from typing import Any

from envoy.config.route.v3.route_components_pb2 import VirtualHost
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.config.route.v3.scoped_route_pb2 import ScopedRouteConfiguration

from bench.xds_scale.configs import routing_yaml
from control_plane.config import parse
from control_plane.snapshot import ROUTE
from control_plane.translate import ROUTE_CONFIG_NAME, _model_routes, translate
from control_plane.wire import encode_any, encode_delta_response, encode_sotw_body

SCOPED_ROUTE = "type.googleapis.com/envoy.config.route.v3.ScopedRouteConfiguration"


def _model_route_config(model) -> RouteConfiguration:
    host = VirtualHost(name=model.name, domains=["*"], routes=_model_routes(model))
    return RouteConfiguration(name=f"models/{model.name}", virtual_hosts=[host])


def _scope(model) -> ScopedRouteConfiguration:
    scope = ScopedRouteConfiguration(
        name=model.name, route_configuration_name=f"models/{model.name}"
    )
    scope.key.fragments.add(string_key="models")
    scope.key.fragments.add(string_key=model.name)
    return scope


def measure(models: int) -> dict[str, Any]:
    edited = parse(routing_yaml(models, 1))
    route_config = translate(edited).routes[ROUTE_CONFIG_NAME]
    started = time.perf_counter()
    whole = route_config.SerializeToString()
    full = encode_sotw_body("v", [encode_any(ROUTE, whole)], ROUTE)
    full_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    one = _model_route_config(edited.models[0]).SerializeToString()
    per_model = encode_delta_response("v", {"models/model-0000": ("v", one)}, [], ROUTE, "1")
    per_model_ms = (time.perf_counter() - started) * 1000
    scopes = sum(len(_scope(m).SerializeToString()) for m in edited.models)
    return {
        "models": models,
        "full_rds_response_bytes": len(full),
        "per_model_rds_response_bytes": len(per_model),
        "bytes_ratio": round(len(full) / len(per_model), 1),
        "full_rds_serialize_ms": round(full_ms, 2),
        "per_model_rds_build_ms": round(per_model_ms, 3),
        "srds_all_scopes_bytes": scopes,
    }


if __name__ == "__main__":
    import json

    print(json.dumps([measure(n) for n in (10, 100, 1000, 5000)], indent=2))
