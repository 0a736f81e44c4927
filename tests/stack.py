"""Test harness: real model servers, control plane and Envoy on 127.0.0.1, free ports."""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from gateway import observe
from gateway.bootstrap import XdsTls
from gateway.envoy_proxy import envoy_child, envoy_path
from gateway.observe import get_json, get_text  # noqa: F401 (the tests read admin pages with them)
from gateway.processes import (
    Child,
    free_port,
    infergate_command,
    model_server_child,
    wait_http,
)

IRIS_BODY = json.dumps(
    {
        "inputs": [
            {"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}
        ]
    }
).encode()


cli = infergate_command
ADMIN_TOKEN = "s3cret-token"  # the control planes' admin token in tests


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    """Whether `pid` runs (exists and is no zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def cmdline(pid: int) -> str:
    """The command line of `pid`, arguments separated by spaces ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def poll(condition: Callable[[], object], timeout: float = 15.0, what: str = "") -> object:
    """The first truthy value of `condition()`, polling until `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            assert value, f"timed out waiting for {what}"
            return value
        time.sleep(0.05)


def binomial_p_value(k: int, n: int, p: float) -> float:
    """Exact two-sided binomial test: P(outcomes no likelier than k)."""

    def logpmf(i: int) -> float:
        return (
            math.lgamma(n + 1)
            - math.lgamma(i + 1)
            - math.lgamma(n - i + 1)
            + i * math.log(p)
            + (n - i) * math.log1p(-p)
        )

    observed = logpmf(k)
    return min(1.0, sum(math.exp(logpmf(i)) for i in range(n + 1) if logpmf(i) <= observed + 1e-9))


@dataclass
class Reply:
    status: int
    version: str | None
    body: bytes


def infer(
    port: int,
    path: str = "/v2/models/iris/infer",
    headers: dict | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> Reply:
    """One inference request through a (possibly reused) connection."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(
            "POST", path, IRIS_BODY, {"content-type": "application/json", **(headers or {})}
        )
        resp = conn.getresponse()
        body = resp.read()
    finally:
        if own:
            conn.close()
    version = None
    if resp.status == 200:
        version = json.loads(body).get("model_version")
    return Reply(resp.status, version, body)


def count_versions(port: int, n: int, **kwargs) -> Counter:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        return Counter(infer(port, conn=conn, **kwargs).version for _ in range(n))
    finally:
        conn.close()


