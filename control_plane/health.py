"""Which versions can answer: the control plane probes every endpoint it routes to.

Every version takes traffic in some way (a weight, the shadow, or a pin by path or
header), so a version without a healthy endpoint is reported, in the log and in
`/status`. The control plane probes by itself instead of asking Envoy (health discovery
service) because that covers versions at weight 0, gRPC ports and any number of Envoys
alike; the limit is that the control plane must reach the model servers.

HTTP endpoints answer `GET /v2/health/ready` (over mutual TLS with `upstream_tls`, with
the same client certificate as Envoy); gRPC endpoints must accept a TCP connection.

Probing shares the event loop with the xDS streams and the builds, and one probe costs
about 0.25 ms of CPU: at 1,000 models (6,000 endpoints) an unbounded round took 1.3-2 s of
CPU every second and delayed edits by 400-600 ms. So a round probes in batches, and after
each batch it waits long enough that probing uses at most `cpu_share` of the process's CPU
time: small configs are probed every `interval`, large ones as fast as the share allows.
No batch starts while a snapshot is built and pushed (`hold`): at 1,000 models the build
thread waited for the GIL on the probing loop (build 15 ms alone, 47 ms beside probes).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from control_plane.config import Endpoint, Model, RoutingConfig

log = logging.getLogger("infergate.health")
TERMINAL = {"terminal": True}  # an INFO line that the terminal shows too
MAX_HOLD = 2.0  # seconds a batch waits for `hold` at most (edits in a row never starve probes)


@dataclass(frozen=True)
class Target:
    model: str
    version: str
    protocol: str  # "http" or "grpc"
    address: Endpoint


# A probe returns None when the target is healthy, otherwise the reason it is not.
Probe = Callable[[Target], Awaitable[str | None]]


@dataclass
class EndpointHealth:
    healthy: bool | None = None  # None until probed
    failures: int = 0
    reason: str | None = None


def role(model: Model, version: str) -> str:
    """How a version takes traffic: its weight, the shadow, or only when pinned."""
    weight = dict(model.traffic).get(version, 0)
    if weight:
        return f"weight {weight}"
    if model.shadow and model.shadow.version == version:
        return f"shadow {model.shadow.percent:g}%"
    return "pinned only"


def targets(model: Model) -> list[Target]:
    found = []
    for version in model.versions:
        found += [Target(model.name, version.name, "http", ep) for ep in version.endpoints]
        if model.grpc_listen:
            found += [Target(model.name, version.name, "grpc", ep) for ep in version.grpc_endpoints]
    return found


@dataclass(eq=False)
class HealthMonitor:
    """Probe the endpoints of the current config; an endpoint turns unhealthy after
    `unhealthy_after` failed probes in a row (the first probe decides at once) and healthy
    after one good probe. Changes are logged, one line each. A round probes `batch`
    endpoints at a time and keeps its CPU time (`cpu_clock`) under `cpu_share`."""

    probe: Probe | None = None
    interval: float = 1.0
    unhealthy_after: int = 2
    batch: int = 32
    cpu_share: float = 0.1
    cpu_clock: Callable[[], float] = time.process_time
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    hold: Callable[[], float] = lambda: 0.0  # seconds before the next batch (a build runs)
    config: RoutingConfig | None = field(default=None, init=False)
    tls: ssl.SSLContext | None = field(default=None, init=False)  # client side of mutual TLS
    endpoints: dict[Target, EndpointHealth] = field(default_factory=dict, init=False)
    _targets: dict[str, tuple[Model, list[Target]]] = field(default_factory=dict, init=False)
    _down: set[tuple[str, str, str]] = field(default_factory=set, init=False)  # reported

    def set_config(self, config: RoutingConfig, tls: ssl.SSLContext | None = None) -> None:
        """Probe this config's endpoints from now on (keeping what is known of old ones),
        over TLS with this client context if given."""
        self.config = config
        self.tls = tls
        # Only the changed models' targets are made again (all of them at 1,000 models took
        # 16 ms on the event loop, right when streams push an edit).
        before, self._targets = self._targets, {}
        for model in config.models:
            last = before.pop(model.name, None)
            if last is not None and (last[0] is model or last[0] == model):
                self._targets[model.name] = last
                continue
            known = (
                {t: self.endpoints.pop(t) for t in last[1] if t in self.endpoints} if last else {}
            )
            found = targets(model)
            self._targets[model.name] = (model, found)
            for target in found:
                self.endpoints[target] = known.get(target) or EndpointHealth()
        for _, gone in before.values():  # removed models
            for target in gone:
                self.endpoints.pop(target, None)

    async def check(self) -> None:
        """Probe every endpoint once, a batch at a time, and report what changed."""
        assert self.probe is not None
        checked = list(self.endpoints)
        for start in range(0, len(checked), self.batch):
            held = 0.0
            while (wait := self.hold()) > 0 and held < MAX_HOLD:
                step = min(wait, 0.05)
                await self.sleep(step)
                held += step
            began = self.cpu_clock()
            batch = checked[start : start + self.batch]
            results = await asyncio.gather(*(self.probe(t) for t in batch))
            for target, reason in zip(batch, results, strict=True):
                if target in self.endpoints:  # the config may have changed meanwhile
                    self._record(target, self.endpoints[target], reason)
            used = self.cpu_clock() - began
            await self.sleep(used * (1 - self.cpu_share) / self.cpu_share)
        self._report_versions()

    def _record(self, target: Target, state: EndpointHealth, reason: str | None) -> None:
        name = f"{target.model}/{target.version} {target.protocol} endpoint {target.address}"
        if reason is None:
            if state.healthy is False:
                log.info("%s is healthy again", name, extra=TERMINAL)
            state.healthy, state.failures, state.reason = True, 0, None
            return
        state.failures += 1
        state.reason = reason
        if state.healthy is not False and (
            state.healthy is None or state.failures >= self.unhealthy_after
        ):
            state.healthy = False
            log.warning("%s is unhealthy: %s", name, reason)

    def _report_versions(self) -> None:
        for entry in self.versions():
            for protocol in ("http", "grpc"):
                counts = entry[protocol]
                if counts is None:
                    continue
                key = (entry["model"], entry["version"], protocol)
                down = counts["healthy"] == 0 and counts["unknown"] == 0
                if down and key not in self._down:
                    self._down.add(key)
                    log.warning(
                        "%s/%s (%s) has no healthy %s endpoint (0 of %d): "
                        "its requests fail with 503",
                        entry["model"],
                        entry["version"],
                        entry["role"],
                        protocol.upper(),
                        counts["total"],
                    )
                elif not down and counts["healthy"] and key in self._down:
                    self._down.discard(key)
                    log.info(
                        "%s/%s serves %s again (%d of %d endpoints healthy)",
                        entry["model"],
                        entry["version"],
                        protocol.upper(),
                        counts["healthy"],
                        counts["total"],
                        extra=TERMINAL,
                    )

    def versions(self) -> list[dict[str, Any]]:
        """Per version: its role, and per protocol healthy/unknown/total endpoint counts."""
        if self.config is None:
            return []
        grouped: dict[tuple[str, str, str], list[tuple[Target, EndpointHealth]]] = {}
        for target, state in self.endpoints.items():
            key = (target.model, target.version, target.protocol)
            grouped.setdefault(key, []).append((target, state))
        out = []
        for model in self.config.models:
            for version in model.versions:
                entry: dict[str, Any] = {
                    "model": model.name,
                    "version": version.name,
                    "role": role(model, version.name),
                    "http": None,
                    "grpc": None,
                    "endpoints": [],
                }
                for protocol in ("http", "grpc") if model.grpc_listen else ("http",):
                    states = grouped.get((model.name, version.name, protocol), [])
                    entry[protocol] = {
                        "healthy": sum(s.healthy is True for _, s in states),
                        "unknown": sum(s.healthy is None for _, s in states),
                        "total": len(states),
                    }
                    entry["endpoints"] += [
                        {
                            "address": str(t.address),
                            "protocol": protocol,
                            "healthy": s.healthy,
                            "reason": s.reason,
                        }
                        for t, s in states
                    ]
                out.append(entry)
        return out

    async def run(self) -> None:
        """Probe every `interval` seconds until cancelled (HTTP and TCP probes by default)."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
            if self.probe is None:
                self.probe = default_probe(session, lambda: self.tls)
            while True:
                await self.check()
                await self.sleep(self.interval)


def default_probe(
    session: aiohttp.ClientSession, tls: Callable[[], ssl.SSLContext | None] = lambda: None
) -> Probe:
    """HTTP(S) readiness and TCP probes; `tls` gives the current client context (None: plain
    HTTP)."""

    async def probe(target: Target) -> str | None:
        host, port = target.address.host, target.address.port
        context = tls()
        try:
            if target.protocol == "grpc":
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1)
                writer.close()
                return None
            scheme, options = ("https", {"ssl": context}) if context else ("http", {})
            url = f"{scheme}://{target.address}/v2/health/ready"
            async with session.get(url, **options) as resp:
                return None if resp.status == 200 else f"/v2/health/ready answered {resp.status}"
        except (OSError, aiohttp.ClientError, TimeoutError) as exc:
            return describe(exc)

    return probe


def describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError) or "Connect call failed" in str(exc):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "no answer within 1 s"
    return str(exc) or type(exc).__name__
