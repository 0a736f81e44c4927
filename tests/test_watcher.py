"""The routing-file watcher: kernel notifications and polling both see every save, a save
caught half-written is not reported as an error, and a lasting error is."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from control_plane.config import ConfigError, RoutingConfig
from control_plane.watcher import ConfigWatcher

GOOD = "models:\n  iris:\n    versions:\n      v1: {endpoints: [127.0.0.1:%d]}\n"
BAD = "models:\n  iris:\n    versions:\n      v1: {endpoints: [nowhere]}\n"


class Seen:
    def __init__(self) -> None:
        self.configs: list[RoutingConfig] = []
        self.errors: list[ConfigError] = []

    def port(self) -> int | None:
        return self.configs[-1].models[0].versions[0].endpoints[0].port if self.configs else None


def save(path: Path, text: str) -> None:
    """Save as editors do: write a new file, then rename it over the old one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


@pytest.fixture(params=["notify", "poll"])
async def watched(request, tmp_path):
    path = tmp_path / "routing.yaml"
    path.write_text(GOOD % 9001)
    seen = Seen()
    watcher = ConfigWatcher(path, seen.configs.append, seen.errors.append, mode=request.param)
    watcher.check()
    task = asyncio.create_task(watcher.run())
    await wait_for(lambda: watcher.using is not None)
    yield path, seen, watcher
    task.cancel()


async def test_every_save_is_seen_in_either_mode(watched):
    path, seen, watcher = watched
    assert watcher.using == watcher.mode
    for port in (9002, 9003):
        save(path, GOOD % port)
        await wait_for(lambda port=port: seen.port() == port)
    path.write_text(GOOD % 9004)  # an in-place write, not a rename
    await wait_for(lambda: seen.port() == 9004)
    assert seen.errors == []


async def test_a_half_written_save_is_not_an_error_but_a_lasting_one_is(watched):
    path, seen, watcher = watched
    watcher.settle = 0.5
    save(path, BAD)
    await asyncio.sleep(0.1)  # within `settle`: the writer is still saving
    save(path, GOOD % 9005)
    await wait_for(lambda: seen.port() == 9005)
    await asyncio.sleep(0.6)
    assert seen.errors == []
    save(path, BAD)
    await wait_for(lambda: seen.errors != [])
    assert "nowhere" in str(seen.errors[-1]) and seen.port() == 9005


@pytest.mark.parametrize("watched", ["notify"], indirect=True)
async def test_a_file_written_in_place_is_read_once_closed(watched):
    """With notifications, a file still open for writing is not read: a valid first part of
    it (one model of two) never becomes a config."""
    path, seen, watcher = watched
    watcher.settle = 0.5
    with path.open("w") as f:
        f.write(GOOD % 9006)
        f.flush()
        await asyncio.sleep(0.2)  # the first part is on disk, the writer is not done
        assert seen.port() == 9001
        f.write("  other:\n    versions:\n      v1: {endpoints: [127.0.0.1:9007]}\n")
    await wait_for(lambda: seen.port() == 9006)
    assert [len(c.models) for c in seen.configs] == [1, 2] and seen.errors == []
