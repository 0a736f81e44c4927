"""The embedded default: control plane, one Envoy and the model servers on one machine.

Before starting anything, the supervisor locks its run folder (a second `infergate run`
on the same folder stops there, leaving the first one's files alone) and checks that
every address it will listen on is free. Children run in their own sessions and die with
the supervisor; on Ctrl-C or SIGTERM the supervisor stops Envoy first, then the control
plane, then the model servers (which drain), and leaves no process behind.

A child that exits is restarted; while it keeps failing soon after its start the delay
doubles (1 s, 2 s, ... up to 30 s), and each restart says why, with the end of the
child's log. If the control plane or Envoy cannot start at all, `run` fails.

Versions with `replicas` or `autoscale` are followed: on every valid save of the file the
supervisor reconciles their replicas (`gateway/replicas.py`), which get free ports, register
with the control plane once ready, and are deregistered and drained before they stop. Model
servers listed as `endpoints` on this machine are started only at its start; when a saved
edit adds one, it says that the endpoint is not served until a restart. Replica states go to
`<workdir>/replicas.json`, which `infergate status` shows.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from control_plane.config import ConfigError, RoutingConfig, load
from control_plane.ports import ensure_free
from control_plane.upstream_tls import read
from gateway import processes
from gateway.activator import Activator
from gateway.autoscaling import PERIOD, Autoscaling
from gateway.envoy_proxy import envoy_child
from gateway.executors import Executor, LocalExecutor, with_tls
from gateway.processes import (
    STABLE_AFTER,
    Child,
    host_port,
    infergate_command,
    model_server_child,
    restart_delay,
    wait_http,
)
from gateway.registration import Registration
from gateway.replicas import Replicas

log = logging.getLogger("infergate.supervisor")
TERMINAL = {"terminal": True}


class StartFailed(Exception):
    """The control plane or Envoy could not start; the message says why in one line."""


class RunFolderInUse(Exception):
    pass


@dataclass(frozen=True)
class StackAddresses:
    xds: tuple[str, int] = ("127.0.0.1", 18000)
    admin: tuple[str, int] = ("127.0.0.1", 18001)
    envoy_admin: tuple[str, int] = ("127.0.0.1", 9901)


@dataclass(frozen=True)
class LocalServer:
    """A model server that `run` starts: one loopback endpoint of a version (with the
    version's n-th gRPC endpoint, if any, as its gRPC port)."""

    model: str
    version: str
    address: tuple[str, int]
    grpc_port: int | None

    def __str__(self) -> str:
        grpc = f" (gRPC port {self.grpc_port})" if self.grpc_port else ""
        return f"{self.model}/{self.version} at {host_port(self.address)}{grpc}"


def local_servers(config: RoutingConfig) -> Iterator[LocalServer]:
    for model in config.models:
        for version in model.versions:
            grpc_ports = [g.port for g in version.grpc_endpoints]
            for i, ep in enumerate(version.endpoints):
                if ep.host.startswith("127."):
                    grpc_port = grpc_ports[i] if i < len(grpc_ports) else None
                    yield LocalServer(model.name, version.name, (ep.host, ep.port), grpc_port)


def fixed_replicas(config: RoutingConfig) -> dict[tuple[str, str], int]:
    """Replicas per version with `replicas: N`."""
    return {
        (model.name, version.name): version.replicas
        for model in config.models
        for version in model.versions
        if version.replicas is not None
    }


def own_admin_token(workdir: Path) -> Path:
    """A fresh admin token in `workdir/admin-token` (0600), for registering replicas."""
    path = workdir / "admin-token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32))
    return path


def listen_addresses(config: RoutingConfig) -> Iterator[tuple[tuple[str, int], str]]:
    """Every address that Envoy will listen on for this config, with what it is for."""
    yield (config.listen.host, config.listen.port), "gateway (listen)"
    for model in config.models:
        if model.grpc_listen:
            address = (model.grpc_listen.host, model.grpc_listen.port)
            yield address, f"{model.name} gRPC gateway (grpc_listen)"


def lock_run_folder(workdir: Path) -> IO[str]:
    """Hold an exclusive lock on `workdir/lock` (with our pid in it) while we run."""
    workdir.mkdir(parents=True, exist_ok=True)
    lock = open(workdir / "lock", "a+")  # noqa: SIM115 (held until the supervisor exits)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        pid = lock.read().strip() or "?"
        lock.close()
        raise RunFolderInUse(
            f"{workdir}/ is in use by another infergate run (pid {pid}): "
            "stop that one, or give this one another --workdir and other ports"
        ) from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def log_tail(child: Child, lines: int = 3) -> str:
    """The last lines of a child's log, as one line."""
    return processes.log_tail(child.log_path, lines)


@dataclass
class _Restarts:
    failures: int = 0  # exits in a row, each soon after its start
    started_at: float = 0.0
    restart_at: float | None = None  # scheduled restart of an exited child


@dataclass
class Restarter:
    """Restart children that exit, backing off exponentially while they keep failing."""

    children: list[Child]
    state: dict[str, _Restarts] = field(default_factory=dict)

    def started(self, child: Child, now: float) -> None:
        self.state[child.name] = _Restarts(self.state.get(child.name, _Restarts()).failures, now)

    def check(self, now: float) -> None:
        for child in self.children:
            state = self.state.setdefault(child.name, _Restarts(started_at=now))
            if child.running:
                if state.failures and now - state.started_at >= STABLE_AFTER:
                    state.failures = 0
            elif state.restart_at is None:
                self._exited(child, state, now)
            elif now >= state.restart_at:
                child.start()
                self.started(child, now)

    def _exited(self, child: Child, state: _Restarts, now: float) -> None:
        ran = now - state.started_at
        state.failures = state.failures + 1 if ran < STABLE_AFTER else 1
        delay = restart_delay(state.failures)
        state.restart_at = now + delay
        code = child.proc.returncode if child.proc else None
        again = f", {state.failures} times in a row" if state.failures > 1 else ""
        tail = log_tail(child)
        log.warning(
            "%s exited with code %s after %.1f s%s; restarting in %.0f s%s",
            child.name,
            code,
            ran,
            again,
            delay,
            f". Its log ends: {tail}" if tail else "",
        )


class Supervisor:
    def __init__(
        self,
        config_path: Path,
        repository: Path,
        workdir: Path,
        addresses: StackAddresses = StackAddresses(),
        admin_token_file: Path | None = None,
        executor: Executor | None = None,
        activation_timeout: float = 25.0,
    ):
        self.config_path = config_path
        self.repository = repository
        self.addresses = addresses
        self.workdir = workdir
        config = load(config_path)
        self.listen = config.listen
        self._lock = lock_run_folder(workdir)
        try:
            self._check_addresses(config)
        except OSError:
            self._lock.close()
            raise
        self._told: set[LocalServer] = set()  # servers we said we would not start
        self.servers = self._servers_to_start(config)
        self.models = [
            with_tls(
                model_server_child(
                    str(repository),
                    s.model,
                    s.version,
                    s.address,
                    str(workdir / f"model-{s.model}-{s.version}-{s.address[1]}.log"),
                    s.grpc_port,
                ),
                config.upstream_tls,
            )
            for s in self.servers
        ]
        admin_token_file = admin_token_file or own_admin_token(workdir)
        token = ["--admin-token-file", str(admin_token_file)]
        self.control_plane = Child(
            "control plane",
            infergate_command(
                "--log-file",
                str(workdir / "control-plane.log"),
                "control-plane",
                str(config_path),
                "--xds",
                host_port(addresses.xds),
                "--admin",
                host_port(addresses.admin),
                *token,
            ),
            str(workdir / "control-plane.log"),
            terminal=True,
        )
        self.envoy = envoy_child("infergate-local", addresses.xds, addresses.envoy_admin, workdir)
        self.restarter = Restarter(self.children)
        admin_url, admin_token = (
            f"http://{host_port(addresses.admin)}",
            admin_token_file.read_text().strip(),
        )
        self.replicas = Replicas(
            executor or LocalExecutor(repository),
            admin_url,
            admin_token,
            f"http://{host_port(addresses.envoy_admin)}",
            workdir,
        )
        self.autoscaling = Autoscaling(admin_url, admin_token)
        self.activator = Activator(activation_timeout, config.upstream_tls)
        self._gates: set[tuple[str, str]] = set()  # registered with the control plane
        self._zero_pending: set[tuple[str, str]] = set()  # to zero once its gate is in Envoy
        self._config = config
        self._status_text = ""
        self._next_autoscale = 0.0
        self._config_stat: tuple[int, int] | None = None
        self._stop = threading.Event()

    def _check_addresses(self, config: RoutingConfig) -> None:
        """Raise AddressInUse for the first address that something else listens on."""
        own = [
            (self.addresses.xds, "xDS"),
            (self.addresses.admin, "control-plane admin"),
            (self.addresses.envoy_admin, "Envoy admin"),
            *listen_addresses(config),
        ]
        for server in local_servers(config):
            own.append((server.address, f"model server {server.model}/{server.version}"))
            if server.grpc_port:
                own.append(((server.address[0], server.grpc_port), f"{server} gRPC"))
        for address, what in own:
            ensure_free(address, what)

    def _servers_to_start(self, config: RoutingConfig) -> list[LocalServer]:
        servers = []
        for server in local_servers(config):
            if (self.repository / server.model / server.version).is_dir():
                servers.append(server)
            else:
                self._told.add(server)
                log.warning(
                    "no %s/%s in %s: not starting %s",
                    server.model,
                    server.version,
                    self.repository,
                    server,
                )
        return servers

    @property
    def children(self) -> list[Child]:
        return [*self.models, self.control_plane, self.envoy]

    def start(self) -> None:
        """Start model servers, control plane, then Envoy; StartFailed if the control plane
        or Envoy does not come up (a model server that fails is restarted later)."""
        now = time.monotonic()
        for child in self.models:
            child.start()
            self.restarter.started(child, now)
        tls = self._config.upstream_tls
        context = read(tls).client_context() if tls else None
        for child in self.models:  # Envoy's first health checks would find them down
            try:
                wait_http(child.ready_url, timeout=60, child=child, context=context)
            except (RuntimeError, TimeoutError) as exc:
                tail = log_tail(child)
                log.warning("%s did not start: %s. Its log ends: %s", child.name, exc, tail)
        for child, url in (
            (self.control_plane, f"http://{host_port(self.addresses.admin)}/healthz"),
            (self.envoy, f"http://{host_port(self.addresses.envoy_admin)}/ready"),
        ):
            child.start()
            self.restarter.started(child, time.monotonic())
            try:
                wait_http(url, child=child)
            except (RuntimeError, TimeoutError) as exc:  # it exited, or never answered
                why = str(exc) if isinstance(exc, RuntimeError) else f"{child.name}: {exc}"
                tail = log_tail(child)
                raise StartFailed(why + (f". Its log ends: {tail}" if tail else "")) from None
        self.follow(self._config)

    def follow(self, config: RoutingConfig) -> None:
        """Reconcile the replicas with a (new) valid config."""
        self._config = config
        self.replicas.tls = config.upstream_tls
        self.autoscaling.follow(config)
        self.reconcile()

    def reconcile(self) -> None:
        """Replicas as the file and the autoscaler want them; a version's last replica stays
        until Envoy routes to its activator gate instead (no request finds no endpoint)."""
        desired = {**fixed_replicas(self._config), **self.autoscaling.desired()}
        self._zero_pending = {
            key
            for key, n in desired.items()
            if n == 0 and key in self.replicas.replicas and not self._gate_in_envoy(key)
        }
        for key in self._zero_pending:
            desired[key] = 1
        self.replicas.reconcile(desired)

    def autoscale(self, now: float) -> None:
        """Decide every PERIOD (at once when a request waits for a version at zero)."""
        held = self.activator.held()
        desired = self.autoscaling.desired()
        if now >= self._next_autoscale or any(not desired.get(k) for k in held):
            self._next_autoscale = now + PERIOD
            if self.autoscaling.step(now, self.replicas.ready(), held):
                self.reconcile()
        self.activate()

    def activate(self) -> None:
        """Route versions that can scale to zero through the activator while they have no
        ready replica (or are about to have none); take it out once Envoy routes to one."""
        desired = self.autoscaling.desired()
        for key, reason in self.replicas.take_failed_starts().items():
            self.activator.fail(key, reason)
        for key, scaler in self.autoscaling.scalers.items():
            if scaler.spec.min > 0:
                continue
            ready = self.replicas.ready_addresses(key)
            self.activator.forward_to(key, ready[0] if ready else None)
            if not ready or not desired[key]:
                if key not in self._gates:
                    self._gate(key).register()
                    self._gates.add(key)
            elif key in self._gates and self._healthy_hosts(key) - {self.activator.open(key)}:
                self._gate(key).deregister()
                self._gates.discard(key)
        for key in [k for k in self.activator.gates if k not in self.autoscaling.scalers]:
            if key in self._gates:
                self._gate(key).deregister()
                self._gates.discard(key)
            self.activator.close(key)
        if any(self._gate_in_envoy(key) for key in self._zero_pending):
            self.reconcile()

    def _gate_in_envoy(self, key: tuple[str, str]) -> bool:
        return key in self._gates and self.activator.open(key) in self._healthy_hosts(key)

    def _gate(self, key: tuple[str, str]) -> Registration:
        return Registration(
            self.replicas.admin_url, self.replicas.token, *key, self.activator.open(key)
        )

    def _healthy_hosts(self, key: tuple[str, str]) -> set[str]:
        """ip:port of the hosts that Envoy counts healthy in the version's cluster."""
        url = f"http://{host_port(self.addresses.envoy_admin)}/clusters"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                lines = resp.read().decode().splitlines()
        except (urllib.error.URLError, OSError):
            return set()
        prefix = f"{key[0]}/{key[1]}::"
        return {
            line.split("::")[1]
            for line in lines
            if line.startswith(prefix) and line.endswith("::health_flags::healthy")
        }

    def stop(self) -> None:
        for child in (self.envoy, self.control_plane):
            child.stop()
        self.activator.stop()
        self.replicas.stop_all()
        for child in self.models:
            child.stop()
        self._lock.close()

    def write_status(self) -> None:
        """`<workdir>/replicas.json` (atomically), when it changed."""
        text = json.dumps(
            {
                "pid": os.getpid(),
                "versions": self.replicas.status(),
                "autoscale": self.autoscaling.status(),
            },
            indent=2,
        )
        if text != self._status_text:
            tmp = self.workdir / "replicas.json.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.workdir / "replicas.json")
            self._status_text = text

    def follow_file(self) -> None:
        """Say so when a saved edit adds a local endpoint that nothing started."""
        try:
            st = self.config_path.stat()
            if (st.st_mtime_ns, st.st_size) == self._config_stat:
                return
            self._config_stat = (st.st_mtime_ns, st.st_size)
            config = load(self.config_path)
        except (OSError, ConfigError):
            return  # the control plane reports a bad file
        self.follow(config)
        running = {(s.model, s.version, s.address): s for s in self.servers}
        for server in local_servers(config):
            if server in self.servers or server in self._told:
                continue
            self._told.add(server)
            old = running.get((server.model, server.version, server.address))
            if old:
                what = f"{old} runs, but {self.config_path} now wants {server}"
            else:
                what = f"{server} is in {self.config_path} but was not started by infergate run"
            log.warning(
                "%s: infergate run starts model servers only when it starts, "
                "so start it yourself or restart infergate run",
                what,
            )

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
            self.follow_file()
            while not self._stop.wait(0.1):
                self.restarter.check(time.monotonic())
                self.follow_file()
                self.autoscale(time.monotonic())
                self.replicas.tick()
                self.write_status()
        finally:
            self.stop()
            print("infergate: stopped", flush=True)
