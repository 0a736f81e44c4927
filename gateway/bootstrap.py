"""Generate the Envoy bootstrap: node identity, ADS to the control plane, local admin."""

from __future__ import annotations

from typing import Any

ADS_CLUSTER = "xds_cluster"


def envoy_bootstrap(
    node_id: str,
    xds: tuple[str, int],
    admin: tuple[str, int],
    cluster: str = "infergate",
    delta: bool = False,
) -> dict[str, Any]:
    """Bootstrap config: everything else (listeners, routes, clusters) comes over ADS,
    state of the world by default, incremental (Delta xDS) with `delta`."""
    ads_source = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": {"id": node_id, "cluster": cluster},
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
