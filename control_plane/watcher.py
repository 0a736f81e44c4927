"""Watch the routing file, and the keys and JWKS files it names, and hand every changed,
valid version of them to a callback.

The kernel tells us when a file changes (inotify, through `watchfiles`); we watch their
folders, so editors that save by writing a new file and renaming it over the old one are
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
from dataclasses import dataclass, field
from pathlib import Path

import watchfiles

from control_plane.config import ConfigError, RoutingConfig, parse
from control_plane.gc_pause import paused_gc

log = logging.getLogger("infergate.watch")


@dataclass(eq=False)
class ConfigWatcher:
    path: Path
    on_config: Callable[[RoutingConfig], None]
    on_error: Callable[[ConfigError], None]
    interval: float = 0.05
    settle: float = 0.05
    mode: str = "auto"
    using: str | None = field(default=None, init=False)  # "notify" or "poll" once running
    # the keys and JWKS files the routing file names
    extra: tuple[Path, ...] = field(default=(), init=False)
    _stat: tuple | None = field(default=None, init=False)
    _digest: str | None = field(default=None, init=False)
    _pending_error: asyncio.TimerHandle | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "notify", "poll"):
            raise ValueError(f"watch mode must be auto, notify or poll, not {self.mode!r}")

    def _stats(self) -> tuple | None:
        """(mtime, size, inode) of the routing file and of each extra file (None if missing);
        None while the routing file itself is missing."""
        stats = []
        for i, path in enumerate((self.path, *self.extra)):
            try:
                st = path.stat()
            except OSError:
                if i == 0:
                    return None  # mid-rename, or deleted: keep serving and look again
                stats.append(None)  # reported by the parse as a file it cannot read
            else:
                stats.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stats)

    def _digest_of(self, text: str) -> str:
        digest = hashlib.sha256(text.encode())
        for path in self.extra:
            try:
                digest.update(b"\0" + path.read_bytes())
            except OSError:
                digest.update(b"\1")
        return digest.hexdigest()

    def check(self, defer_error: bool = False) -> None:
        """Reload if a watched file changed since the last check."""
        key = self._stats()
        if key is None or key == self._stat:
            return
        self._stat = key
        try:
            text = self.path.read_text()
        except OSError:
            self._stat = None
            return
        digest = self._digest_of(text)
        if digest == self._digest:
            return
        self._digest = digest
        if self._pending_error:
            self._pending_error.cancel()
            self._pending_error = None
        config = error = None
        try:
            with paused_gc():
                config = parse(text, str(self.path))
        except ConfigError as exc:
            error = exc
        files = error.files if error else config.consumers.files if config.consumers else ()
        if files != self.extra:  # look again with the new files' stats and contents
            self.extra = files
            self._stat = self._digest = None
        if error is None:
            self.on_config(config)
        elif defer_error and self.settle > 0:
            loop = asyncio.get_running_loop()
            self._pending_error = loop.call_later(self.settle, self._report, error)
        else:
            self._report(error)

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

    def _targets(self) -> set[str]:
        return {str(p.resolve()) for p in (self.path, *self.extra)}

    async def _notified(self) -> None:
        self.using = "notify"
        log.info("watching %s with file notifications", self.path)
        while True:  # again whenever the set of watched files changes
            targets = self._targets()
            folders = {Path(t).parent for t in targets}
            async for _ in watchfiles.awatch(
                *(f for f in folders if f.is_dir()),
                watch_filter=lambda _, changed, targets=targets: changed in targets,
                debounce=50,
                step=1,
                recursive=False,
                force_polling=False,
                rust_timeout=1000,  # a stat check every second too, in case an event was missed
                yield_on_timeout=True,
            ):
                self.check(defer_error=True)
                if self._targets() != targets:
                    break

    async def _polled(self) -> None:
        self.using = "poll"
        log.info("watching %s by polling every %.0f ms", self.path, self.interval * 1000)
        while True:
            self.check(defer_error=True)
            await asyncio.sleep(self.interval)
