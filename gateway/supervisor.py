"""The embedded default: control plane, one Envoy and the model servers on one machine.

Children run in their own sessions and die with the supervisor; on Ctrl-C or SIGTERM
the supervisor stops Envoy first, then the control plane, then the model servers
(which drain), and leaves no process behind. A child that exits on its own is
restarted, at most once every few seconds.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from control_plane.config import RoutingConfig, load
from gateway.envoy_proxy import envoy_child
from gateway.processes import (
    Child,
    host_port,
    infergate_command,
    model_server_child,
    wait_http,
)

log = logging.getLogger("infergate.supervisor")

RESTART_BACKOFF = 3.0


@dataclass(frozen=True)
class StackAddresses:
    xds: tuple[str, int] = ("127.0.0.1", 18000)
    admin: tuple[str, int] = ("127.0.0.1", 18001)
    envoy_admin: tuple[str, int] = ("127.0.0.1", 9901)


def model_server_children(config: RoutingConfig, repository: Path, logdir: Path) -> list[Child]:
    """One model server per loopback endpoint whose model version is in the repository;
    the version's n-th gRPC endpoint, if any, is the n-th server's gRPC port."""
    children = []
    for model in config.models:
        for version in model.versions:
            if not (repository / model.name / version.name).is_dir():
                log.warning("no %s/%s in %s: not starting it", model.name, version.name, repository)
                continue
            grpc_ports = [g.port for g in version.grpc_endpoints]
            for i, ep in enumerate(version.endpoints):
                if not ep.host.startswith("127."):
                    continue
                logfile = logdir / f"model-{model.name}-{version.name}-{ep.port}.log"
                grpc_port = grpc_ports[i] if i < len(grpc_ports) else None
                children.append(
                    model_server_child(
                        str(repository),
                        model.name,
                        version.name,
                        (ep.host, ep.port),
                        str(logfile),
                        grpc_port,
                    )
                )
    return children


class Supervisor:
    def __init__(
        self,
        config_path: Path,
        repository: Path,
        workdir: Path,
        addresses: StackAddresses = StackAddresses(),
    ):
        self.config_path = config_path
        self.addresses = addresses
        self.workdir = workdir
        config = load(config_path)
        self.listen = config.listen
        self.models = model_server_children(config, repository, workdir)
        self.control_plane = Child(
            "control plane",
            infergate_command(
                "control-plane",
                str(config_path),
                "--xds",
                host_port(addresses.xds),
                "--admin",
                host_port(addresses.admin),
            ),
            str(workdir / "control-plane.log"),
        )
        self.envoy = envoy_child("infergate-local", addresses.xds, addresses.envoy_admin, workdir)
        self._stop = threading.Event()

    @property
    def children(self) -> list[Child]:
        return [*self.models, self.control_plane, self.envoy]

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for child in self.models:
            child.start()
        for child in self.models:  # Envoy's first health checks would find them down
            wait_http(child.ready_url, timeout=60, child=child)
        self.control_plane.start()
        wait_http(f"http://{host_port(self.addresses.admin)}/healthz", child=self.control_plane)
        self.envoy.start()
        wait_http(f"http://{host_port(self.addresses.envoy_admin)}/ready", child=self.envoy)

    def stop(self) -> None:
        for child in (self.envoy, self.control_plane, *self.models):
            child.stop()

    def run(self) -> None:
        """Start everything, keep it running until SIGINT or SIGTERM, then stop it all."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stop.set())
        try:
            self.start()
            admin, envoy_admin = self.addresses.admin, self.addresses.envoy_admin
            print(
                f"infergate: gateway on http://{self.listen}\n"
                f"  control plane status: http://{host_port(admin)}/status\n"
                f"  Envoy admin:          http://{host_port(envoy_admin)}\n"
                f"  logs:                 {self.workdir}/\n"
                "  Ctrl-C stops everything",
                flush=True,
            )
            last_restart: dict[str, float] = {}
            while not self._stop.wait(0.5):
                for child in self.children:
                    if (
                        not child.running
                        and time.monotonic() - last_restart.get(child.name, 0) > RESTART_BACKOFF
                    ):
                        log.warning(
                            "%s exited with %s; restarting it",
                            child.name,
                            child.proc.returncode if child.proc else None,
                        )
                        last_restart[child.name] = time.monotonic()
                        child.start()
        finally:
            self.stop()
            print("infergate: stopped", flush=True)
