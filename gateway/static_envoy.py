"""A static Envoy (no xDS): one HTTP listener on 127.0.0.1 with its routes inline, for
trying one Envoy feature on the real binary (tests/test_local_replies.py,
tests/test_auth_fallbacks.py, bench/plain_chain.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (  # noqa: E501
    HttpConnectionManager,
)
from google.protobuf.json_format import MessageToJson

from gateway.bootstrap import envoy_command
from gateway.processes import Child, wait_http


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
