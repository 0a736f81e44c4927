"""Resilience through the real Envoy: a replica killed with SIGKILL under steady load, retries
to another replica, circuit breakers, outlier detection, the route timeout and ORCA-weighted
balancing. Besides iris v1, two Python models serve as misbehaving replicas: `slow` sleeps
before it answers and `busy` burns CPU on every request."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from collections import Counter

import pytest

from gateway import observe
from gateway.processes import free_port
from tests.stack import LoadLoop, Stack, count_versions, infer

MISBEHAVING = """
import time

import numpy as np


class Misbehaving:
    def __init__(self, sleep=0.0, burn=0.0):
        self.sleep, self.burn = sleep, burn

    def load(self):
        pass

    def predict(self, inputs):
        end = time.process_time() + self.burn
        while time.process_time() < end:
            pass
        time.sleep(self.sleep)
        return {"predict": np.zeros(len(inputs["input-0"]), dtype=np.int64)}
"""

SETTINGS = """
runtime: python
class: model.py:Misbehaving
parameters: {{{parameters}}}
inputs: [{{name: input-0, datatype: FP64, shape: [-1, 4]}}]
outputs: [{{name: predict, datatype: INT64, shape: [-1]}}]
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_repository, envoy_binary):
    """iris v1 (two replicas), `slow` (sleeps 2 s) and `busy` (4 ms of CPU per request)."""
    repo = tmp_path_factory.mktemp("resilience-models")
    shutil.copytree(model_repository / "iris" / "v1", repo / "iris" / "v1")
    for version, parameters in (("slow", "sleep: 2.0"), ("busy", "burn: 0.004")):
        folder = repo / "iris" / version
        folder.mkdir(parents=True)
        (folder / "model.py").write_text(MISBEHAVING)
        (folder / "model-settings.yaml").write_text(SETTINGS.format(parameters=parameters))
    workdir = tmp_path_factory.mktemp("resilience")
    s = Stack(workdir, repo, replicas={"v1": 2, "slow": 1, "busy": 1})
    try:
        s.start_all({"v1": 100})
        yield s
    finally:
        s.stop()


def endpoints(*ports: int) -> str:
    return "[" + ", ".join(f"127.0.0.1:{p}" for p in ports) + "]"


def apply_versions(stack: Stack, versions: dict[str, tuple[int, ...]], model_yaml: str) -> None:
    """Route iris to `versions` (name: ports) with more model keys; wait until Envoy runs it."""
    lines = [f"listen: 127.0.0.1:{stack.listen}", "models:", "  iris:", "    versions:"]
    lines += [f"      {v}: {{endpoints: {endpoints(*ports)}}}" for v, ports in versions.items()]
    started = time.time()
    stack.write("\n".join(lines) + "\n" + model_yaml)
    stack.wait_converged(after=started)


def test_a_retry_goes_to_another_replica(stack):
    """One of three endpoints refuses connections and stays in the pool (no health check, no
    ejection); `random` balancing would pick it again for a third of the retries, so with
    retries to any replica about 7 of 600 requests would fail all four tries. None fails:
    each retry goes to a replica that has not failed it (Envoy re-picks up to 3 times, which
    leaves about one failure in a million runs)."""
    dead = free_port()
    a, b = stack.model_ports["v1"]
    apply_versions(
        stack,
        {"v1": (a, b, dead)},
        "    resilience:\n"
        "      health_check: false\n"
        "      outlier_detection: {max_ejection_percent: 0}\n"
        "      load_balancing: random\n"
        "      retries: {attempts: 3}\n",
    )
    before = observe.hosts(stack.envoy_url, "iris/v1")[f"127.0.0.1:{dead}"]["cx_connect_fail"]
    assert count_versions(stack.listen, 600) == {"v1": 600}
    tried = observe.hosts(stack.envoy_url, "iris/v1")[f"127.0.0.1:{dead}"]["cx_connect_fail"]
    assert tried - before > 100  # about a third of the first tries


