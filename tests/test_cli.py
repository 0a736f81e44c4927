"""The `infergate` command line, including the local stack started and stopped by `run`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gateway import observe
from gateway.processes import free_port, model_server_child, wait_http
from tests.stack import alive, cmdline, count_versions, descendants, infer

ROOT = Path(__file__).resolve().parents[1]


def infergate(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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


def test_run_serves_then_ctrl_c_leaves_no_process(tmp_path, sklearn_repository, envoy_binary):
    """`make run`: the example routing file and the scikit-learn models."""
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
            str(sklearn_repository),
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
        observe.wait_converged(f"http://127.0.0.1:{admin}")
        seen = count_versions(listen, 200)
        assert set(seen) == {"v1", "v2"} and seen["v1"] > seen["v2"] > 0, seen
        v2 = model_server_pid(proc.pid, "v2")
        os.kill(v2, signal.SIGKILL)  # the supervisor restarts a child that died
        deadline = time.monotonic() + 60
        while model_server_pid(proc.pid, "v2") in (None, v2):
            assert time.monotonic() < deadline, "the dead model server was not restarted"
            time.sleep(0.1)
        wait_http(f"http://127.0.0.1:{ports[1]}/v2/health/ready", timeout=60)
        assert count_versions(listen, 20, headers={"x-model-version": "v2"}) == {"v2": 20}
        children = descendants(proc.pid)
        assert len(children) >= 5  # three model servers, control plane, Envoy
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        print(out)  # pytest shows it when the test fails
    assert proc.returncode == 0, out
    assert "infergate: stopped" in out
    deadline = time.monotonic() + 10
    while [p for p in children if alive(p)]:
        assert time.monotonic() < deadline, [p for p in children if alive(p)]
        time.sleep(0.05)


def model_server_pid(supervisor: int, version: str) -> int | None:
    """The live `infergate serve` process of `version` below the supervisor, if any."""
    for pid in descendants(supervisor):
        argv = cmdline(pid).split()
        if "serve" in argv and version in argv and alive(pid):
            return pid
    return None


def test_reference_bootstrap_matches_the_generator():
    result = infergate("bootstrap", "--node-id", "envoy-1")
    reference = json.loads((ROOT / "envoy" / "bootstrap.example.json").read_text())
    assert json.loads(result.stdout) == reference
    assert reference["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    assert reference["dynamic_resources"]["ads_config"]["api_type"] == "GRPC"


def test_serve_flags_reach_the_model_server(tmp_path, model_repository):
    port, grpc_port = free_port(), free_port()
    server = model_server_child(
        str(model_repository),
        "iris",
        "v2",
        ("127.0.0.1", port),
        str(tmp_path / "serve.log"),
        grpc_port,
        extra=("--max-batch-size", "4", "--max-batch-delay-ms", "50"),
    ).start()
    try:
        wait_http(server.ready_url, timeout=30, child=server)
        with ThreadPoolExecutor(16) as pool:  # concurrent requests: the batcher merges them
            replies = list(pool.map(lambda _: infer(port), range(16)))
        assert {(r.status, r.version) for r in replies} == {(200, "v2")}
        with socket.create_connection(("127.0.0.1", grpc_port), timeout=5):
            pass  # the gRPC API listens on its own port
        metrics = observe.get_text(f"http://127.0.0.1:{port}/metrics")
        batches = observe.metric(metrics, "infergate_model_batch_requests_count")
        assert observe.metric(metrics, "infergate_model_batch_requests_sum") == 16
        assert 4 <= batches < 16  # requests were merged, at most 4 to a predict call
        at_most_4 = observe.metric(metrics, "infergate_model_batch_requests_bucket", le="4.0")
        assert at_most_4 == batches
    finally:
        assert server.stop(timeout=30) == 0
