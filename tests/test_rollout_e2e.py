"""Canary rollouts end to end: the control plane process, a real Envoy, client load, and
test upstreams whose error rate and latency the test sets (a tiny aiohttp server)."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bench.rollout_upstreams import Behaviour, Upstreams
from gateway import observe
from model_servers.repository import load_model
from tests.stack import LoadLoop, Stack, get_json, routing_yaml

ROLLOUT = """\
    # the operator's comment on the rollout: it must survive the controller's write
    rollout:
      canary: v2  # the new model
      steps: [{steps}]
      interval: 2s
      min_requests: 100
      max_error_rate: 0.01
      max_p99_ratio: 1.5
"""

SHADOW = """\
    rollout:
      canary: v3
      shadow: {{percent: 100, min_pairs: {min_pairs}, min_agreement: 0.99}}
      steps: [50, 100]
      interval: 2s
      min_requests: 50
      max_p99_ratio: 3  # the two servers are alike; their p99s part under load (1.7x seen)
"""
RECORD = ("--record-answers", "5000")


@pytest.fixture
def stack(tmp_path, model_repository, envoy_binary) -> Iterator[tuple[Stack, Upstreams]]:
    s = Stack(tmp_path, model_repository, replicas={"v1": 1, "v2": 1})
    ports = {version: ports[0] for version, ports in s.model_ports.items()}
    with Upstreams(ports) as upstreams:
        try:
            yield s, upstreams
        finally:
            s.stop()


def start(s: Stack, steps: str) -> None:
    text = routing_yaml(s.listen, s.model_ports, {"v1": 100}, extra=ROLLOUT.format(steps=steps))
    text = text.replace(
        "    traffic:", "    # the weights, written back by the rollout\n    traffic:"
    )
    s.write("# routing for the rollout test\n" + text)
    s.start_control_plane("--health-interval", "0")
    s.start_envoy()
    s.wait_converged()


def rollout(s: Stack) -> dict:
    return get_json(f"http://127.0.0.1:{s.admin}/rollouts")["rollouts"]["iris"]


def wait_phase(s: Stack, phases: set[str], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while (r := rollout(s))["phase"] not in phases:
        assert time.monotonic() < deadline, json.dumps(r, indent=1)[:3000]
        time.sleep(0.1)
    return r


def envoy_split(s: Stack) -> dict[str, int]:
    """The cluster weights of iris's split route in Envoy's own config (its admin port)."""
    return observe.weights(
        observe.route(f"http://127.0.0.1:{s.envoy_admin}", "iris/split")["route"]
    )


def wait_envoy_split(s: Stack, want: dict[str, int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (found := envoy_split(s)) != want:
        assert time.monotonic() < deadline, found
        time.sleep(0.05)


@pytest.mark.parametrize(
    "fault, check",
    [
        # 10% of requests fail: the absolute or the statistical error check fires first.
        # (5% against max_error_rate 1% at min_requests 100 is 5 errors in ~100: p about
        # 0.003, at the edge of the interval's alpha; a clean CI run promoted it once.)
        (Behaviour(fail_every=10), ("error_rate failed", "errors_vs_baseline failed")),
        (Behaviour(delay=0.05), ("latency_vs_baseline failed",)),  # ten times slower
    ],
    ids=["errors", "slow"],
)
def test_failing_canary_is_rolled_back_at_its_first_judged_interval(stack, fault, check):
    s, upstreams = stack
    upstreams.behaviour["v2"] = fault
    start(s, "50, 100")
    wait_envoy_split(s, {"iris/v1": 50, "iris/v2": 50})
    with LoadLoop(s.listen, threads=2):
        r = wait_phase(s, {"rolled_back", "succeeded"})
        assert r["phase"] == "rolled_back", json.dumps(r["history"], indent=1)[-3000:]
        wait_envoy_split(s, {"iris/v1": 100})  # the canary is out of Envoy's route
    assert r["canary_weight"] == 0
    decision = r["history"][-1]
    assert decision["kind"] == "rollback", decision
    assert any(c in decision["reason"] for c in check), decision["reason"]
    # rolled back at the first analysis with min_requests canary requests: before it, only
    # holds for too few requests
    assert all(d["kind"] in ("start", "hold") for d in r["history"][:-1]), r["history"]
    failed = [c for c in decision["checks"] if not c["passed"]]
    assert failed and all(c["p_value"] < c["alpha"] for c in failed)
    assert decision["canary"]["requests"] >= 100 and decision["baseline"]["requests"] > 0
    text = s.config.read_text()
    assert "traffic: {v1: 100, v2: 0}" in text and "    rollout:" not in text
    assert "# routing for the rollout test" in text and "# the weights, written back" in text


def test_healthy_canary_succeeds_through_a_control_plane_restart(stack):
    s, upstreams = stack
    start(s, "20, 50, 100")
    with LoadLoop(s.listen, threads=2):
        deadline = time.monotonic() + 30
        while (before := rollout(s))["step"] < 2:
            assert before["phase"] == "progressing", before["reason"]
            assert time.monotonic() < deadline, before["reason"]
            time.sleep(0.1)
        assert s.control_plane is not None
        s.control_plane.stop()
        s.start_control_plane("--health-interval", "0")
        resumed = rollout(s)
        assert resumed["history"][: len(before["history"])] == before["history"]
        assert (resumed["step"], resumed["phase"]) == (2, "progressing") or resumed["step"] > 2
        r = wait_phase(s, {"succeeded", "rolled_back"})
        wait_envoy_split(s, {"iris/v2": 100})
    assert r["phase"] == "succeeded", r["reason"]
    kinds = [d["kind"] for d in r["history"]]
    assert kinds.count("advance") == 1 and kinds[-1] == "promote", kinds
    text = s.config.read_text()
    assert "traffic: {v1: 0, v2: 100}" in text and "    rollout:" not in text
    assert "# routing for the rollout test" in text and "# the weights, written back" in text


def iris_rows(repository: Path, disagreeing: bool, n: int) -> list[list[float]]:
    """Iris-like inputs on which v1 and v3 predict the same class, or different ones."""
    v1, v3 = (load_model(repository, "iris", v).runtime for v in ("v1", "v3"))
    x = np.random.default_rng(0).uniform([4, 2, 1, 0.1], [8, 4.5, 7, 2.5], (5000, 4)).round(2)
    differ = v1.predict({"x": x}, None)["predict"] != v3.predict({"x": x}, None)["predict"]
    rows = x[differ == disagreeing]
    assert len(rows) >= n
    return rows[:n].tolist()


def send(port: int, rows: list[list[float]], stop: threading.Event, seen: list) -> None:
    """Requests with these rows in turn until `stop`; records (sent at, status, version)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    i = 0
    while not stop.is_set():
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": rows[i]}]}
        sent, i = time.monotonic(), (i + 1) % len(rows)
        conn.request("POST", "/v2/models/iris/infer", json.dumps(body))
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        seen.append((sent, resp.status, answer.get("model_version")))
    conn.close()