@dataclass
class LoadLoop:
    """Steady requests from background threads; records (sent at, status, version, detail)."""

    port: int
    threads: int = 2
    rate: float = 100.0  # requests per second per thread at most (0: as fast as answered)
    results: list[tuple[float, int, str | None, str]] = field(default_factory=list)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (sent at, seconds)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _work(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        deadline = time.monotonic() + 120  # bounded even if stop() is never called
        due = time.monotonic()
        while not self._stop.is_set() and time.monotonic() < deadline:
            if self.rate:  # paced: a late request is sent at once, never a burst after it
                due = max(due + 1 / self.rate, time.monotonic())
                self._stop.wait(due - time.monotonic())
            sent = time.monotonic()
            try:
                reply = infer(self.port, conn=conn)
                detail = "" if reply.status == 200 else reply.body[:200].decode(errors="replace")
                self.results.append((sent, reply.status, reply.version, detail))
                self.latencies.append((sent, time.monotonic() - sent))
            except (OSError, http.client.HTTPException) as exc:
                self.results.append((sent, 0, None, repr(exc)))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.close()

    def __enter__(self) -> LoadLoop:
        self._workers = [
            threading.Thread(target=self._work, daemon=True) for _ in range(self.threads)
        ]
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(15)

    def wait_results(self, more: int, timeout: float = 30.0) -> None:
        """Wait until `more` further requests have been answered (or failed)."""
        target = len(self.results) + more
        deadline = time.monotonic() + timeout
        while len(self.results) < target:
            assert time.monotonic() < deadline, f"only {len(self.results)} of {target} requests"
            time.sleep(0.02)

    def p99(self, since: float, until: float = math.inf) -> float:
        """The 99th percentile latency (s) of the requests sent in [since, until)."""
        times = sorted(d for t, d in self.latencies if since <= t < until)
        assert times, "no request in that span"
        return times[min(len(times) - 1, math.ceil(0.99 * len(times)) - 1)]

    def failures(self) -> list[tuple[float, int, str | None, str]]:
        return [r for r in self.results if r[1] != 200]

    def versions_since(self, t: float) -> Counter:
        return Counter(r[2] for r in self.results if r[0] >= t and r[1] == 200)


def routing_yaml(
    listen: int,
    ports: dict[str, list[int]],
    traffic: dict[str, int],
    shadow: tuple[str, float] | None = None,
    extra: str = "",
    grpc: tuple[int, dict[int, int]] | None = None,
) -> str:
    """iris with `ports` per version; with `grpc` (listen port, gRPC port per HTTP port)
    Envoy also serves the model's gRPC API."""
    lines = [f"listen: 127.0.0.1:{listen}", "models:", "  iris:"]
    if grpc:
        lines.append(f"    grpc_listen: 127.0.0.1:{grpc[0]}")
    lines.append("    versions:")
    for version, replicas in ports.items():
        endpoints = ", ".join(f"127.0.0.1:{p}" for p in replicas)
        line = f"      {version}: {{endpoints: [{endpoints}]"
        if grpc:
            line += ", grpc_endpoints: [" + ", ".join(f"127.0.0.1:{grpc[1][p]}" for p in replicas)
            line += "]"
        lines.append(line + "}")
    lines.append("    traffic: {" + ", ".join(f"{v}: {w}" for v, w in traffic.items()) + "}")
    if shadow:
        lines.append(f"    shadow: {{version: {shadow[0]}, percent: {shadow[1]}}}")
    return "\n".join(lines) + "\n" + extra


class Stack:
    """Model servers for iris versions (`replicas` per version: v1-v3 once each by default),
    a control plane process and one Envoy."""

    def __init__(
        self,
        workdir: Path,
        repository: Path,
        delta: bool = False,
        replicas: dict[str, int] | None = None,
        grpc: bool = False,
        model_options: tuple[str, ...] = (),
    ):
        self.delta = delta
        self.model_options = model_options  # more `infergate serve` options
        self.workdir = workdir
        self.repository = repository
        self.config = workdir / "routing.yaml"
        self.listen = free_port()
        self.xds = free_port()
        self.admin = free_port()
        self.envoy_admin = free_port()
        self.control_plane_url = f"http://127.0.0.1:{self.admin}"
        self.envoy_url = f"http://127.0.0.1:{self.envoy_admin}"  # the main Envoy's admin
        replicas = replicas or {"v1": 1, "v2": 1, "v3": 1}
        self.model_ports = {v: [free_port() for _ in range(n)] for v, n in replicas.items()}
        self.grpc: tuple[int, dict[int, int]] | None = None
        if grpc:  # Envoy's gRPC listener, and each model server's gRPC port
            ports = [p for replica_ports in self.model_ports.values() for p in replica_ports]
            self.grpc = (free_port(), {p: free_port() for p in ports})
        self.models: dict[int, Child] = {}  # by port
        self.control_plane: Child | None = None
        self.envoy: Child | None = None
        self.envoys: list[Child] = []

    # --- processes -------------------------------------------------------------------
    def start_models(self) -> None:
        for version, ports in self.model_ports.items():
            for port in ports:
                log = str(self.workdir / f"model-{version}-{port}.log")
                grpc_port = self.grpc[1][port] if self.grpc else None
                address = ("127.0.0.1", port)
                child = model_server_child(
                    str(self.repository),
                    "iris",
                    version,
                    address,
                    log,
                    grpc_port,
                    self.model_options,
                )
                self.models[port] = child.start()
        for port, child in self.models.items():
            self.wait_model_ready(port, child)

    def wait_model_ready(self, port: int, child: Child) -> None:
        wait_http(f"http://127.0.0.1:{port}/v2/health/ready", child=child)

    def start_all(self, traffic: dict[str, int], *control_plane_options: str) -> Stack:
        """The routing file, the control plane (starting while the model servers load), the
        model servers and the main Envoy, converged."""
        self.route(traffic)
        self.launch_control_plane(*control_plane_options)
        self.start_models()
        self.wait_control_plane()
        self.start_envoy()
        self.wait_converged()
        return self

    def start_control_plane(self, *options: str) -> None:
        self.launch_control_plane(*options)
        self.wait_control_plane()

    def wait_control_plane(self) -> None:
        assert self.control_plane
        wait_http(f"http://127.0.0.1:{self.admin}/healthz", child=self.control_plane)

    def launch_control_plane(self, *options: str) -> None:
        argv = cli(
            "control-plane",
            str(self.config),
            "--xds",
            f"127.0.0.1:{self.xds}",
            "--admin",
            f"127.0.0.1:{self.admin}",
            *options,
        )
        log = str(self.workdir / "control-plane.log")
        self.control_plane = Child("control plane", argv, log).start()

    def start_envoy(self, node_id: str = "test-envoy") -> None:
        """The stack's main Envoy, serving the listener once it has its config."""
        self.envoy = self.launch_envoy(node_id, self.envoy_admin, self.delta)
        wait_http(f"http://127.0.0.1:{self.envoy_admin}/ready", timeout=60, child=self.envoy)

    def launch_envoy(
        self,
        node_id: str,
        admin: int,
        delta: bool,
        tls: XdsTls | None = None,
        listen: int | None = None,
    ) -> Child:
        """Start one more Envoy on the same control plane (without waiting for it), serving
        on port `listen` of its own when given (listeners never share a port)."""
        assert Path(envoy_path()).exists()
        child = envoy_child(
            node_id,
            ("127.0.0.1", self.xds),
            ("127.0.0.1", admin),
            self.workdir,
            "info",
            delta=delta,
            tls=tls,
            listen=f"127.0.0.1:{listen}" if listen else None,
        ).start()
        self.envoys.append(child)
        return child

    def stop(self) -> None:
        for child in (*self.envoys, self.control_plane, *self.models.values()):
            if child:
                child.stop()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- config and observation ------------------------------------------------------
    def write(self, text: str) -> None:
        """Replace the routing file atomically, as editors do."""
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config)

    def route(self, traffic: dict[str, int], shadow: tuple[str, float] | None = None) -> str:
        text = routing_yaml(self.listen, self.model_ports, traffic, shadow, grpc=self.grpc)
        self.write(text)
        return text

    def status(self) -> dict:
        return observe.get_json(f"{self.control_plane_url}/status")

    def wait_converged(self, timeout: float = 30.0, after: float = 0.0, nodes: int = 1) -> dict:
        """Wait until a snapshot applied after `after` is ACKed by every connected Envoy
        (at least `nodes` of them) for every type."""
        return observe.wait_converged(self.control_plane_url, after, nodes, timeout)

    def apply(self, traffic: dict[str, int], shadow: tuple[str, float] | None = None) -> None:
        """Write the routing file and wait until Envoy runs it (at once if unchanged)."""
        before = self.config.read_text() if self.config.exists() else ""
        started = time.time()
        changed = self.route(traffic, shadow) != before
        self.wait_converged(after=started if changed else 0.0)

    def envoy_stat(self, name: str) -> int:
        return observe.envoy_stat(self.envoy_url, name)

    def model_requests(self, version: str) -> float:
        """Inference requests the version's model servers have counted (their /metrics)."""
        return sum(self.port_requests(port) for port in self.model_ports[version])

    @staticmethod
    def port_requests(port: int) -> float:
        """Inference requests the model server on `port` has counted."""
        return observe.scrape(f"http://127.0.0.1:{port}/metrics", "infergate_model_requests_total")

    def serve_until_replica_answers(self, port: int, timeout: float = 30.0) -> None:
        """Send requests through Envoy until the model server on `port` has answered one."""
        before = self.port_requests(port)
        deadline = time.monotonic() + timeout
        while self.port_requests(port) == before:
            assert time.monotonic() < deadline, f"the replica on port {port} got no request"
            count_versions(self.listen, 20)

    def wait_healthy(self, cluster: str, endpoint: str, timeout: float = 20.0) -> None:
        """Wait until the main Envoy holds `endpoint` in `cluster` and passes its health checks."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            host = observe.hosts(self.envoy_url, cluster).get(endpoint)
            if host is not None and not host["health"]:
                return
            time.sleep(0.05)
        raise TimeoutError(
            f"{endpoint} not healthy in {cluster}: {observe.hosts(self.envoy_url, cluster)}"
        )


@contextmanager
def ninety_ten(workdir: Path, repository: Path) -> Iterator[Stack]:
    """A started stack with iris v1 and v2 (one server each) routed 90/10."""
    with Stack(workdir, repository, replicas={"v1": 1, "v2": 1}) as s:
        s.start_all({"v1": 90, "v2": 10})
        yield s
