"""Where the replicas of a version run: one small interface, two implementations.

An executor turns (model, version, address) into an unstarted `Child` whose process serves
that version on that address and drains on SIGTERM. The supervisor starts, watches and
stops it; readiness is the address's `/v2/health/ready`. docs/scaling.md maps the same
interface onto a Kubernetes Deployment.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

from control_plane.upstream_tls import UpstreamTls
from gateway.processes import Child, model_server_child


class Executor(Protocol):
    def child(
        self,
        model: str,
        version: str,
        address: tuple[str, int],
        log_path: str,
        tls: UpstreamTls | None = None,
    ) -> Child:
        """An unstarted process that serves `model/version` on `address` (with `tls`, only
        to clients whose certificate its CA signed)."""
        ...


def with_tls(child: Child, tls: UpstreamTls | None) -> Child:
    """The model server `child` serving over mutual TLS (`upstream_tls`), ready over https."""
    if tls is not None:
        child.argv += tls.serve_options()
        child.ready_url = (child.ready_url or "").replace("http://", "https://", 1)
    return child


class LocalExecutor:
    """`infergate serve` as a local child process (the default)."""

    def __init__(self, repository: Path):
        self.repository = repository

    def child(
        self,
        model: str,
        version: str,
        address: tuple[str, int],
        log_path: str,
        tls: UpstreamTls | None = None,
    ) -> Child:
        child = model_server_child(str(self.repository), model, version, address, log_path)
        return with_tls(child, tls)


class DockerExecutor:
    """`infergate serve` in a container of the `infergate` image on the host network.

    The child is the `docker run` client: it forwards SIGTERM to the container (tini, then the
    model server, which drains), and `--rm` removes the container once it exits.
    """

    def __init__(self, repository: Path, image: str = "infergate:latest", docker: str = "docker"):
        self.repository = repository.resolve()
        self.image = image
        self.docker = docker

    def child(
        self,
        model: str,
        version: str,
        address: tuple[str, int],
        log_path: str,
        tls: UpstreamTls | None = None,
    ) -> Child:
        host, port = address
        # The TLS files at the same paths inside the container, read-only.
        files = {tls.server_cert, tls.server_key, tls.ca} if tls else set()
        mounts = [arg for path in sorted(files) for arg in ("-v", f"{path}:{path}:ro")]
        name = re.sub(r"[^a-zA-Z0-9_.-]", "-", f"infergate-{model}-{version}-{port}")
        argv = [
            self.docker,
            "run",
            "--rm",
            "--init",
            "--network",
            "host",
            "--name",
            name,
            "-v",
            f"{self.repository}:/models:ro",
            *mounts,
            self.image,
            "serve",
            "--repository",
            "/models",
            "--model",
            model,
            "--version",
            version,
            "--host",
            host,
            "--port",
            str(port),
        ]
        ready = f"http://{host}:{port}/v2/health/ready"
        child = Child(
            f"container {model}/{version} @{host}:{port}", argv, log_path, ready_url=ready
        )
        return with_tls(child, tls)
