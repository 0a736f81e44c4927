"""The control plane as one service: watch the file, merge registered endpoints, build
snapshots (coalescing changes that arrive during a build), serve ADS and the admin API."""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import grpc
from aiohttp import web
from envoy.service.runtime.v3.rtds_pb2 import Runtime

from control_plane.access_log import (
    RUNTIME_LAYER,
    AccessLogServer,
    sample_runtime,
    with_access_log,
)
from control_plane.admin import make_admin_app
from control_plane.analysis import stats_importing
from control_plane.callbacks import Fanout, LogCallbacks
from control_plane.config import ConfigError, Endpoint, RoutingConfig, load
from control_plane.endpoints import EndpointRegistry
from control_plane.gc_pause import freeze_survivors, paused_gc, release_freed_memory
from control_plane.health import HealthMonitor
from control_plane.metrics import XdsMetrics, make_registry
from control_plane.nodes import NodeRegistry
from control_plane.ports import AddressInUse, ensure_free
from control_plane.quota import QuotaCounter, QuotaServer
from control_plane.rollout import RolloutController
from control_plane.sampling import SamplingController
from control_plane.shadow_pairs import ShadowPairs
from control_plane.snapshot import (
    SHORT_NAMES,
    Snapshot,
    SnapshotCache,
    build_snapshot,
    new_epoch,
    with_runtime,
)
from control_plane.state_store import FileStateStore
from control_plane.telemetry import TelemetryStore, traffic_report
from control_plane.translate import translate
from control_plane.upstream_tls import Material, TlsFileError, UpstreamTls, read, secrets, stat_key
from control_plane.watcher import ConfigWatcher
from control_plane.xds_server import AdsServer
from control_plane.yaml_edit import write_traffic

log = logging.getLogger("infergate.control_plane")

INLINE_BUILD_MODELS = 10  # configs up to this many models are built on the event loop
PUSH_QUIET = 0.25  # seconds after a publish without endpoint probes (the streams push)

GRPC_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # grpcio shares ports (SO_REUSEPORT) by default: a second control plane on the same
    # address would silently take half of the Envoys. Fail to start instead.
    ("grpc.so_reuseport", 0),
    # gRPC cancels new streams once over 1,000 wait for the server to accept them: Envoys
    # reconnecting at once (a restart) would be turned away and retry with backoff.
    ("grpc.server.max_pending_requests", 20_000),
    ("grpc.server.max_pending_requests_hard_limit", 20_000),
]


