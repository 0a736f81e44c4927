"""Start and stop the servers under test: infergate's and MLServer, one process each."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Running:
    """A server process and its inference URL."""

    name: str
    proc: subprocess.Popen[bytes]
    infer_url: str

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def train_iris(workdir: Path) -> Path:
    """Train the example iris models into `workdir/models`; return that repository."""
    repo = workdir / "models"
    script = ROOT / "examples" / "train_iris.py"
    subprocess.run([sys.executable, str(script), str(repo)], check=True, capture_output=True)
    return repo


def _start(name: str, argv: list[str], cwd: Path, log: Path, ready: str, infer: str) -> Running:
    """Start `argv` (output to `log`) and wait until `ready` answers 200."""
    proc = subprocess.Popen(
        argv, cwd=cwd, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
    )
    _wait_ready(ready, proc, log)
    return Running(name, proc, infer)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout}s: {log.read_text()[-2000:]}")


def start_infergate(
    repo: Path,
    port: int,
    workdir: Path,
    *,
    max_batch_size: int | None,
    processes: int = 1,
    **options: Any,
) -> Running:
    """`serve(repo, "iris", "v1", **options)` in its own process (or `processes` of them)."""
    code = (
        "from model_servers.server import serve; "
        f"serve({str(repo)!r}, 'iris', 'v1', '127.0.0.1', {port}, "
        f"max_batch_size={max_batch_size!r}, processes={processes}, **{options!r})"
    )
    return _start(
        "infergate",
        [sys.executable, "-c", code],
        ROOT,
        workdir / f"infergate-{port}.log",
        f"http://127.0.0.1:{port}/v2/health/ready",
        f"http://127.0.0.1:{port}/v2/models/iris/infer",
    )


def start_mlserver(
    mlserver: Path,
    model_file: Path,
    ports: tuple[int, int, int],
    workdir: Path,
    *,
    parallel_workers: int,
    max_batch_size: int = 0,
    max_batch_time: float = 0.0,
) -> Running:
    """`mlserver start` on a folder with the same joblib file and mlserver_sklearn."""
    http_port, grpc_port, metrics_port = ports
    folder = workdir / f"mlserver-{http_port}"
    (folder / "iris").mkdir(parents=True, exist_ok=True)
    shutil.copy(model_file, folder / "iris" / "model.joblib")
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
        "parallel_workers": parallel_workers,
    }
    model_settings: dict[str, Any] = {
        "name": "iris",
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": "v1"},
    }
    if max_batch_size:
        model_settings["max_batch_size"] = max_batch_size
        model_settings["max_batch_time"] = max_batch_time
    (folder / "settings.json").write_text(json.dumps(settings))
    (folder / "iris" / "model-settings.json").write_text(json.dumps(model_settings))
    return _start(
        "mlserver",
        [str(mlserver), "start", str(folder)],
        folder,
        workdir / f"mlserver-{http_port}.log",
        f"http://127.0.0.1:{http_port}/v2/models/iris/ready",
        f"http://127.0.0.1:{http_port}/v2/models/iris/infer",
    )
