"""The `infergate` command line, including the local stack started and stopped by `run`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from gateway.processes import free_port, wait_http
from tests.stack import count_versions, get_json

ROOT = Path(__file__).resolve().parents[1]


def infergate(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_validate_reports_position_and_exit_code(tmp_path):
    good = infergate("validate", str(ROOT / "examples" / "routing.yaml"))
    assert good.returncode == 0 and "valid" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "models:\n  iris:\n    versions: {v1: {endpoints: [127.0.0.1:1]}}\n    traffic: {v2: 1}\n"
    )
    result = infergate("validate", str(bad))
    assert result.returncode == 1
    assert f"{bad}:4:15: models.iris.traffic.v2: unknown version 'v2'" in result.stderr


def test_schema_prints_json_schema():
    result = infergate("schema")
    schema = json.loads(result.stdout)
    assert result.returncode == 0 and schema["required"] == ["models"]


def test_control_plane_refuses_an_invalid_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    result = infergate(
        "control-plane",
        str(bad),
        "--xds",
        f"127.0.0.1:{free_port()}",
        "--admin",
        f"127.0.0.1:{free_port()}",
    )
    assert result.returncode == 1 and "bad.yaml:2:1: invalid YAML" in result.stderr


def test_run_serves_then_ctrl_c_leaves_no_process(tmp_path, model_repository, envoy_binary):
    listen = free_port()
    ports = [free_port() for _ in range(3)]
    config = tmp_path / "routing.yaml"
    config.write_text(
        (ROOT / "examples" / "routing.yaml")
        .read_text()
        .replace("127.0.0.1:8080", f"127.0.0.1:{listen}")
        .replace("9001", str(ports[0]))
        .replace("9002", str(ports[1]))
        .replace("9003", str(ports[2]))
    )
    admin, envoy_admin = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "run",
            str(config),
            "--repository",
            str(model_repository),
            "--workdir",
            str(tmp_path / "run"),
            "--xds",
            f"127.0.0.1:{free_port()}",
            "--admin",
            f"127.0.0.1:{admin}",
            "--envoy-admin",
            f"127.0.0.1:{envoy_admin}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120  # cold starts on a busy 2-core machine are slow
        while True:
            assert proc.poll() is None, "infergate run exited early"
            try:
                wait_http(f"http://127.0.0.1:{envoy_admin}/ready", timeout=1)
                break
            except TimeoutError:
                assert time.monotonic() < deadline, "Envoy did not become ready"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            nodes = get_json(f"http://127.0.0.1:{admin}/status")["nodes"]
            if nodes and nodes[0]["types"].get("rds", {}).get("acked_version"):
                break
            time.sleep(0.1)
        seen = count_versions(listen, 200)
        assert set(seen) == {"v1", "v2"} and seen["v1"] > seen["v2"] > 0, seen
        children = descendants(proc.pid)
        assert len(children) >= 5  # three model servers, control plane, Envoy
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        print(out)  # pytest shows it when the test fails
    assert proc.returncode == 0, out
    assert "infergate: stopped" in out
    time.sleep(0.2)
    assert [p for p in children if alive(p)] == []


def test_reference_bootstrap_matches_the_generator():
    result = infergate("bootstrap", "--node-id", "envoy-1")
    reference = json.loads((ROOT / "envoy" / "bootstrap.example.json").read_text())
    assert json.loads(result.stdout) == reference
    assert reference["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    assert reference["dynamic_resources"]["ads_config"]["api_type"] == "GRPC"


def test_serve_flags_reach_the_model_server(tmp_path, model_repository):
    port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "serve",
            "--repository",
            str(model_repository),
            "--model",
            "iris",
            "--version",
            "v2",
            "--port",
            str(port),
            "--grpc-port",
            str(grpc_port),
            "--max-batch-size",
            "8",
            "--max-batch-delay-ms",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/v2/health/ready", timeout=30)
        assert count_versions(port, 5) == {"v2": 5}
        with socket.create_connection(("127.0.0.1", grpc_port), timeout=5):
            pass  # the gRPC API listens on its own port
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert "batch" in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
