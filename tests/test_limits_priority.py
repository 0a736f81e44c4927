"""Priority through the real Envoy: while a `low` consumer saturates a version (a model
that sleeps 50 ms on each of its 4 prediction threads), its requests beyond
`limits.low_priority_requests` are shed with 503 and a `normal` consumer gets every answer.
The normal consumer's p99, unloaded and loaded, is printed (not asserted: timing is noisy)."""

from __future__ import annotations

import http.client
import statistics
import threading
import time

import pytest

from tests.stack import IRIS_BODY, Stack, routing_yaml
from tests.test_limits_e2e import as_consumer, consumers_yaml


@pytest.fixture(scope="module")
def stack(tmp_path_factory, sleepy_repository, envoy_binary):
    s = Stack(tmp_path_factory.mktemp("priority"), sleepy_repository, replicas={"v1": 1})
    try:
        s.start_models()
        text = routing_yaml(s.listen, s.model_ports, {"v1": 100})
        text = text.replace("    traffic:", "    limits: {low_priority_requests: 2}\n    traffic:")
        s.write(text + consumers_yaml(s.workdir, ", priority: {batch-job: low}"))
        s.start_control_plane()
        s.start_envoy()
        s.wait_converged()
        yield s
    finally:
        s.stop()


def timed(conn: http.client.HTTPConnection, consumer: str) -> tuple[int, float]:
    started = time.perf_counter()
    headers = {"content-type": "application/json", **as_consumer(consumer)}
    conn.request("POST", "/v2/models/iris/infer", IRIS_BODY, headers)
    reply = conn.getresponse()
    reply.read()
    return reply.status, time.perf_counter() - started


def normal_latencies(port: int, n: int = 60) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    replies = [timed(conn, "web-app") for _ in range(n)]
    conn.close()
    assert {status for status, _ in replies} == {200}
    return [seconds for _, seconds in replies]


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def test_low_is_shed_first_while_normal_keeps_its_answers(stack):
    unloaded = normal_latencies(stack.listen)
    low: list[int] = []
    stop = threading.Event()

    def flood() -> None:  # a batch job: as many requests as it can, 50 ms of back-off after a 503
        conn = http.client.HTTPConnection("127.0.0.1", stack.listen, timeout=10)
        while not stop.is_set():
            status, _ = timed(conn, "batch-job")
            low.append(status)
            if status == 503:
                time.sleep(0.05)
        conn.close()

    floods = [threading.Thread(target=flood) for _ in range(8)]
    for t in floods:
        t.start()
    try:
        while len(low) < 50:  # the flood is on
            time.sleep(0.01)
        loaded = normal_latencies(stack.listen)
    finally:
        stop.set()
        for t in floods:
            t.join()
    assert low.count(200) > 0 and low.count(503) > 0, low  # served within its pool, then shed
    assert set(low) == {200, 503}
    print(
        f"normal p99 unloaded {p99(unloaded) * 1000:.1f} ms, loaded {p99(loaded) * 1000:.1f} ms"
        f" ({p99(loaded) / p99(unloaded):.2f}x); low: {low.count(200)} served, "
        f"{low.count(503)} shed"
    )
