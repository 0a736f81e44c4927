"""State that must survive a restart, behind one small interface.

A store keeps one JSON document per key with a revision number. `put` is a
compare-and-set: it succeeds only if the key is still at the revision the caller read
(0: the key must not exist yet), so two writers cannot silently overwrite each other.
`FileStateStore` keeps each key in its own file; a shared store (etcd) can replace it
by implementing the same three methods.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, unquote


class Conflict(Exception):
    """The key changed since it was read."""


@dataclass(frozen=True)
class Stored:
    value: dict[str, Any]
    revision: int


class StateStore(Protocol):
    def get(self, key: str) -> Stored | None: ...

    def keys(self, prefix: str) -> set[str]:
        """The keys that start with `prefix`."""
        ...

    def put(self, key: str, value: dict[str, Any], revision: int) -> int:
        """Write `value` if the key is at `revision` (0: absent); return the new revision."""
        ...


def write_atomically(
    path: Path, data: bytes, before_replace: Callable[[], None] | None = None
) -> None:
    """Replace `path` with `data` so that readers see the old or the new file, never a mix,
    even after a crash: temporary file in the same directory, fsync, rename, fsync dir.
    `before_replace` runs just before the rename and may raise to cancel it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class FileStateStore:
    """One `<key>.json` file per key in `directory` (made on the first write); a lock file
    serializes writers, also across processes."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def _path(self, key: str) -> Path:
        return self.directory / f"{quote(key, safe='')}.json"

    def get(self, key: str) -> Stored | None:
        try:
            doc = json.loads(self._path(key).read_bytes())
        except FileNotFoundError:
            return None
        return Stored(doc["value"], doc["revision"])

    def keys(self, prefix: str) -> set[str]:
        try:
            files = os.listdir(self.directory)
        except FileNotFoundError:
            return set()
        keys = (unquote(f.removesuffix(".json")) for f in files if f.endswith(".json"))
        return {k for k in keys if k.startswith(prefix)}

    def put(self, key: str, value: dict[str, Any], revision: int) -> int:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.get(key)
            found = current.revision if current else 0
            if found != revision:
                raise Conflict(f"{key}: expected revision {revision}, found {found}")
            doc = {"revision": revision + 1, "value": value}
            write_atomically(self._path(key), json.dumps(doc, indent=1).encode())
        return revision + 1