def test_circuit_breaker_settings_reach_envoy_and_refuse_overflow(stack):
    (slow,) = stack.model_ports["slow"]
    apply_versions(
        stack,
        {"slow": (slow,)},
        "    resilience:\n"
        "      circuit_breakers: {max_connections: 1, max_pending_requests: 1, max_requests: 1}\n"
        "      outlier_detection: {consecutive_5xx: 3, ejection_time: 20s}\n",
    )
    cluster = observe.dynamic_cluster(stack.envoy_url, "iris/slow")
    (thresholds,) = cluster["circuit_breakers"]["thresholds"]
    assert (thresholds["max_connections"], thresholds["max_pending_requests"]) == (1, 1)
    assert thresholds["max_requests"] == 1
    assert cluster["outlier_detection"]["consecutive_5xx"] == 3
    assert cluster["outlier_detection"]["base_ejection_time"] == "20s"
    # Envoy counts a refusal by the connection, pending or request limit in one of these.
    kinds = ("upstream_rq_pending_overflow", "upstream_cx_overflow", "upstream_rq_retry_overflow")

    def overflows() -> int:
        return sum(stack.envoy_stat(f"cluster.iris/slow.{kind}") for kind in kinds)

    before = overflows()
    replies = []

    def send() -> None:
        replies.append(infer(stack.listen))

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    statuses = Counter(r.status for r in replies)
    # One request runs, one waits for it, the others are refused at once with a 503.
    assert statuses[200] >= 1 and statuses[503] >= 1, statuses
    assert statuses[200] + statuses[503] == 4, statuses
    assert overflows() > before


def test_the_route_timeout_answers_504(stack):
    (slow,) = stack.model_ports["slow"]
    apply_versions(stack, {"slow": (slow,)}, "    timeout: 300ms\n")
    route = observe.route(stack.envoy_url, "iris/split")["route"]
    assert route["timeout"] == "0.300s"
    before = stack.envoy_stat("cluster.iris/slow.upstream_rq_timeout")
    reply = infer(stack.listen)
    assert reply.status == 504, reply
    assert stack.envoy_stat("cluster.iris/slow.upstream_rq_timeout") == before + 1


def test_orca_weighted_shifts_load_to_the_less_loaded_replica(stack):
    """`busy` reports a high CPU utilization for the same request rate: Envoy weighs it
    down, so the idle v1 replica answers most requests."""
    (fast, _), (busy,) = stack.model_ports["v1"], stack.model_ports["busy"]
    apply_versions(stack, {"v1": (fast, busy)}, "    resilience: {load_balancing: orca_weighted}\n")
    with LoadLoop(stack.listen, threads=4) as load:
        load.wait_results(1500)  # weights follow the reports after a second or two
        settled = time.monotonic()
        load.wait_results(1000)
    assert load.failures() == []
    # The busy replica answers as model_version "busy", the fast one as "v1".
    late = load.versions_since(settled)
    assert late["v1"] > 2 * late["busy"] > 0, late


@pytest.mark.parametrize("mode", ["sotw", "delta"])
def test_sigkill_one_of_three_replicas_under_load(tmp_path, model_repository, envoy_binary, mode):
    stack = Stack(tmp_path, model_repository, delta=mode == "delta", replicas={"v1": 3})
    try:
        stack.start_all({"v1": 100})
        victim = f"127.0.0.1:{stack.model_ports['v1'][1]}"
        ejections = "cluster.iris/v1.outlier_detection.ejections_enforced_total"
        with LoadLoop(stack.listen, threads=4) as load:
            load.wait_results(200)
            stack.models[stack.model_ports["v1"][1]].stop(sig=signal.SIGKILL)
            deadline = time.monotonic() + 20
            while not observe.hosts(stack.envoy_url, "iris/v1")[victim]["health"]:
                assert time.monotonic() < deadline, "the dead replica was never taken out"
                time.sleep(0.05)
            # Taken out: Envoy no longer even tries to connect to it.
            tried = observe.hosts(stack.envoy_url, "iris/v1")[victim]["cx_connect_fail"]
            load.wait_results(500)
            assert observe.hosts(stack.envoy_url, "iris/v1")[victim]["cx_connect_fail"] == tried
        assert load.failures() == [], load.failures()[:5]
        assert stack.envoy_stat(ejections) >= 1
    finally:
        stack.stop()
