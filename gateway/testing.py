"""Run the whole gateway in containers for tests: model servers, control plane and Envoy.

    from gateway.testing import gateway_stack

    with gateway_stack("routing.yaml", "models/") as gw:
        urllib.request.urlopen(gw.url + "/v2/models/iris/ready")
        gw.set_traffic({"v1": 50, "v2": 50})          # rewrite the YAML, wait for Envoy
        assert gw.applied_traffic() == {"v1": 50, "v2": 50}

Every container runs the `infergate` image (`bash docker/build.sh`) on the host network, so
every port is a free port of 127.0.0.1 picked at run time. The routing YAML's `listen` and
endpoint addresses are replaced by those ports: each endpoint of a version becomes one
model-server container serving `<models>/<model>/<version>`. The rewritten YAML lives in a
folder mounted into the control plane, which reloads it when it changes.

Without a Docker engine or the image, `gateway_stack` skips the calling pytest test (fails it
when CI=true); outside pytest it raises `DockerUnavailable`.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from control_plane.config import parse
from gateway import observe
from gateway.processes import free_port

DEFAULT_IMAGE = os.environ.get("INFERGATE_IMAGE", "infergate:latest")
ENABLE_HINT = "start an engine and build the image with `bash .ci/docker.sh start`"
CONFIG_DIR = "/config"
MODELS_DIR = "/models"


class DockerUnavailable(RuntimeError):
    """No Docker engine answers, or the image is missing."""


def docker_problem(image: str = DEFAULT_IMAGE) -> str | None:
    """Why containers cannot run here, or None when they can."""
    from docker.client import DockerClient
    from docker.errors import DockerException, ImageNotFound

    try:
        client = DockerClient.from_env(timeout=10)
    except DockerException as exc:
        return f"no Docker engine answers ({exc})"
    try:
        client.ping()
        client.images.get(image)
    except ImageNotFound:
        return f"the image {image} is missing"
    except DockerException as exc:
        return f"no Docker engine answers ({exc})"
    finally:
        client.close()
    return None


def require_docker(image: str = DEFAULT_IMAGE) -> None:
    """Skip the calling pytest test without an engine or image; fail it when CI=true."""
    problem = docker_problem(image)
    if problem is None:
        return
    message = f"container tests need Docker: {problem}; {ENABLE_HINT}"
    if "pytest" in sys.modules:
        import pytest

        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    raise DockerUnavailable(message)


def _host_network_container(image: str, command: list[str], volumes: dict[str, str]):
    """A testcontainers container on the host network, with tini as PID 1 for signals."""
    from testcontainers.core.config import testcontainers_config
    from testcontainers.core.container import DockerContainer

    # Ryuk (the reaper) is an image from a registry: not to be had here. We clean up ourselves.
    testcontainers_config.ryuk_disabled = True

    class HostNetworkContainer(DockerContainer):
        """No port mappings under host networking: a port in the container is that port of
        127.0.0.1 (testcontainers would guess a bridge gateway when /.dockerenv exists)."""

        def get_container_host_ip(self) -> str:
            return "127.0.0.1"

        def get_exposed_port(self, port: int) -> int:
            return port

    container = HostNetworkContainer(image).with_command(command)
    container.with_kwargs(network="host", init=True)
    for host, inside in volumes.items():
        container.with_volume_mapping(host, inside, "ro")
    return container


@dataclass
class ModelServer:
    """One model-server container: `model`/`version` on 127.0.0.1:`port`."""

    model: str
    version: str
    port: int
    container: Any

    def kill(self) -> None:
        """SIGKILL the container (it stays stopped)."""
        self.container.get_wrapped_container().kill()


@dataclass
class GatewayStack:
    """The running stack. `url` is the gateway; the YAML is `routing_path` on the host."""

    image: str
    routing_path: Path
    models_path: Path
    routing: dict[str, Any]
    port: int
    xds_port: int
    admin_port: int
    envoy_admin_port: int
    delta: bool = False
    model_servers: list[ModelServer] = field(default_factory=list)
    control_plane: Any = None
    envoy: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def control_plane_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def envoy_admin_url(self) -> str:
        return f"http://127.0.0.1:{self.envoy_admin_port}"

    # --- containers --------------------------------------------------------------------
    def _wait_ready(self, container: Any, url: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                observe.get_text(url, timeout=1)
                return
            except (urllib.error.URLError, OSError):
                pass
            container.reload()
            if container.status in ("exited", "dead"):
                break
            time.sleep(0.1)
        raise RuntimeError(f"{url} not ready:\n{_logs(container)}")

    def start_model_servers(self) -> None:
        for name, model in self.routing["models"].items():
            for version, spec in model["versions"].items():
                for endpoint in spec["endpoints"]:
                    port = int(str(endpoint).rsplit(":", 1)[1])
                    command = [
                        "serve",
                        *("--repository", MODELS_DIR, "--model", name, "--version", version),
                        *("--host", "127.0.0.1", "--port", str(port)),
                    ]
                    container = _host_network_container(
                        self.image, command, {str(self.models_path): MODELS_DIR}
                    )
                    self.model_servers.append(ModelServer(name, version, port, container))
                    container.start()
        for server in self.model_servers:  # started together, so they load in parallel
            url = f"http://127.0.0.1:{server.port}/v2/health/ready"
            self._wait_ready(server.container, url)

    def start_control_plane(self) -> None:
        command = [
            "control-plane",
            f"{CONFIG_DIR}/{self.routing_path.name}",
            *("--xds", f"127.0.0.1:{self.xds_port}"),
            *("--admin", f"127.0.0.1:{self.admin_port}"),
        ]
        volumes = {str(self.routing_path.parent): CONFIG_DIR}
        self.control_plane = _host_network_container(self.image, command, volumes)
        self.control_plane.start()
        self._wait_ready(self.control_plane, f"{self.control_plane_url}/healthz")

    def start_envoy(self, node_id: str = "gateway") -> None:
        command = [
            "envoy",
            *("--node-id", node_id, "--xds", f"127.0.0.1:{self.xds_port}"),
            *("--admin", f"127.0.0.1:{self.envoy_admin_port}"),
            *(["--delta"] if self.delta else []),
        ]
        self.envoy = _host_network_container(self.image, command, {})
        self.envoy.start()
        self._wait_ready(self.envoy, f"{self.envoy_admin_url}/ready")

    def restart_control_plane(self) -> None:
        """Restart the control-plane container (SIGTERM, then start) and wait until the
        new process serves and Envoy has ACKed its snapshot."""
        started = time.time()
        self.control_plane.get_wrapped_container().restart(timeout=10)
        self._wait_ready(self.control_plane, f"{self.control_plane_url}/healthz")
        self.wait_converged(after=started)

    def replicas(self, version: str, model: str | None = None) -> list[ModelServer]:
        """The model-server containers of one version."""
        model = model or self._only_model()
        return [s for s in self.model_servers if (s.model, s.version) == (model, version)]

    def containers(self) -> list[Any]:
        return [c for c in (self.envoy, self.control_plane) if c] + [
            s.container for s in self.model_servers
        ]

    def logs(self) -> str:
        """The logs of every container, for a failing test's report."""
        return "\n".join(_logs(c) for c in self.containers())

    def stop(self) -> None:
        for container in self.containers():
            try:
                container.stop()
            except Exception as exc:  # noqa: BLE001 - clean up the others regardless
                print(f"could not remove container: {exc}", file=sys.stderr)

    # --- routing -----------------------------------------------------------------------
    def _only_model(self) -> str:
        names = list(self.routing["models"])
        if len(names) != 1:
            raise ValueError(f"several models ({names}): name one")
        return names[0]

    def write_routing(self, routing: dict[str, Any], wait: bool = True) -> None:
        """Replace the mounted YAML (atomically, by rename) and, with `wait`, wait until
        the control plane applied it and Envoy ACKed every resource type."""
        text = yaml.safe_dump(routing, sort_keys=False)
        parse(text, str(self.routing_path))  # a bad file would never converge: fail now
        if text == self.routing_path.read_text():
            self.routing = copy.deepcopy(routing)
            return  # unchanged: nothing to apply
        started = time.time()
        tmp = self.routing_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.routing_path)
        self.routing = copy.deepcopy(routing)
        if wait:
            self.wait_converged(after=started)

    def set_traffic(self, traffic: dict[str, int], model: str | None = None) -> None:
        """Change a model's weights in the YAML and wait until Envoy applied them."""
        routing = copy.deepcopy(self.routing)
        routing["models"][model or self._only_model()]["traffic"] = dict(traffic)
        self.write_routing(routing)

    # --- what the control plane and Envoy have ---------------------------------------
    def status(self) -> dict[str, Any]:
        """The control plane's `/status`: snapshot versions, what each node ACKed."""
        return observe.get_json(f"{self.control_plane_url}/status")

    def wait_converged(self, after: float = 0.0, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until a config applied at or after `after` (epoch seconds) is ACKed by every
        connected Envoy for every resource type; return that status."""
        return observe.wait_converged(self.control_plane_url, after, timeout=timeout)

    def config_dump(self) -> dict[str, Any]:
        """Envoy admin `/config_dump`."""
        return observe.config_dump(self.envoy_admin_url)

    def applied_traffic(self, model: str | None = None) -> dict[str, int]:
        """The weights Envoy applies to a model's split route, read from `/config_dump`.
        Versions of weight 0 are absent; a single live version reads as 100."""
        model = model or self._only_model()
        split = observe.route(self.envoy_admin_url, f"{model}/split")
        return observe.weights(split["route"], f"{model}/")

    def envoy_stat(self, name: str) -> int:
        """One Envoy counter or gauge (0 when absent), e.g.
        `cluster.iris/v1.outlier_detection.ejections_enforced_total`."""
        return observe.envoy_stat(self.envoy_admin_url, name)

    def ejected_hosts(self, version: str, model: str | None = None) -> list[str]:
        """`host:port` of the version's endpoints that outlier detection ejected now."""
        cluster = f"{model or self._only_model()}/{version}"
        hosts = observe.hosts(self.envoy_admin_url, cluster)
        return [addr for addr, host in hosts.items() if "failed_outlier_check" in host["health"]]


def _logs(container: Any) -> str:
    try:
        out, err = container.get_logs()
        text = (out + err).decode(errors="replace")
    except Exception as exc:  # noqa: BLE001 - logs are best effort
        text = f"(no logs: {exc})"
    name = " ".join(container._command) if isinstance(container._command, list) else "?"
    return f"--- container `{name}` ---\n{text[-4000:]}"


def _free_ports() -> Iterator[int]:
    """Distinct free ports of 127.0.0.1."""
    taken: set[int] = set()
    while True:
        if (port := free_port()) not in taken:
            taken.add(port)
            yield port


def _with_ports(routing: dict[str, Any], ports: Iterator[int]) -> dict[str, Any]:
    """A copy of the routing with `listen` and every endpoint on a port from `ports`."""
    routing = copy.deepcopy(routing)
    routing["listen"] = f"127.0.0.1:{next(ports)}"
    for model in routing["models"].values():
        for spec in model["versions"].values():
            spec["endpoints"] = [f"127.0.0.1:{next(ports)}" for _ in spec["endpoints"]]
    return routing


@contextmanager
def gateway_stack(
    routing: str | Path,
    models: str | Path,
    image: str = DEFAULT_IMAGE,
    delta: bool = False,
) -> Iterator[GatewayStack]:
    """Start model servers, control plane and Envoy in containers from a routing YAML and a
    model folder (`<models>/<model>/<version>/...`); yield the converged stack; remove
    every container afterwards. `delta` makes Envoy use Delta (incremental) xDS."""
    require_docker(image)
    source = Path(routing)
    parse(source.read_text(), str(source))  # report a bad file with its line numbers
    ports = _free_ports()
    doc = _with_ports(yaml.safe_load(source.read_text()), ports)
    models_path = Path(models).resolve()
    for name, model in doc["models"].items():
        for version in model["versions"]:
            if not (models_path / name / version).is_dir():
                raise FileNotFoundError(f"no model folder {models_path / name / version}")

    workdir = Path(tempfile.mkdtemp(prefix="infergate-stack-"))
    os.chmod(workdir, 0o755)  # readable by the containers' user
    routing_path = workdir / "routing.yaml"
    routing_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    stack = GatewayStack(
        image=image,
        routing_path=routing_path,
        models_path=models_path,
        routing=doc,
        port=int(doc["listen"].rsplit(":", 1)[1]),
        xds_port=next(ports),
        admin_port=next(ports),
        envoy_admin_port=next(ports),
        delta=delta,
    )
    try:
        try:
            stack.start_model_servers()
            stack.start_control_plane()
            stack.start_envoy()
            stack.wait_converged()
        except Exception as exc:
            raise RuntimeError(f"the stack did not start: {exc}\n{stack.logs()}") from exc
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)
