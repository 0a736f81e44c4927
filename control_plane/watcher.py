"""Watch the routing file and hand every changed, valid version of it to a callback.

Polling `stat` is enough for one file, survives editors that replace the file by
rename, and coalesces a burst of writes into one reload per poll interval.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

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
    ):
        self.path = path
        self.on_config = on_config
        self.on_error = on_error
        self.interval = interval
        self._stat: tuple[int, int, int] | None = None
        self._digest: str | None = None

    def check(self) -> None:
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
        try:
            with paused_gc():
                config = parse(text, str(self.path))
        except ConfigError as exc:
            log.error("invalid routing config, keeping the last good one:\n%s", exc)
            self.on_error(exc)
            return
        self.on_config(config)

    async def run(self) -> None:
        while True:
            self.check()
            await asyncio.sleep(self.interval)
