"""`python -m bench.scaling`: a load step, scale from zero, and the activator's hold path.

One run, one JSON document on stdout:
- load step: `infergate run` with a version at `min: 1, target_concurrency: 4`; per round,
  16 closed-loop clients start (after one), and the time until Envoy counts a second healthy
  host is recorded, with the p99 of requests sent before the step, until then, and after;
  then the load returns to one client until the version is back at one replica;
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
import threading
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


STEP = """\
listen: 127.0.0.1:{listen}
models:
  iris:
    versions:
      v1: {{autoscale: {{min: 1, max: 4, target_concurrency: 4, window: 6s, stabilization: 2s}}}}
"""


def p99(results: list, since: float, until: float) -> float | None:
    latencies = sorted(r[1] for r in results if since <= r[0] < until and r[2] == 200)
    return latencies[int(0.99 * (len(latencies) - 1))] * 1000 if latencies else None


def load_steps(repository: Path, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(Path(tmp), repository, STEP)
        out: dict[str, list] = {"step_to_serving_s": [], "p99_ms": [], "failed": []}
        try:
            for _ in range(rounds):
                run.wait("one replica", lambda: len(run.healthy_hosts("v1")) == 1, timeout=180)
                results: list[tuple[float, float, int]] = []
                with Clients(run.listen, 1, results):
                    time.sleep(5)
                    step = time.monotonic()
                    with Clients(run.listen, 15, results):
                        run.wait("a new replica", lambda: len(run.healthy_hosts("v1")) >= 2, 120)
                        serving = time.monotonic()
                        time.sleep(5)
                    after = time.monotonic()
                out["step_to_serving_s"].append(serving - step)
                out["p99_ms"].append(
                    {
                        "before": p99(results, 0, step),
                        "during": p99(results, step, serving),
                        "after": p99(results, serving, after),
                    }
                )
                out["failed"].append(sum(r[2] != 200 for r in results))
            return out
        finally:
            run.stop()


class Clients:
    """`n` closed-loop clients appending (sent at, seconds, status) to `results`."""

    def __init__(self, port: int, n: int, results: list):
        self.port, self.n, self.results = port, n, results
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.work, daemon=True) for _ in range(n)]

    def work(self) -> None:
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                seconds, status = timed_request(self.port)
            except OSError:
                seconds, status = time.monotonic() - sent, 0
            self.results.append((sent, seconds, status))

    def __enter__(self) -> Clients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(70)


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
    steps = load_steps(repository, args.rounds)
    cold = cold_starts(repository, args.rounds)
    hold = hold_path(repository, args.requests)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    json.dump(
        {
            "commit": commit.stdout.strip(),
            "machine": machine(),
            "load_step": {
                **steps,
                "step_to_serving_median_s": median(steps["step_to_serving_s"]),
                "step_to_serving_max_s": max(steps["step_to_serving_s"]),
            },
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
