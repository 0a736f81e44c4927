"""Container entry point: `envoy ...` runs Envoy; anything else is the `infergate` CLI.

    envoy [--node-id ID] [--xds HOST:PORT] [--admin HOST:PORT] [--log-level LEVEL] [--delta]

writes an Envoy bootstrap pointing at the control plane and replaces this process with
Envoy (hot restart off, so several Envoys can share one host network).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from gateway.bootstrap import envoy_bootstrap, envoy_command
from gateway.cli import host_port, main


def run_envoy(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="envoy", description="Envoy configured over ADS")
    parser.add_argument("--node-id", default="envoy-1")
    parser.add_argument("--xds", type=host_port, default=("127.0.0.1", 18000))
    parser.add_argument("--admin", type=host_port, default=("127.0.0.1", 9901))
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--delta", action="store_true", help="use Delta (incremental) xDS")
    args = parser.parse_args(argv)

    from gateway.envoy_proxy import envoy_path

    fd, path = tempfile.mkstemp(prefix="envoy-bootstrap-", suffix=".json")
    with os.fdopen(fd, "w") as out:
        json.dump(envoy_bootstrap(args.node_id, args.xds, args.admin, delta=args.delta), out)
    argv = envoy_command(envoy_path(), path, args.log_level)
    os.execv(argv[0], argv)


if __name__ == "__main__":
    if sys.argv[1:2] == ["envoy"]:
        run_envoy(sys.argv[2:])
    sys.exit(main(sys.argv[1:]))
