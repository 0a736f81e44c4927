"""Autoscaling under a load step, end to end: `infergate run`, real Envoy, real replicas
of a model that waits 50 ms per prediction (so more replicas serve more on 2 cores), the
signal from the control plane's telemetry (what Envoy reported per request)."""

from __future__ import annotations

import json
import time

import pytest

from gateway.observe import get_json
from tests.stack import LoadLoop
from tests.test_supervisor_replicas import Run

AUTOSCALED = """\
listen: 127.0.0.1:{listen}
models:
  iris:
    versions:
      v1:
        autoscale: {{min: 1, max: 4, target_concurrency: 4, window: 6s, stabilization: 3s}}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory, sleepy_repository, envoy_binary):
    r = Run(tmp_path_factory.mktemp("autoscale"), sleepy_repository, AUTOSCALED)
    try:
        yield r
    finally:
        r.stop()


def decision(run: Run) -> dict:
    status = json.loads((run.workdir / "replicas.json").read_text())
    return status["autoscale"].get("iris/v1", {})


def reported(run: Run) -> dict:
    """The decision as the control plane shows it (reported by the supervisor)."""
    status = get_json(f"http://127.0.0.1:{run.admin}/status")
    return status["autoscale"].get("iris/v1", {"desired": 0})


def test_load_step_scales_up_then_down_to_min_without_a_failed_request(run):
    run.wait("min replicas", lambda: len(run.healthy_hosts("v1")) == 1)
    with LoadLoop(run.listen, threads=1) as calm:
        run.wait("a decision", lambda: decision(run).get("desired") == 1)
        with LoadLoop(run.listen, threads=16) as burst:
            stepped = time.monotonic()
            run.wait("3 healthy hosts", lambda: len(run.healthy_hosts("v1")) >= 3, timeout=60)
            scaled = time.monotonic()
            up = decision(run)
            run.wait("the control plane shows it", lambda: reported(run)["desired"] >= 3)
            burst.wait_results(300)
        run.wait("scaled down to min", lambda: len(run.healthy_hosts("v1")) == 1, timeout=90)
        run.wait("drained", lambda: len(run.replicas("v1")) == 1)
        down = decision(run)
    assert up["desired"] >= 3 and up["panic"], up
    assert down["desired"] == 1 and not down["panic"], down
    # The p99 falls back: one replica queues 16 clients 4 deep, three or more serve them (by
    # 1.37-1.43x in the two CI runs where 1.5x failed: four test workers share two cores).
    before, after = burst.p99(stepped, stepped + 2), burst.p99(scaled + 1)
    assert after < before / 1.2, (before, after)
    failures = calm.failures() + burst.failures()
    assert burst.results and failures == [], failures[:5]
    log = (run.workdir / "supervisor.log").read_text()
    assert "iris/v1: desired 1 (ready" in log and "over 6s" in log, log[-2000:]
