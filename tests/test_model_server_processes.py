"""serve(processes=N): several server processes behind one port through SO_REUSEPORT."""

from __future__ import annotations

import json
import signal
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from gateway.processes import free_port, model_server_child
from tests.stack import alive, cmdline, descendants

BODY = json.dumps(
    {"inputs": [{"name": "x", "datatype": "FP64", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]}
).encode()


def workers_of(pid: int) -> list[int]:
    return [p for p in descendants(pid) if "spawn_main" in cmdline(p)]


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_two_processes_share_the_port(tmp_path: Path, model_repository: Path) -> None:
    port = free_port()
    log = str(tmp_path / "server.log")
    child = model_server_child(
        str(model_repository), "iris", "v1", ("127.0.0.1", port), log, extra=("--processes", "2")
    ).start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not (_ready(base) and len(workers_of(child.proc.pid)) >= 2):
            assert child.running, Path(log).read_text()
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.2)
        workers = workers_of(child.proc.pid)
        assert len(workers) == 2
        for _ in range(60):  # a new connection each time: the kernel picks a process
            request = urllib.request.Request(f"{base}/v2/models/iris/infer", data=BODY)
            with urllib.request.urlopen(request, timeout=10) as resp:
                assert json.loads(resp.read())["outputs"][0]["data"] == [0]
        assert child.stop(timeout=20) == 0
        assert not any(Path(f"/proc/{p}").exists() and alive(p) for p in workers)
    finally:
        child.stop(timeout=5, sig=signal.SIGKILL)


if sys.platform != "linux":  # /proc and SO_REUSEPORT balancing
    pytestmark = pytest.mark.skip("Linux only")
