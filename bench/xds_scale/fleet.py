"""Worker processes of simulated Envoys, and the route ACK events they report."""

from __future__ import annotations

import json
import math
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.xds_scale.plane import cpu_seconds, memory_mb

CLIENTS_PER_CHANNEL = 25
CLIENTS_PER_WORKER = 500


def workers_for(clients: int) -> int:
    """Worker processes for `clients`: enough that the clients are not the bottleneck."""
    return max(1, -(-clients // CLIENTS_PER_WORKER))


def scenario(name: str, delta: bool, clients: int, models: int) -> dict[str, Any]:
    """The fields that name a scenario in the report."""
    return {
        "scenario": name,
        "mode": "delta" if delta else "sotw",
        "clients": clients,
        "models": models,
    }


def stop_processes(procs: list[subprocess.Popen]) -> None:
    """Close each one's stdin (it exits), then kill those still running, by pid."""
    for proc in procs:
        if proc.stdin and not proc.stdin.closed:
            try:
                proc.stdin.close()
            except OSError:
                pass
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Fleet:
    """`clients` simulated Envoys spread over `workers` processes."""

    def __init__(
        self,
        address: str,
        clients: int,
        workers: int,
        delta: bool,
        log: Path,
        reconnect: bool = False,
    ):
        self.events: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
        self.procs: list[subprocess.Popen] = []
        self.sizes = [clients // workers + (i < clients % workers) for i in range(workers)]
        self.sizes = [n for n in self.sizes if n]
        self.argv = [
            [
                sys.executable,
                "-m",
                "bench.xds_scale.worker",
                address,
                "--clients",
                str(n),
                "--channels",
                str(math.ceil(n / CLIENTS_PER_CHANNEL)),
                "--prefix",
                f"w{i}",
                *(["--delta"] if delta else []),
                *(["--reconnect"] if reconnect else []),
            ]
            for i, n in enumerate(self.sizes)
        ]
        self.log = log
        self.reconnects = 0  # streams that ended and were opened again (with `reconnect`)
        self.last_reconnect_error = ""

    def __enter__(self) -> Fleet:
        try:
            with open(self.log, "ab") as err:
                for i, argv in enumerate(self.argv):
                    proc = subprocess.Popen(
                        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err
                    )
                    self.procs.append(proc)
                    threading.Thread(target=self._read, args=(i, proc), daemon=True).start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _read(self, index: int, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.events.put((index, json.loads(line)))
        self.events.put((index, {"event": "exit", "code": proc.wait()}))

    def stop(self) -> None:
        stop_processes(self.procs)

    def wait_routes(self, known: set[str], timeout: float) -> tuple[str, list[float]]:
        """Wait until every worker reports all its clients on one route version not in
        `known`; return it and every client's ACK time (time.monotonic())."""
        deadline = time.monotonic() + timeout
        got: dict[int, tuple[str, list[float]]] = {}
        while len(got) < len(self.procs):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(got)}/{len(self.procs)} workers converged in {timeout}s")
            try:
                index, event = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if event["event"] == "reconnect":
                self.reconnects += 1
                self.last_reconnect_error = event["error"]
            elif event["event"] == "routes" and event["version"] not in known:
                got[index] = (event["version"], event["times"])
            elif event["event"] in ("error", "exit"):
                raise RuntimeError(f"worker {index}: {event}")
        versions = {v for v, _ in got.values()}
        if len(versions) != 1:
            raise RuntimeError(f"workers converged on different route versions: {versions}")
        return versions.pop(), [t for _, times in got.values() for t in times]

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs)

    def memory(self) -> float:
        return sum(memory_mb(p.pid)["rss_mb"] for p in self.procs)
