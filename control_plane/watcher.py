"""Watch the routing file, and the keys and JWKS files it names, and hand every changed,
valid version of them to a callback.

The kernel tells us when a file changes (inotify, read on the event loop itself: no thread,
no polling, so a save is seen within a fraction of a millisecond); we watch their folders,
so editors that save by writing a new file and renaming it over the old one are seen too.
A file written in place is read once it is closed (or `settle` seconds after its last write,
for writers that keep it open). Where notifications are not available (not Linux, some
network and container file systems) the watcher falls back to polling `stat` every
`interval` seconds.

A valid file is handed on at once. An invalid one may be a save caught half-written,
so its error is reported only when no further change arrives within `settle` seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from inotify_simple import INotify, flags

from control_plane.config import ConfigError, RoutingConfig, parse
from control_plane.gc_pause import paused_gc

log = logging.getLogger("infergate.watch")

# inotify events of a watched file: read it now, or once writes stop (see `_on_events`)
NOW = flags.CLOSE_WRITE | flags.MOVED_TO | flags.MOVED_FROM | flags.DELETE | flags.ATTRIB
LATER = flags.MODIFY | flags.CREATE
SAFETY_CHECK = 1.0  # seconds between stat checks while notifications are used


@dataclass(eq=False)
class ConfigWatcher:
    path: Path
    on_config: Callable[[RoutingConfig], None]
    on_error: Callable[[ConfigError], None]
    interval: float = 0.05
    settle: float = 0.05
    mode: str = "auto"
    using: str | None = field(default=None, init=False)  # "notify" or "poll" once running
    changed_at: float | None = field(default=None, init=False)  # wall clock of the last change
    # the keys and JWKS files the routing file names
    extra: tuple[Path, ...] = field(default=(), init=False)
    _stat: tuple | None = field(default=None, init=False)
    _digest: str | None = field(default=None, init=False)
    _pending_error: asyncio.TimerHandle | None = field(default=None, init=False)
    _later: asyncio.TimerHandle | None = field(default=None, init=False)  # a write, not closed

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
        self.changed_at = time.time()
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
            except (OSError, AttributeError) as exc:  # AttributeError: a libc without inotify
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
        loop = asyncio.get_running_loop()
        while True:  # again whenever the set of watched files changes
            targets = self._targets()
            retarget = asyncio.Event()
            with INotify() as inotify:
                names: dict[int, set[str]] = {}  # watch descriptor: watched names there
                for folder in {Path(t).parent for t in targets}:
                    if folder.is_dir():
                        wd = inotify.add_watch(folder, NOW | LATER)
                        names[wd] = {Path(t).name for t in targets if Path(t).parent == folder}
                on_events = partial(self._on_events, inotify, names, targets, retarget)
                loop.add_reader(inotify.fileno(), on_events)
                try:
                    while not retarget.is_set():  # a stat check every second, in case
                        try:  # an event was missed
                            await asyncio.wait_for(retarget.wait(), SAFETY_CHECK)
                        except TimeoutError:
                            self.check(defer_error=True)
                            if self._targets() != targets:
                                break
                finally:
                    loop.remove_reader(inotify.fileno())
                    if self._later:
                        self._later.cancel()

    def _on_events(
        self,
        inotify: INotify,
        names: dict[int, set[str]],
        targets: set[str],
        retarget: asyncio.Event,
    ) -> None:
        """Read what the kernel reported: a watched file that was closed after writing,
        renamed, deleted or touched is read now; one still being written is read `settle`
        seconds after its last write unless it is closed before."""
        masks = [e.mask for e in inotify.read(timeout=0) if e.name in names.get(e.wd, ())]
        if any(mask & NOW for mask in masks):
            if self._later:
                self._later.cancel()
                self._later = None
            self.check(defer_error=True)
        elif masks:
            if self._later:
                self._later.cancel()
            self._later = asyncio.get_running_loop().call_later(self.settle, self._check_later)
        if self._targets() != targets:
            retarget.set()

    def _check_later(self) -> None:
        self._later = None
        self.check(defer_error=True)

    async def _polled(self) -> None:
        self.using = "poll"
        log.info("watching %s by polling every %.0f ms", self.path, self.interval * 1000)
        while True:
            self.check(defer_error=True)
            await asyncio.sleep(self.interval)