@dataclass(frozen=True)
class TlsFiles:
    """Server certificate and key; with `client_ca`, clients must present a certificate
    signed by it (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        ca = self.client_ca.read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )


class ControlPlane:
    def __init__(
        self,
        config_path: Path,
        xds_address: tuple[str, int] = ("127.0.0.1", 18000),
        admin_address: tuple[str, int] = ("127.0.0.1", 18001),
        admin_token: str | None = None,
        tls: TlsFiles | None = None,
        watch_mode: str = "auto",
        health_interval: float = 1.0,
        telemetry_sample: float | Literal["auto"] | None = "auto",
        telemetry_max_rate: float = 4000.0,
        state_dir: Path | None = None,
    ):
        self.config_path = Path(config_path)
        self.xds_address = xds_address
        self.admin_address = admin_address
        self.admin_token = admin_token
        self.tls = tls
        self.health = (
            HealthMonitor(interval=health_interval, hold=self._probes_wait)
            if health_interval > 0
            else None
        )
        self._quiet_at = 0.0  # monotonic time from which probes may run (see publish)
        self.epoch = new_epoch()
        self.cache = SnapshotCache()
        self.registry = NodeRegistry()
        self.endpoints = EndpointRegistry()
        self.file_config: RoutingConfig | None = None
        self.last_error: dict[str, Any] | None = None
        self.applied_at: float | None = None
        # wall-clock times of the last build's steps, for `/status` (see docs/xds-scale.md)
        self.timings: dict[str, float] = {}
        self.builds = 0
        self.reloads: Counter[str] = Counter()
        self.last_reload_ok: float | None = None
        self.store = TelemetryStore()
        # The fraction of requests Envoy logs: "auto" follows the measured rate (keeping
        # the logged rate under `telemetry_max_rate`), a number is fixed, None logs nothing.
        # Over `telemetry_max_rate` logged requests/s the control plane warns.
        self.telemetry_sample = telemetry_sample
        self.telemetry_max_rate = telemetry_max_rate
        self.sampling = (
            SamplingController(telemetry_max_rate) if telemetry_sample == "auto" else None
        )
        self.sample_fractions: tuple[float, ...] = (
            self.sampling.ladder if self.sampling else (telemetry_sample or 0.0,)
        )
        self.access_logs = AccessLogServer(self.store)
        self.quotas = QuotaServer(QuotaCounter())  # Envoy's rate limit service: global quotas
        # Rollout progress survives restarts in `state_dir` (default: `.infergate-state`
        # beside the routing file); times are the telemetry store's clock.
        state = FileStateStore(state_dir or self.config_path.with_name(".infergate-state"))
        # A shadow phase pairs the answers the model servers record (`/v2/answers`).
        self.shadow_pairs = ShadowPairs(self.store.clock, admin_token)
        self.rollouts = RolloutController(
            self.store,
            state,
            shadows=self.shadow_pairs,
            write_traffic=partial(write_traffic, self.config_path),
        )
        self.xds_metrics = XdsMetrics()
        # The autoscaler's last decision per "model/version", as its supervisor reports it.
        self.autoscaling: dict[str, dict[str, Any]] = {}
        # upstream_tls: the files' last good contents, and what they were read from
        self._tls: tuple[Material, ssl.SSLContext] | None = None
        self._tls_read: tuple[UpstreamTls, tuple] | None = None
        self.watcher = ConfigWatcher(
            self.config_path, self.set_file_config, self.reject, mode=watch_mode
        )
        self._dirty = asyncio.Event()
        self._grpc: grpc.aio.Server | None = None
        self._admin: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []

    # --- inputs ----------------------------------------------------------------------
    def set_file_config(self, config: RoutingConfig) -> None:
        self.timings = {"changed_at": self.watcher.changed_at, "parsed_at": time.time()}
        self.file_config = config
        self.rollouts.observe_config(config, self.store.clock())
        self.last_error = None
        self.reloads["ok"] += 1
        self.last_reload_ok = time.monotonic()
        self._dirty.set()

    def reject(self, error: ConfigError) -> None:
        self.reloads["error"] += 1
        self.last_error = {
            "at": time.time(),
            "message": str(error),
            "problems": [p.__dict__ for p in error.problems],
        }

    def register(self, model: str, version: str, ep: Endpoint) -> bool:
        assert self.file_config is not None
        changed = self.endpoints.register(self.file_config, model, version, ep)
        self._dirty.set()
        return changed

    def deregister(self, model: str, version: str, ep: Endpoint) -> bool:
        changed = self.endpoints.deregister(model, version, ep)
        self._dirty.set()
        return changed

    def registered(self) -> list[dict[str, str]]:
        return self.endpoints.as_list()

    # --- output ----------------------------------------------------------------------
    async def publish(self) -> Snapshot:
        """Build and hand out a snapshot; endpoint probes wait meanwhile, and while streams
        push it (`PUSH_QUIET`)."""
        self._quiet_at = float("inf")
        try:
            return await self._publish()
        finally:
            self._quiet_at = time.monotonic() + PUSH_QUIET

    async def _publish(self) -> Snapshot:
        """Translate the current inputs and hand the snapshot to every stream. A large config
        is built in a thread, so that streams keep being served meanwhile; a small one on
        the event loop (about 0.1 ms per model), which saves the thread hand-offs."""
        assert self.file_config is not None
        started = time.perf_counter()
        config = self.rollouts.apply(self.endpoints.merge(self.file_config))
        material, client = self._upstream_tls(config.upstream_tls) or (None, None)
        self.timings["build_started_at"] = time.time()
        small = len(config.models) <= INLINE_BUILD_MODELS
        if small:
            snapshot = self._build(config, material)
        else:
            snapshot = await asyncio.to_thread(self._build, config, material)
        self.timings["built_at"] = time.time()
        self.cache.set(with_runtime(snapshot, self._runtime()))
        if not small:  # the previous snapshot is gone now, unless a stream still sends it
            release_freed_memory()
        # No full collection during the fan-out: at 1,000 models, or 2,000 streams, one
        # takes 65-170 ms on the event loop.
        freeze_survivors()
        self.shadow_pairs.tls = client
        if self.health:
            self.health.set_config(config, client)
        self.builds += 1
        self.applied_at = time.time()
        log.info(
            "applied config %s (%d models) in %.1f ms",
            snapshot.version,
            len(config.models),
            (time.perf_counter() - started) * 1000,
        )
        return snapshot

    def _probes_wait(self) -> float:
        return self._quiet_at - time.monotonic()

    def _build(self, config: RoutingConfig, tls: Material | None) -> Snapshot:
        with paused_gc():
            resources = translate(config)
            if self.telemetry_sample is not None:
                resources = with_access_log(resources, self.sample_fractions)
            return build_snapshot(resources, self.epoch, secrets=tls and secrets(tls))

    def _upstream_tls(self, files: UpstreamTls | None) -> tuple[Material, ssl.SSLContext] | None:
        """The certificate, key and CA of `upstream_tls` (and a client context of them for the
        health probes), read again when the files changed; unusable files (e.g. a rotation
        caught between writing the certificate and the key) keep the last good ones."""
        if files is None:
            self._tls = self._tls_read = None
            return None
        seen = (files, stat_key(files))
        if seen != self._tls_read:
            self._tls_read = seen
            try:
                material = read(files)
                self._tls = material, material.client_context()
            except TlsFileError as exc:
                log.warning("upstream_tls.%s %s; keeping the last good certificate", exc.field, exc)
            else:
                log.info("upstream TLS certificate loaded from %s", files.cert)
        return self._tls

    async def _watch_upstream_tls(self, period: float = 0.2) -> None:
        """Rebuild when a file of `upstream_tls` changes on disk (a rotated certificate)."""
        while True:
            await asyncio.sleep(period)
            files = self.file_config and self.file_config.upstream_tls
            if files and (files, stat_key(files)) != self._tls_read:
                self._dirty.set()

    async def _publisher(self) -> None:
        """Build from the newest inputs as soon as they change. Changes that arrive while a
        build is in flight are coalesced into the next build, so a burst of saves becomes
        few builds and the last one always wins. A build that fails (a bug: the config was
        valid) is logged and shown in `/status`; the last snapshot keeps serving and the next
        change builds again."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self.publish()
            except Exception as exc:
                log.exception("building the snapshot failed; the last one keeps serving")
                self.reloads["error"] += 1
                self.last_error = {
                    "at": time.time(),
                    "message": f"building the snapshot failed ({exc!r}); the last one "
                    "keeps serving",
                    "problems": [],
                }

    async def _drive_rollouts(self, period: float = 1.0) -> None:
        """Let the rollout controller decide, and rebuild when the weights it wants change."""
        while True:
            await asyncio.sleep(period)
            if stats_importing():
                continue
            before = self.rollouts.overrides()
            try:
                self.rollouts.tick(self.store.clock())
            except Exception:  # e.g. the state directory is not writable: keep deciding
                log.exception("rollout controller")
            if self.rollouts.overrides() != before:
                self._dirty.set()

    async def _poll_answers(self, period: float = 0.5) -> None:
        """Read the answers of both versions of each shadowing rollout for pairing."""
        while True:
            await asyncio.sleep(period)
            if self.file_config is None:
                continue
            models = {m.name: m for m in self.endpoints.merge(self.file_config).models}
            for name, spec in self.rollouts.shadowing():
                model = models.get(name)
                if model is None or spec.shadow is None:
                    continue
                endpoints = {v.name: v.endpoints for v in model.versions}
                try:
                    await self.shadow_pairs.poll(
                        name,
                        (spec.baseline, endpoints.get(spec.baseline, ())),
                        (spec.canary, endpoints.get(spec.canary, ())),
                        spec.shadow,
                    )
                except Exception:  # e.g. a malformed answer: keep polling
                    log.exception("shadow pairs of %s", name)

    def rollout_status(self) -> dict[str, Any]:
        return self.rollouts.status()

    def rollout_action(self, model: str, action: str) -> dict[str, Any]:
        """An operator's action; new weights (an abort's baseline at 100) publish at once."""
        before = self.rollouts.overrides()
        status = self.rollouts.act(model, action, self.store.clock())
        if self.rollouts.overrides() != before:
            self._dirty.set()
        return status

    def _runtime(self) -> dict[str, Runtime]:
        """The RTDS layer every Envoy's bootstrap asks for (empty without telemetry)."""
        if self.telemetry_sample is None:
            return {RUNTIME_LAYER: Runtime(name=RUNTIME_LAYER)}
        return {RUNTIME_LAYER: sample_runtime(self.sampler_fraction, self.sample_fractions)}

    async def _control_sampling(self, period: float = 1.0) -> None:
        """Follow the measured rate with the sampling fraction (a runtime update only)."""
        assert self.sampling is not None
        while True:
            await asyncio.sleep(period)
            before = self.sampling.fraction
            rate = self.store.total_rate(self.sampling.hold)
            if self.sampling.update(rate, time.monotonic()) != before and self.cache.snapshot:
                log.info(
                    "telemetry: %.0f requests/s, Envoys now log a fraction %g (was %g)",
                    rate,
                    self.sampling.fraction,
                    before,
                )
                self.cache.set(with_runtime(self.cache.snapshot, self._runtime()))

    async def _watch_log_rate(self, period: float = 10.0) -> None:
        """Warn while Envoys log more requests/s than `telemetry_max_rate`."""
        while True:
            await asyncio.sleep(period)
            logged = self.store.total_rate(period) * self.sampler_fraction
            if logged > self.telemetry_max_rate:
                log.warning(
                    "telemetry: Envoys log %.0f requests/s, over --telemetry-max-rate %.0f "
                    "at the lowest sampling fraction %g (see docs/telemetry.md)",
                    logged,
                    self.telemetry_max_rate,
                    self.sampler_fraction,
                )

    @property
    def sampler_fraction(self) -> float:
        if self.sampling:
            return self.sampling.fraction
        return self.sample_fractions[0] if self.telemetry_sample is not None else 0.0

    def traffic(self, history: bool = False) -> dict[str, Any]:
        return traffic_report(self.store, self.file_config, self.sampler_fraction, history)

    def report_autoscaling(self, decisions: dict[str, dict[str, Any]]) -> None:
        self.autoscaling = decisions

    def status(self) -> dict[str, Any]:
        snap = self.cache.snapshot
        return {
            "config": {
                "path": str(self.config_path),
                "watch": self.watcher.using,
                "applied_at": self.applied_at,
                "timings": self.timings,
                "snapshots_built": self.builds,
                "error": self.last_error,
            },
            "snapshot": snap
            and {
                "version": snap.version,
                "types": {SHORT_NAMES[t]: ts.version for t, ts in snap.types.items()},
            },
            "registered_endpoints": self.endpoints.as_list(),
            "versions": self.health.versions() if self.health else None,
            "nodes": self.registry.as_list(),
            "autoscale": self.autoscaling,
        }

    # --- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Load the file (raising ConfigError if invalid), then serve; AddressInUse if the
        xDS or admin address is taken."""
        ensure_free(self.xds_address, "xDS")
        ensure_free(self.admin_address, "admin")
        self.watcher.check()
        if self.file_config is None:
            load(self.config_path)  # raises the ConfigError that names the problem
        await self.publish()
        self._dirty.clear()
        self._grpc = grpc.aio.server(options=GRPC_OPTIONS)
        ads = AdsServer(self.cache, Fanout(LogCallbacks(), self.registry, self.xds_metrics))
        self._grpc.add_generic_rpc_handlers(
            [ads.handler(), self.access_logs.handler(), self.quotas.handler()]
        )
        address = f"{self.xds_address[0]}:{self.xds_address[1]}"
        try:
            if self.tls:
                self._grpc.add_secure_port(address, self.tls.credentials())
            else:
                self._grpc.add_insecure_port(address)
        except RuntimeError:  # taken since ensure_free looked
            raise AddressInUse(self.xds_address, "xDS") from None
        await self._grpc.start()
        self._admin = web.AppRunner(
            make_admin_app(self, self.admin_token, make_registry(self)), access_log=None
        )
        await self._admin.setup()
        try:
            await web.TCPSite(self._admin, *self.admin_address, reuse_port=False).start()
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise AddressInUse(self.admin_address, "admin") from None
        self._tasks = [
            asyncio.create_task(self.watcher.run()),
            asyncio.create_task(self._publisher()),
            asyncio.create_task(self._drive_rollouts()),
            asyncio.create_task(self._poll_answers()),
            asyncio.create_task(self._watch_upstream_tls()),
        ]
        if self.health:
            self._tasks.append(asyncio.create_task(self.health.run()))
        if self.telemetry_sample is not None:
            self._tasks.append(asyncio.create_task(self._watch_log_rate()))
        if self.sampling:
            self._tasks.append(asyncio.create_task(self._control_sampling()))
        log.info(
            "xDS on %s (%s), admin on http://%s:%d",
            address,
            "mTLS" if self.tls and self.tls.client_ca else "TLS" if self.tls else "plaintext",
            *self.admin_address,
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.shadow_pairs.close()
        if self._grpc:
            await self._grpc.stop(grace=0.5)
        if self._admin:
            await self._admin.cleanup()

    async def run_forever(self) -> None:
        try:
            await self.start()
            await asyncio.Event().wait()
        finally:
            await self.stop()
