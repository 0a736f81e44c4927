"""A static Envoy (no xDS): one HTTP listener on 127.0.0.1 with its routes inline, for
trying one Envoy feature on the real binary (tests/test_local_replies.py,
tests/test_auth_fallbacks.py, bench/plain_chain.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.route.v3.route_components_pb2 import (
    DirectResponseAction,
    Route,
    RouteMatch,
    VirtualHost,
)
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (  # noqa: E501
    HttpConnectionManager,
    HttpFilter,
)
from google.protobuf.any_pb2 import Any
from google.protobuf.json_format import MessageToJson

from gateway.bootstrap import envoy_command
from gateway.processes import Child, wait_http


def answering(
    name: str,
    filters: Sequence[HttpFilter],
    route_configs: dict[str, Any] | None = None,
    host_configs: dict[str, Any] | None = None,
) -> HttpConnectionManager:
    """An HCM that runs `filters` (the router last) and answers every request 200 itself,
    with per-filter configs on its one route and virtual host."""
    route = Route(
        match=RouteMatch(prefix="/"),
        direct_response=DirectResponseAction(status=200),
        typed_per_filter_config=route_configs or {},
    )
    host = VirtualHost(
        name=name, domains=["*"], routes=[route], typed_per_filter_config=host_configs or {}
    )
    return HttpConnectionManager(
        stat_prefix=name,
        http_filters=filters,
        route_config=RouteConfiguration(virtual_hosts=[host]),
    )


def bootstrap(
    hcm: HttpConnectionManager, listen: int, admin: int, clusters: Sequence[Cluster] = ()
) -> Bootstrap:
    """An Envoy whose only listener (`gateway`, on `listen`) runs `hcm`."""
    config = Bootstrap()
    config.node.id, config.node.cluster = "static", "test"
    listener = config.static_resources.listeners.add(name="gateway")
    listener.address.socket_address.address = "127.0.0.1"
    listener.address.socket_address.port_value = listen
    chain = listener.filter_chains.add()
    chain.filters.add(name="envoy.filters.network.http_connection_manager").typed_config.Pack(hcm)
    config.static_resources.clusters.extend(clusters)
    config.admin.address.socket_address.address = "127.0.0.1"
    config.admin.address.socket_address.port_value = admin
    return config


def start(envoy_binary: str, workdir: Path, config: Bootstrap, name: str = "envoy") -> Child:
    """Start Envoy with `config` (logging to `workdir/<name>.log`) and wait until it is ready."""
    path = workdir / f"{name}.json"
    path.write_text(MessageToJson(config))
    envoy = Child(name, envoy_command(envoy_binary, str(path)), str(workdir / f"{name}.log"))
    envoy.start()
    try:
        wait_http(
            f"http://127.0.0.1:{config.admin.address.socket_address.port_value}/ready", child=envoy
        )
    except BaseException:
        envoy.stop()
        raise
    return envoy