@pytest.mark.parametrize("disagree", [0.0, 0.3], ids=["agreeing", "disagreeing-30%"])
def test_shadow_phase_pairs_the_model_servers_answers(tmp_path, model_repository, disagree):
    s = Stack(tmp_path, model_repository, replicas={"v1": 1, "v3": 1}, model_options=RECORD)
    try:
        s.start_models()
        shadow = SHADOW.format(min_pairs=60)
        text = routing_yaml(s.listen, s.model_ports, {"v1": 100}, extra=shadow)
        s.write(text)
        s.start_control_plane("--health-interval", "0")
        s.start_envoy()
        s.wait_converged()
        bad = round(disagree * 10)
        rows = iris_rows(model_repository, False, 10 - bad) + iris_rows(model_repository, True, bad)
        stop, seen = threading.Event(), []
        worker = threading.Thread(target=send, args=(s.listen, rows, stop, seen), daemon=True)
        worker.start()
        try:
            shadowing_until = time.monotonic()
            deadline = shadowing_until + 40
            while (r := rollout(s))["phase"] == "shadowing":
                shadowing_until = time.monotonic()
                assert shadowing_until < deadline, r["reason"]
                time.sleep(0.1)
            r = wait_phase(s, {"succeeded", "rolled_back"})
        finally:
            stop.set()
            worker.join(15)
    finally:
        s.stop()
    assert all(status == 200 for _, status, _ in seen)
    during = {version for sent, _, version in seen if sent < shadowing_until}
    assert during == {"v1"}  # no client answer came from the shadow
    judged = next(d for d in r["history"] if d["kind"] in ("advance", "rollback"))
    numbers = judged["shadow"]
    assert numbers["pairs"] >= 60
    if disagree:
        assert r["phase"] == "rolled_back" and judged["step"] == 0, r["reason"]
        assert 0.6 < numbers["agreement"] < 0.8, numbers
        assert "no user saw the canary" in judged["reason"]
        example = numbers["examples"][0]
        assert example["primary"] != example["shadow"] and example["request_id"]
        assert {v for _, _, v in seen} == {"v1"}
    else:
        assert r["phase"] == "succeeded", r["reason"]
        assert numbers["agreement"] == 1.0 and judged["kind"] == "advance"


def test_abort_under_load_fails_no_request(stack, tmp_path):
    s, _ = stack
    (tmp_path / "token").write_text("s3cret")
    text = routing_yaml(s.listen, s.model_ports, {"v1": 100}, extra=ROLLOUT.format(steps="50"))
    s.write(text.replace("interval: 2s", "interval: 60m"))  # no decision of its own
    s.start_control_plane("--health-interval", "0", "--admin-token-file", str(tmp_path / "token"))
    s.start_envoy()
    wait_envoy_split(s, {"iris/v1": 50, "iris/v2": 50})
    with LoadLoop(s.listen, threads=2) as load:
        wait_until_served(load, "v2")
        request = urllib.request.Request(
            f"http://127.0.0.1:{s.admin}/rollouts/iris/abort",
            method="POST",
            headers={"Authorization": "Bearer s3cret"},
        )
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert json.load(resp)["rollout"]["phase"] == "rolled_back"
        wait_envoy_split(s, {"iris/v1": 100})
        after = time.monotonic()
        wait_until_served(load, "v1", since=after)
    assert load.failures() == []
    assert load.versions_since(after + 1).keys() <= {"v1"}
    assert rollout(s)["history"][-1]["kind"] == "abort"


def wait_until_served(load: LoadLoop, version: str, since: float = 0.0) -> None:
    deadline = time.monotonic() + 10
    while load.versions_since(since)[version] < 20:
        assert time.monotonic() < deadline, load.versions_since(since)
        time.sleep(0.05)
