"""`infergate run` keeps each version's replicas as the file says (real processes, real Envoy).

One run for the module, the tests in order: replicas come up and take traffic; a SIGKILLed
replica under load fails no request and is replaced; a version added to the file is started
and routed to, and removing it drains and stops it with no failed request; `infergate status`
shows the replicas; SIGKILL of the supervisor leaves no child process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.processes import free_port, wait_http
from tests.stack import LoadLoop, count_versions
from tests.test_cli import alive, descendants

ONE = """\
listen: 127.0.0.1:{listen}
models:
  iris:
    versions:
      v1: {{replicas: 2}}  # kept by infergate run
"""
TWO = ONE + "      v2: {{replicas: 1}}\n    traffic: {{v1: 50, v2: 50}}\n"


class Run:
    def __init__(self, tmp: Path, repository: Path, template: str = ONE, *options: str):
        self.listen, self.admin, self.envoy_admin = free_port(), free_port(), free_port()
        self.file = tmp / "routing.yaml"
        self.workdir = tmp / "run"
        self.write(template)
        argv = [
            *(sys.executable, "-m", "gateway.cli", "run", str(self.file)),
            *("--repository", str(repository), "--workdir", str(self.workdir)),
            *("--xds", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{self.admin}"),
            *("--envoy-admin", f"127.0.0.1:{self.envoy_admin}"),
            *options,
        ]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(f"http://127.0.0.1:{self.envoy_admin}/ready", timeout=120)

    def write(self, template: str) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(template.format(listen=self.listen))
        os.replace(tmp, self.file)

    def replicas(self, version: str) -> list[dict]:
        try:
            status = json.loads((self.workdir / "replicas.json").read_text())
        except (OSError, ValueError):
            return []
        rows = [v for v in status["versions"] if v["version"] == version]
        return rows[0]["replicas"] if rows else []

    def healthy_hosts(self, version: str) -> set[str]:
        with __import__("urllib.request").request.urlopen(
            f"http://127.0.0.1:{self.envoy_admin}/clusters", timeout=5
        ) as resp:
            lines = resp.read().decode().splitlines()
        return {
            line.split("::")[1]
            for line in lines
            if line.startswith(f"iris/{version}::") and line.endswith("::health_flags::healthy")
        }

    def wait(self, what: str, condition, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, "infergate run exited"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(60)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def ready_addresses(self, version: str) -> set[str]:
        return {r["address"] for r in self.replicas(version) if r["state"] == "ready"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, model_repository, envoy_binary):
    with Run(tmp_path_factory.mktemp("replicas"), model_repository) as r:
        yield r


def test_replicas_start_register_and_serve(run):
    run.wait("2 ready replicas of v1", lambda: len(run.ready_addresses("v1")) == 2)
    run.wait("Envoy routes to both", lambda: run.healthy_hosts("v1") == run.ready_addresses("v1"))
    assert count_versions(run.listen, 20) == {"v1": 20}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "status",
            "--admin-url",
            f"http://127.0.0.1:{run.admin}",
            "--workdir",
            str(run.workdir),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.count("iris/v1") >= 2 and "ready" in out, out


def test_killed_replica_fails_no_request_and_is_replaced(run):
    run.wait("2 ready replicas of v1", lambda: len(run.ready_addresses("v1")) == 2)
    run.wait("Envoy routes to both", lambda: run.healthy_hosts("v1") == run.ready_addresses("v1"))
    before = run.ready_addresses("v1")
    victim = next(r for r in run.replicas("v1") if r["state"] == "ready")
    port = int(victim["address"].rsplit(":", 1)[1])
    pid = next(
        p
        for p in descendants(run.proc.pid)
        if f"--port\0{port}\0".encode() in Path(f"/proc/{p}/cmdline").read_bytes()
    )
    with LoadLoop(run.listen, threads=4) as load:
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        run.wait("a replacement", lambda: len(run.ready_addresses("v1") - before) == 1)
        run.wait("Envoy routes to it", lambda: run.healthy_hosts("v1") == run.ready_addresses("v1"))
    assert load.results and load.failures() == [], load.failures()[:5]
    assert sum(r["restarts"] for r in run.replicas("v1")) == 1
    assert "code -9" in next(r["last_exit"] for r in run.replicas("v1") if r["restarts"])


def test_added_version_is_started_and_routed_then_drained_when_removed(run):
    run.wait("2 ready replicas of v1", lambda: len(run.ready_addresses("v1")) == 2)
    run.wait("Envoy routes to both", lambda: run.healthy_hosts("v1") == run.ready_addresses("v1"))
    run.write(TWO)
    run.wait("v2 ready", lambda: len(run.ready_addresses("v2")) == 1)
    run.wait("v2 takes traffic", lambda: count_versions(run.listen, 20).get("v2", 0) > 0)
    (address,) = run.ready_addresses("v2")
    with LoadLoop(run.listen, threads=4) as load:
        time.sleep(0.5)
        run.write(ONE)
        run.wait("v2 stopped", lambda: run.replicas("v2") == [])
        time.sleep(0.5)
    assert load.versions_since(0)["v2"] > 0
    assert load.failures() == [], load.failures()[:5]
    port = int(address.rsplit(":", 1)[1])
    assert not any(
        f"--port\0{port}\0".encode() in Path(f"/proc/{p}/cmdline").read_bytes()
        for p in descendants(run.proc.pid)
        if alive(p)
    )


def test_killed_supervisor_leaves_no_child(run):
    children = descendants(run.proc.pid)
    assert len(children) >= 4  # two replicas, control plane, Envoy
    run.proc.kill()
    run.proc.wait()
    deadline = time.monotonic() + 30
    while [p for p in children if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p for p in children if alive(p)] == []
