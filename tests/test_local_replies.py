"""The gateway's local-reply mapping as the real Envoy applies it: a route whose cluster
Envoy does not have (503, flag NC, no text of Envoy's own) still says what happened."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from envoy.config.route.v3.route_components_pb2 import Route, RouteAction, RouteMatch, VirtualHost
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.extensions.filters.http.router.v3.router_pb2 import Router
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (  # noqa: E501
    HttpConnectionManager,
    HttpFilter,
)
from google.protobuf.wrappers_pb2 import BoolValue

from control_plane.api_filters import local_reply_config
from gateway import static_envoy
from gateway.processes import free_port


def test_a_route_to_a_cluster_envoy_lacks_answers_503_with_a_message(tmp_path, envoy_binary):
    listen, admin = free_port(), free_port()
    routes = RouteConfiguration(
        validate_clusters=BoolValue(value=False),  # as with RDS: a route may name any cluster
        virtual_hosts=[
            VirtualHost(
                name="all",
                domains=["*"],
                routes=[Route(match=RouteMatch(prefix="/"), route=RouteAction(cluster="iris/v9"))],
            )
        ],
    )
    hcm = HttpConnectionManager(
        stat_prefix="gateway",
        route_config=routes,
        http_filters=[HttpFilter(name="envoy.filters.http.router")],
        local_reply_config=local_reply_config(),
    )
    hcm.http_filters[0].typed_config.Pack(Router())
    envoy = static_envoy.start(envoy_binary, tmp_path, static_envoy.bootstrap(hcm, listen, admin))
    try:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{listen}/v2/models/iris/infer", timeout=5)
            raise AssertionError("expected a 503")
        except urllib.error.HTTPError as exc:
            assert exc.code == 503
            assert exc.headers["content-type"] == "application/json"
            assert json.loads(exc.read()) == {
                "error": "the version's cluster is not in the gateway yet"
            }
    finally:
        envoy.stop()
