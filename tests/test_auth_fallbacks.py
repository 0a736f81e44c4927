"""The default configs of the filters whose configs come by ECDS, as the real Envoy applies
them when no config arrives: the JWT filter refuses every JWT (fail closed) and lets other
credentials pass on to the key check; the rate filter limits nothing."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from datetime import timedelta

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.config_source_pb2 import (
    ApiConfigSource,
    ApiVersion,
    ConfigSource,
    ExtensionConfigSource,
)
from envoy.config.core.v3.grpc_service_pb2 import GrpcService
from envoy.extensions.filters.http.jwt_authn.v3.config_pb2 import PerRouteConfig
from envoy.extensions.filters.http.router.v3.router_pb2 import Router
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (  # noqa: E501
    HttpFilter,
)
from google.protobuf.any_pb2 import Any

from control_plane.api_filters import FILTERS
from control_plane.config import Endpoint as ServerAddress
from control_plane.translate import load_assignment
from control_plane.translate_auth import JWT, REQUIREMENT
from control_plane.translate_limits import RATE_FILTER
from gateway import static_envoy
from gateway.processes import free_port


def _nowhere(port: int) -> ConfigSource:
    """An ECDS source that never answers (nothing listens on `port`), given up on quickly."""
    grpc = GrpcService(envoy_grpc=GrpcService.EnvoyGrpc(cluster_name="nowhere"))
    return ConfigSource(
        api_config_source=ApiConfigSource(
            api_type=ApiConfigSource.GRPC, transport_api_version=ApiVersion.V3, grpc_services=[grpc]
        ),
        resource_api_version=ApiVersion.V3,
        initial_fetch_timeout=timedelta(milliseconds=200),
    )


def _bootstrap(listen: int, admin: int, dead: int) -> Bootstrap:
    # The gateway's JWT and rate filters and their defaults (the quota one needs the
    # bootstrap's xds_cluster).
    filters = [
        HttpFilter(
            name=f.name,
            config_discovery=ExtensionConfigSource(
                config_source=_nowhere(dead),
                type_urls=[f.typed_config.type_url],
                default_config=f.typed_config,
            ),
            disabled=f.disabled,
        )
        for f in FILTERS
        if f.name in (JWT, RATE_FILTER)
    ]
    filters.append(HttpFilter(name="envoy.filters.http.router"))
    filters[-1].typed_config.Pack(Router())
    jwt_required = Any()
    jwt_required.Pack(PerRouteConfig(requirement_name=REQUIREMENT))
    hcm = static_envoy.answering("gateway", filters, route_configs={JWT: jwt_required})
    nowhere = Cluster(
        name="nowhere",
        type=Cluster.STATIC,
        connect_timeout=timedelta(milliseconds=100),
        load_assignment=load_assignment("nowhere", [ServerAddress("127.0.0.1", dead)]),
    )
    return static_envoy.bootstrap(hcm, listen, admin, [nowhere])


def _status(url: str, headers: dict[str, str]) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5):
            return 200
    except urllib.error.HTTPError as exc:
        return exc.code


def test_without_their_configs_jwts_are_refused_and_nothing_is_rate_limited(tmp_path, envoy_binary):
    listen, admin, dead = free_port(), free_port(), free_port()
    envoy = static_envoy.start(envoy_binary, tmp_path, _bootstrap(listen, admin, dead))
    try:
        # Any key signs a JWT; the fallback's JWKS holds only a key nobody has.
        now = int(time.time())
        claims = {"iss": "https://refuse-all.invalid", "sub": "mallory", "exp": now + 600}
        token = jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
        url = f"http://127.0.0.1:{listen}/v2/models/iris/infer"
        assert _status(url, {"authorization": f"Bearer {token}"}) == 401
        # Not a JWT: the JWT filter skips it (the key check, not configured here, decides).
        assert [_status(url, {"x-api-key": "some-key"}) for _ in range(20)] == [200] * 20
        stats = urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats", timeout=5).read()
        for name in (JWT, RATE_FILTER):  # the defaults ran: no config ever arrived
            assert f"extension_config_discovery.http_filter.{name}.config_reload: 0" in (
                stats.decode()
            )
    finally:
        envoy.stop()
