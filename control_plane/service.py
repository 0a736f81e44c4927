"""The control plane as one service: watch the file, build snapshots, serve ADS and admin."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from control_plane.admin import make_admin_app
from control_plane.config import ConfigError, RoutingConfig, load
from control_plane.nodes import NodeRegistry
from control_plane.snapshot import SHORT_NAMES, Snapshot, SnapshotCache, build_snapshot, new_epoch
from control_plane.translate import translate
from control_plane.watcher import ConfigWatcher
from control_plane.xds_server import AdsServer

log = logging.getLogger("infergate.control_plane")

GRPC_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class ControlPlane:
    def __init__(
        self,
        config_path: Path,
        xds_address: tuple[str, int] = ("127.0.0.1", 18000),
        admin_address: tuple[str, int] = ("127.0.0.1", 18001),
    ):
        self.config_path = Path(config_path)
        self.xds_address = xds_address
        self.admin_address = admin_address
        self.epoch = new_epoch()
        self.cache = SnapshotCache()
        self.registry = NodeRegistry()
        self.last_error: dict[str, Any] | None = None
        self.applied_at: float | None = None
        self.watcher = ConfigWatcher(self.config_path, self.apply, self.reject)
        self._grpc: grpc.aio.Server | None = None
        self._admin: web.AppRunner | None = None
        self._watch_task: asyncio.Task | None = None

    def apply(self, config: RoutingConfig) -> Snapshot:
        """Translate a valid config and publish it to every stream."""
        started = time.perf_counter()
        snapshot = build_snapshot(translate(config), self.epoch)
        self.cache.set(snapshot)
        self.last_error = None
        self.applied_at = time.time()
        log.info(
            "applied config %s (%d models) in %.1f ms",
            snapshot.version,
            len(config.models),
            (time.perf_counter() - started) * 1000,
        )
        return snapshot

    def reject(self, error: ConfigError) -> None:
        self.last_error = {
            "at": time.time(),
            "message": str(error),
            "problems": [p.__dict__ for p in error.problems],
        }

    def status(self) -> dict[str, Any]:
        snap = self.cache.snapshot
        return {
            "config": {
                "path": str(self.config_path),
                "applied_at": self.applied_at,
                "error": self.last_error,
            },
            "snapshot": snap
            and {
                "version": snap.version,
                "types": {SHORT_NAMES[t]: ts.version for t, ts in snap.types.items()},
            },
            "nodes": self.registry.as_list(),
        }

    async def start(self) -> None:
        """Load the file (raising ConfigError if invalid), then serve."""
        self.watcher.check()
        if self.cache.snapshot is None:
            load(self.config_path)  # raises the ConfigError that names the problem
        self._grpc = grpc.aio.server(options=GRPC_OPTIONS)
        self._grpc.add_generic_rpc_handlers([AdsServer(self.cache, self.registry).handler()])
        host, port = self.xds_address
        self._grpc.add_insecure_port(f"{host}:{port}")
        await self._grpc.start()
        self._admin = web.AppRunner(make_admin_app(self.status), access_log=None)
        await self._admin.setup()
        await web.TCPSite(self._admin, *self.admin_address).start()
        self._watch_task = asyncio.create_task(self.watcher.run())
        log.info("xDS on %s:%d, admin on http://%s:%d", host, port, *self.admin_address)

    async def stop(self) -> None:
        if self._watch_task:
            self._watch_task.cancel()
        if self._grpc:
            await self._grpc.stop(grace=0.5)
        if self._admin:
            await self._admin.cleanup()

    async def run_forever(self) -> None:
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()
