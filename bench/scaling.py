"""`python -m bench.scaling`: scale from zero, and the activator's hold path.

One run, one JSON document on stdout:
- cold start: `infergate run` with a version at `min: 0`; per round, one request is sent
  while the version has no replica, and the time until its answer is recorded; then the
  version is left idle until it is back at zero (ROUNDS rounds, median and max);
- hold path: sequential requests straight to a ready model server, and the same through an
  activator gate that forwards to it (what a request pays while the gate is in the path).
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.__main__ import machine
from bench.stats import median
from gateway.activator import Activator
from gateway.processes import free_port, model_server_child, wait_http
from tests.stack import IRIS_BODY
from tests.test_supervisor_replicas import Run

FROM_ZERO = """\
listen: 127.0.0.1:{listen}
models:
  iris:
    versions:
      v1: {{autoscale: {{min: 0, target_concurrency: 4, window: 6s, stabilization: 1s, idle: 3s}}}}
"""


def timed_request(port: int, timeout: float = 60) -> tuple[float, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    start = time.perf_counter()
    try:
        conn.request(
            "POST", "/v2/models/iris/infer", IRIS_BODY, {"content-type": "application/json"}
        )
        resp = conn.getresponse()
        resp.read()
        return time.perf_counter() - start, resp.status
    finally:
        conn.close()


def cold_starts(repository: Path, rounds: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(Path(tmp), repository, FROM_ZERO)
        try:
            times = []
            for _ in range(rounds):
                run.wait("zero replicas", lambda: run.replicas("v1") == [], timeout=120)
                run.wait("the gate in Envoy", lambda: len(run.healthy_hosts("v1")) == 1)
                seconds, status = timed_request(run.listen)
                assert status == 200, status
                times.append(seconds)
            return times
        finally:
            run.stop()


def hold_path(repository: Path, n: int) -> dict[str, float]:
    port = free_port()
    child = model_server_child(str(repository), "iris", "v1", ("127.0.0.1", port), "/dev/null")
    child.start()
    activator = Activator()
    try:
        wait_http(f"http://127.0.0.1:{port}/v2/health/ready", child=child)
        gate = int(activator.open(("iris", "v1")).rsplit(":", 1)[1])
        activator.forward_to(("iris", "v1"), f"127.0.0.1:{port}")
        out = {}
        for name, target in (("direct", port), ("via_gate", gate)) * 2:  # interleaved
            latencies = [timed_request(target)[0] for _ in range(n)]
            out.setdefault(name, []).append(median(latencies))
        return {k: median(v) * 1000 for k, v in out.items()}
    finally:
        activator.stop()
        child.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repository", default="examples/models")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    repository = Path(args.repository).resolve()
    cold = cold_starts(repository, args.rounds)
    hold = hold_path(repository, args.requests)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    json.dump(
        {
            "commit": commit.stdout.strip(),
            "machine": machine(),
            "cold_start_s": {"rounds": cold, "median": median(cold), "max": max(cold)},
            "hold_path_p50_ms": {
                **hold,
                "overhead": hold["via_gate"] - hold["direct"],
                "requests": args.requests,
            },
        },
        sys.stdout,
        indent=2,
    )
    print()


if __name__ == "__main__":
    main()
