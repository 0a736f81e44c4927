"""Keep each version's replicas as the routing file (and the autoscaler) wants them.

`Replicas.reconcile(desired)` sets how many replicas each version should have;
`Replicas.tick()` (called often from the supervisor's loop) moves every replica along:

    starting --ready URL answers, registered with the control plane--> ready
    ready --scaled down or removed: deregistered, gone from Envoy--> draining --SIGTERM, exit-->
    any --process exited--> backoff --delay (1 s doubling to 30 s)--> starting (a new port)

A replica gets a free port on 127.0.0.1 at each start. Processes are started only from the
caller's thread (their PR_SET_PDEATHSIG is tied to it); draining runs in a thread per replica,
so that a slow drain never holds up the loop. Registrations are compared with the control
plane's every `RESYNC` seconds and re-sent, so a restarted control plane gets them back.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from control_plane.upstream_tls import TlsFileError, UpstreamTls, read
from gateway.executors import Executor
from gateway.processes import STABLE_AFTER, Child, free_port, host_port, log_tail, restart_delay
from gateway.registration import Registration, refusal

log = logging.getLogger("infergate.replicas")

RESYNC = 2.0
GONE_TIMEOUT = 10.0  # wait at most this long for Envoy to drop a deregistered replica

Key = tuple[str, str]  # (model, version)


@dataclass
class Replica:
    key: Key
    slot: int
    child: Child | None = None
    address: tuple[str, int] = ("127.0.0.1", 0)
    state: str = "backoff"  # starting, ready, draining, backoff
    restarts: int = 0
    failures: int = 0  # quick exits in a row
    started_at: float = 0.0
    restart_at: float = 0.0
    last_exit: str = ""
    drained: threading.Event = field(default_factory=threading.Event)

    @property
    def name(self) -> str:
        return f"{self.key[0]}/{self.key[1]}#{self.slot}"


class Replicas:
    def __init__(
        self,
        executor: Executor,
        admin_url: str,
        token: str,
        envoy_admin_url: str,
        workdir: Path,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.executor = executor
        self.admin_url = admin_url
        self.token = token
        self.envoy_admin_url = envoy_admin_url
        self.workdir = workdir
        self.clock = clock
        self.desired: dict[Key, int] = {}
        self.replicas: dict[Key, list[Replica]] = {}
        self.draining: list[Replica] = []
        self.failed_starts: dict[Key, str] = {}  # exits before ready, until the supervisor reads
        self.tls: UpstreamTls | None = None  # the file's upstream_tls: replicas serve mTLS
        self._next_sync = 0.0

    def _registration(self, r: Replica) -> Registration:
        return Registration(self.admin_url, self.token, *r.key, host_port(r.address))

    # -- what is wanted

    def reconcile(self, desired: dict[Key, int]) -> None:
        """Start or drain replicas so that each version gets its desired count (by tick)."""
        self.desired = dict(desired)
        for key in list(self.replicas):
            want = desired.get(key, 0)
            current = self.replicas[key]
            while len(current) > want:
                self._drain(current.pop(), version_removed=key not in desired)
            if not current:
                del self.replicas[key]
        for key, want in desired.items():
            current = self.replicas.setdefault(key, [])
            while len(current) < want:
                current.append(Replica(key, len(current)))
            if not current:
                del self.replicas[key]

    # -- moving replicas along

    def tick(self) -> None:
        now = self.clock()
        for current in self.replicas.values():
            for r in current:
                self._step(r, now)
        self.draining = [r for r in self.draining if not r.drained.is_set()]
        if now >= self._next_sync:
            self._next_sync = now + RESYNC
            self._resync()

    def _step(self, r: Replica, now: float) -> None:
        if r.state == "backoff":
            if now >= r.restart_at:
                self._start(r, now)
            return
        assert r.child is not None
        if not r.child.running:
            self._exited(r, now)
        elif r.state == "starting" and self._answers(r.child.ready_url):
            try:
                self._registration(r).register()
            except (OSError, urllib.error.URLError) as exc:
                why = refusal(exc) if isinstance(exc, urllib.error.HTTPError) else exc
                log.warning("%s is ready but not registered yet (%s)", r.name, why)
                return
            r.state = "ready"
            log.info("%s ready at %s and registered", r.name, host_port(r.address))
        elif r.failures and now - r.started_at >= STABLE_AFTER:
            r.failures = 0

    def _start(self, r: Replica, now: float) -> None:
        r.address = ("127.0.0.1", free_port())
        model, version = r.key
        log_path = self.workdir / f"model-{model}-{version}-{r.slot}.log"
        r.child = self.executor.child(model, version, r.address, str(log_path), self.tls).start()
        r.state, r.started_at = "starting", now

    def _exited(self, r: Replica, now: float) -> None:
        assert r.child is not None and r.child.proc is not None
        if r.state == "ready":
            self._registration(r).deregister()
        ran = now - r.started_at
        r.failures = r.failures + 1 if ran < STABLE_AFTER else 1
        delay = restart_delay(r.failures)
        tail = log_tail(r.child.log_path)
        r.last_exit = f"exited with code {r.child.proc.returncode} after {ran:.1f} s"
        if r.state == "starting":
            self.failed_starts[r.key] = f"{r.name} {r.last_exit}"
        r.state, r.restart_at, r.restarts = "backoff", now + delay, r.restarts + 1
        again = f", {r.failures} times in a row" if r.failures > 1 else ""
        log.warning(
            "replica %s at %s %s%s; replacing it in %.0f s%s",
            r.name,
            host_port(r.address),
            r.last_exit,
            again,
            delay,
            f". Its log ends: {tail}" if tail else "",
        )

    def take_failed_starts(self) -> dict[Key, str]:
        """Versions whose replica exited before it was ready since the last call, and why."""
        failed, self.failed_starts = self.failed_starts, {}
        return failed

    def _answers(self, url: str | None) -> bool:
        """Whether the ready URL answers 200 (over https with the mesh's client certificate
        when the replica serves mutual TLS)."""
        try:
            context = read(self.tls).client_context() if self.tls else None
            with urllib.request.urlopen(url, timeout=0.5, context=context) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError, TlsFileError):
            return False

    def _resync(self) -> None:
        """Register again every ready replica that the control plane does not list."""
        try:
            with urllib.request.urlopen(self.admin_url + "/endpoints", timeout=1) as resp:
                listed = {
                    (e["model"], e["version"], e["address"]) for e in json.load(resp)["endpoints"]
                }
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            return
        for current in self.replicas.values():
            for r in current:
                if r.state == "ready" and (*r.key, host_port(r.address)) not in listed:
                    log.info("registering %s again with the control plane", r.name)
                    try:
                        self._registration(r).register()
                    except (OSError, urllib.error.URLError) as exc:
                        log.warning("could not register %s again: %s", r.name, exc)

    # -- draining and stopping

    def _drain(self, r: Replica, version_removed: bool = False) -> None:
        """Deregister, wait until Envoy no longer routes to it, then SIGTERM (it drains).

        When its version left the file, Envoy's routes may still send it requests until they
        are replaced: wait until the control plane has removed the version's cluster first."""
        if r.child is None or not r.child.running:
            r.drained.set()
            return
        was_ready, r.state = r.state == "ready", "draining"
        self.draining.append(r)

        def run() -> None:
            if was_ready:
                if version_removed:
                    self._wait_gone_from_envoy(f"{r.key[0]}/{r.key[1]}::", r.name)
                self._registration(r).deregister()
                self._wait_gone_from_envoy(
                    f"{r.key[0]}/{r.key[1]}::{host_port(r.address)}::", r.name
                )
            code = r.child.stop(timeout=30)
            log.info(
                "replica %s at %s drained and stopped (code %s)", r.name, host_port(r.address), code
            )
            r.drained.set()

        threading.Thread(target=run, daemon=True, name=f"drain {r.name}").start()

    def _wait_gone_from_envoy(self, needle: str, name: str) -> None:
        """Until no line of Envoy's /clusters starts with `needle`."""
        deadline = time.monotonic() + GONE_TIMEOUT
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.envoy_admin_url + "/clusters", timeout=5) as resp:
                    if not any(
                        line.startswith(needle) for line in resp.read().decode().splitlines()
                    ):
                        return
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, ConnectionRefusedError):
                    return  # no Envoy: nothing routes to it
            except ConnectionRefusedError:
                return
            except OSError:
                pass  # a slow answer on a busy machine is not "gone": ask again
            time.sleep(0.05)
        log.warning("Envoy still lists %s after %.0f s; going on", name, GONE_TIMEOUT)

    def stop_all(self) -> None:
        """Stop every replica (SIGTERM, all at once: Envoy is already gone) and wait."""
        every = [r for current in self.replicas.values() for r in current] + self.draining
        for r in every:
            if r.child is not None and r.child.running:
                r.child.proc.terminate()
        for r in every:
            if r.child is not None:
                r.child.stop(timeout=30)
        self.replicas.clear()

    # -- status

    def ready_addresses(self, key: Key) -> list[str]:
        return [host_port(r.address) for r in self.replicas.get(key, []) if r.state == "ready"]

    def ready(self) -> dict[Key, int]:
        return {
            key: sum(r.state == "ready" for r in current) for key, current in self.replicas.items()
        }

    def status(self) -> list[dict]:
        out = []
        for key in sorted({*self.replicas, *(r.key for r in self.draining)}):
            rows = [*self.replicas.get(key, []), *(r for r in self.draining if r.key == key)]
            out.append(
                {
                    "model": key[0],
                    "version": key[1],
                    "desired": self.desired.get(key, 0),
                    "replicas": [
                        {
                            "slot": r.slot,
                            "address": host_port(r.address),
                            "state": r.state,
                            "restarts": r.restarts,
                            "last_exit": r.last_exit,
                        }
                        for r in rows
                    ],
                }
            )
        return out
