"""Several server processes on one port (SO_REUSEPORT): the kernel spreads connections."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def run_processes(count: int, target: Callable[..., None], *args: Any, **kwargs: Any) -> int:
    """Run `target(*args, **kwargs)` in `count` spawned processes until SIGTERM/SIGINT.

    Signals are forwarded to every child (each drains on its own). If one child dies, the
    others are stopped. Returns the first non-zero exit code, else 0.
    """
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(target=target, args=args, kwargs=kwargs, name=f"worker-{i}")
        for i in range(count)
    ]
    stopping = False

    def forward(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.is_alive() and child.pid is not None:
                os.kill(child.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for child in children:
            child.start()
        while any(c.is_alive() for c in children):
            if not stopping and any(c.exitcode is not None for c in children):
                log.error("a worker process exited: stopping the others")
                forward(signal.SIGTERM, None)
            time.sleep(0.1)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    # a worker still starting up when the signal came dies of it: that is a clean stop too
    stopped_by = {-signal.SIGTERM, -signal.SIGINT} if stopping else set()
    codes = [c.exitcode or 0 for c in children if c.exitcode not in stopped_by]
    return next((code for code in codes if code), 0)
