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

BODY = json.dumps(
    {"inputs": [{"name": "x", "datatype": "FP64", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]}
).encode()


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


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
        while not (_ready(base) and len(_children(child.proc.pid)) >= 2):
            assert child.running, Path(log).read_text()
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.2)
        workers = [p for p in _children(child.proc.pid) if "spawn_main" in _cmdline(p)]
        assert len(workers) == 2
        for _ in range(60):  # a new connection each time: the kernel picks a process
            request = urllib.request.Request(f"{base}/v2/models/iris/infer", data=BODY)
            with urllib.request.urlopen(request, timeout=10) as resp:
                assert json.loads(resp.read())["outputs"][0]["data"] == [0]
        assert child.stop(timeout=20) == 0
        assert not any(Path(f"/proc/{p}").exists() and _alive(p) for p in workers)
    finally:
        child.stop(timeout=5, sig=signal.SIGKILL)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


if sys.platform != "linux":  # /proc and SO_REUSEPORT balancing
    pytestmark = pytest.mark.skip("Linux only")
