"""Watch the routing file and hand every changed, valid version of it to a callback.

The kernel tells us when the file changes (inotify, through `watchfiles`); we watch its
folder, so editors that save by writing a new file and renaming it over the old one are
seen too. Where notifications are not available (some network and container file
systems) the watcher falls back to polling `stat` every `interval` seconds.

A valid file is handed on at once. An invalid one may be a save caught half-written,
so its error is reported only when no further change arrives within `settle` seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import watchfiles

from control_plane.config import ConfigError, RoutingConfig, parse
from control_plane.gc_pause import paused_gc

log = logging.getLogger("infergate.watch")


class ConfigWatcher:
    def __init__(
        self,
        path: Path,
        on_config: Callable[[RoutingConfig], None],
        on_error: Callable[[ConfigError], None],
        interval: float = 0.05,
        settle: float = 0.05,
        mode: str = "auto",
    ):
        if mode not in ("auto", "notify", "poll"):
            raise ValueError(f"watch mode must be auto, notify or poll, not {mode!r}")
        self.path = path
        self.on_config = on_config
        self.on_error = on_error
        self.interval = interval
        self.settle = settle
        self.mode = mode
        self.using: str | None = None  # "notify" or "poll" once running
        self._stat: tuple[int, int, int] | None = None
        self._digest: str | None = None
        self._pending_error: asyncio.TimerHandle | None = None

    def check(self, defer_error: bool = False) -> None:
        """Reload if the file changed since the last check."""
        try:
            st = self.path.stat()
        except OSError:
            return  # mid-rename, or deleted: keep serving and look again
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if key == self._stat:
            return
        self._stat = key
        try:
            text = self.path.read_text()
        except OSError:
            self._stat = None
            return
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest == self._digest:
            return
        self._digest = digest
        if self._pending_error:
            self._pending_error.cancel()
            self._pending_error = None
        try:
            with paused_gc():
                config = parse(text, str(self.path))
        except ConfigError as exc:
            if defer_error and self.settle > 0:
                loop = asyncio.get_running_loop()
                self._pending_error = loop.call_later(self.settle, self._report, exc)
            else:
                self._report(exc)
            return
        self.on_config(config)

    def _report(self, exc: ConfigError) -> None:
        self._pending_error = None
        log.error("invalid routing config, keeping the last good one:\n%s", exc)
        self.on_error(exc)

    async def run(self) -> None:
        if self.mode != "poll":
            try:
                await self._notified()
            except (OSError, RuntimeError) as exc:
                if self.mode == "notify":
                    raise
                log.warning(
                    "file notifications unavailable (%s); polling every %.0f ms",
                    exc,
                    self.interval * 1000,
                )
        await self._polled()

    async def _notified(self) -> None:
        folder = self.path.resolve().parent
        target = str(self.path.resolve())
        self.using = "notify"
        log.info("watching %s with file notifications", self.path)
        async for _ in watchfiles.awatch(
            folder,
            watch_filter=lambda _, changed: changed == target,
            debounce=50,
            step=1,
            recursive=False,
            force_polling=False,
            rust_timeout=1000,  # a stat check every second as well, in case an event was missed
            yield_on_timeout=True,
        ):
            self.check(defer_error=True)

    async def _polled(self) -> None:
        self.using = "poll"
        log.info("watching %s by polling every %.0f ms", self.path, self.interval * 1000)
        while True:
            self.check(defer_error=True)
            await asyncio.sleep(self.interval)
