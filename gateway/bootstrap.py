"""Generate the Envoy bootstrap: node identity, ADS to the control plane (resources and
an RTDS runtime layer), local admin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from control_plane.callbacks import LISTEN_METADATA

ADS_CLUSTER = "xds_cluster"
RUNTIME_LAYER = "infergate"  # the control plane's RTDS resource (control_plane/access_log.py)


@dataclass(frozen=True)
class XdsTls:
    """How Envoy checks the control plane (`ca`) and, for mutual TLS, who it is
    (`cert`, `key`). Paths to PEM files; `server_name` must match the server certificate."""

    ca: str
    cert: str | None = None
    key: str | None = None
    server_name: str = "localhost"

    def transport_socket(self) -> dict[str, Any]:
        context: dict[str, Any] = {"validation_context": {"trusted_ca": {"filename": self.ca}}}
        if self.cert and self.key:
            context["tls_certificates"] = [
                {
                    "certificate_chain": {"filename": self.cert},
                    "private_key": {"filename": self.key},
                }
            ]
        return {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": self.server_name,
                "common_tls_context": context,
            },
        }


def envoy_bootstrap(
    node_id: str,
    xds: tuple[str, int],
    admin: tuple[str, int],
    cluster: str = "infergate",
    delta: bool = False,
    tls: XdsTls | None = None,
    listen: str | None = None,
) -> dict[str, Any]:
    """Bootstrap config: everything else (listeners, routes, clusters) comes over ADS,
    state of the world by default, incremental (Delta xDS) with `delta`. With `listen`
    (ip:port), this Envoy serves the gateway there instead of at the YAML's `listen`."""
    ads_source = {"ads": {}, "resource_api_version": "V3"}
    node: dict[str, Any] = {"id": node_id, "cluster": cluster}
    if listen:
        node["metadata"] = {LISTEN_METADATA: listen}
    bootstrap = {
        "node": node,
        "admin": {
            "address": {"socket_address": {"address": admin[0], "port_value": admin[1]}},
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": ADS_CLUSTER}}],
                "set_node_on_first_message_only": True,
            },
            "cds_config": ads_source,
            "lds_config": ads_source,
        },
        # Runtime values from the control plane over ADS (RTDS), e.g. the access log's
        # sampling; the admin layer keeps /runtime_modify working.
        "layered_runtime": {
            "layers": [
                {
                    "name": RUNTIME_LAYER,
                    "rtds_layer": {"name": RUNTIME_LAYER, "rtds_config": ads_source},
                },
                {"name": "admin", "admin_layer": {}},
            ]
        },
        "static_resources": {
            "clusters": [
                {
                    "name": ADS_CLUSTER,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/"
                            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {
                                "http2_protocol_options": {
                                    "connection_keepalive": {"interval": "30s", "timeout": "5s"}
                                }
                            },
                        }
                    },
                    "load_assignment": {
                        "cluster_name": ADS_CLUSTER,
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": xds[0],
                                                    "port_value": xds[1],
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ]
        },
    }
    if tls:
        bootstrap["static_resources"]["clusters"][0]["transport_socket"] = tls.transport_socket()
    return bootstrap


def envoy_command(envoy_binary: str, bootstrap_path: str, log_level: str = "warning") -> list[str]:
    """Command line for one Envoy; hot restart is off so several can share a machine."""
    return [
        envoy_binary,
        "-c",
        bootstrap_path,
        "--disable-hot-restart",
        "--log-level",
        log_level,
        "--drain-time-s",
        "1",
    ]
