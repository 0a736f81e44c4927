"""Scale from zero through the activator: `infergate run`, real Envoy, real replicas."""

from __future__ import annotations

import http.client
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.stack import Reply, infer
from tests.test_supervisor_replicas import Run

FROM_ZERO = """\
listen: 127.0.0.1:{listen}
models:
  iris:
    versions:
      v1:
        autoscale: {{min: 0, target_concurrency: 4, window: 4s, stabilization: 2s, idle: 4s}}
      broken:  # no such model in the repository: its replica exits at once
        autoscale: {{min: 0, max: 1, target_concurrency: 4}}
    traffic: {{v1: 100, broken: 0}}
"""

pytestmark = pytest.mark.early  # long: started first (tests/conftest.py)


def infer_waiting(port: int, path: str = "/v2/models/iris/infer") -> Reply:
    """One request that may wait for a cold start (longer than `infer`'s 10 s)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        return infer(port, path, conn=conn)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory, model_repository, envoy_binary):
    options = ("--activation-timeout", "20")
    with Run(tmp_path_factory.mktemp("zero"), model_repository, FROM_ZERO, *options) as r:
        yield r


def test_first_and_concurrent_requests_from_zero_all_succeed(run):
    run.wait("the activator in Envoy", lambda: len(run.healthy_hosts("v1")) == 1)
    assert run.replicas("v1") == []
    with ThreadPoolExecutor(21) as pool:
        replies = list(pool.map(lambda _: infer_waiting(run.listen), range(21)))
    assert [r.status for r in replies] == [200] * 21, [r.body[:200] for r in replies]
    assert {r.version for r in replies} == {"v1"}
    assert len(run.ready_addresses("v1")) >= 1


def test_idle_version_scales_to_zero_and_back(run):
    run.wait("scaled to zero", lambda: run.replicas("v1") == [], timeout=90)
    reply = infer_waiting(run.listen)
    assert reply.status == 200 and reply.version == "v1", reply.body[:300]


def test_a_replica_that_cannot_start_fails_held_requests_with_503_at_once(run):
    """Its exit answers the held request, long before the 20 s activation timeout."""
    run.wait("the activator in Envoy", lambda: len(run.healthy_hosts("broken")) == 1)
    reply = infer_waiting(run.listen, "/v2/models/iris/versions/broken/infer")
    assert reply.status == 503, reply.body[:300]
    error = json.loads(reply.body)["error"]
    assert "no replica of iris/broken could start: iris/broken#0 exited with code" in error
    log = (run.workdir / "supervisor.log").read_text()
    assert "replica iris/broken#0" in log and "exited with code" in log
