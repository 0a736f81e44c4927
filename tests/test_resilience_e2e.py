"""Resilience through the real Envoy: a replica killed with SIGKILL under steady load."""

from __future__ import annotations

import signal
import time

import pytest

from tests.stack import LoadLoop, Stack, get_text


def host_stat(stack: Stack, cluster: str, stat: str) -> dict[int, str]:
    """One of Envoy's per-endpoint values of a cluster, by port (admin /clusters)."""
    values = {}
    for line in get_text(f"http://127.0.0.1:{stack.envoy_admin}/clusters").splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == cluster and parts[2] == stat:
            values[int(parts[1].rsplit(":", 1)[1])] = parts[3]
    return values


@pytest.mark.parametrize("mode", ["sotw", "delta"])
def test_sigkill_one_of_three_replicas_under_load(tmp_path, model_repository, envoy_binary, mode):
    stack = Stack(tmp_path, model_repository, delta=mode == "delta", replicas={"v1": 3})
    try:
        stack.start_all({"v1": 100})
        victim = stack.model_ports["v1"][1]
        with LoadLoop(stack.listen, threads=4) as load:
            time.sleep(1.0)
            stack.models[victim].stop(sig=signal.SIGKILL)
            killed = time.monotonic()
            time.sleep(2.0)
            attempts = host_stat(stack, "iris/v1", "rq_total")[victim]
            time.sleep(2.0)
            # Ejected: no new request is even tried on the dead endpoint.
            assert host_stat(stack, "iris/v1", "rq_total")[victim] == attempts
        total, failed = len(load.results), load.failures()
        assert total > 1000, total
        assert len(failed) / total < 0.001, failed[:5]
        assert host_stat(stack, "iris/v1", "health_flags")[victim] != "healthy"
        served_late = {r[2] for r in load.results if r[0] > killed + 3 and r[1] == 200}
        assert served_late == {"v1"}
    finally:
        stack.stop()


def test_orca_weighted_balancing_is_accepted_and_serves(tmp_path, model_repository, envoy_binary):
    stack = Stack(tmp_path, model_repository, replicas={"v1": 2})
    try:
        stack.start_all({"v1": 100})
        started = time.time()
        stack.write(stack.config.read_text() + "    resilience: {load_balancing: orca_weighted}\n")
        status = stack.wait_converged(after=started)
        assert all(t["nack"] is None for t in status["nodes"][0]["types"].values())
        with LoadLoop(stack.listen) as load:
            time.sleep(2.0)
        assert load.failures() == [] and len(load.results) > 100
        served = host_stat(stack, "iris/v1", "rq_success")
        assert all(int(n) > 0 for n in served.values()), served
    finally:
        stack.stop()
