"""Canary rollouts end to end: the control plane process, a real Envoy, client load, and
test upstreams whose error rate and latency the test sets (a tiny aiohttp server)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from aiohttp import web

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


@dataclass
class Behaviour:
    """How one version answers: every `fail_every`-th request with a 500 (0: never), each
    after `delay` seconds."""

    fail_every: int = 0
    delay: float = 0.005
    served: int = 0


class Upstreams:
    """One aiohttp server per version on the given ports, in a thread of its own; each
    answers like a model server (`model_version` in the body) as its `Behaviour` says."""

    def __init__(self, ports: dict[str, int]):
        self.behaviour = {version: Behaviour() for version in ports}
        self.ports = ports
        self.loop = asyncio.new_event_loop()
        self.runners: list[web.AppRunner] = []
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def _app(self, version: str) -> web.Application:
        async def infer(_: web.Request) -> web.Response:
            b = self.behaviour[version]
            b.served += 1
            await asyncio.sleep(b.delay)
            if b.fail_every and b.served % b.fail_every == 0:
                return web.json_response({"error": "injected failure"}, status=500)
            return web.json_response({"model_name": "iris", "model_version": version})

        async def ready(_: web.Request) -> web.Response:
            return web.json_response({"ready": True})

        app = web.Application()
        app.router.add_post("/v2/models/iris/infer", infer)
        app.router.add_get("/v2/health/ready", ready)
        return app

    async def _start(self) -> None:
        for version, port in self.ports.items():
            runner = web.AppRunner(self._app(version), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            self.runners.append(runner)

    async def _stop(self) -> None:
        for runner in self.runners:
            await runner.cleanup()

    def __enter__(self) -> Upstreams:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


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


def wait_phase(s: Stack, phases: set[str], timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while (r := rollout(s))["phase"] not in phases:
        assert time.monotonic() < deadline, json.dumps(r, indent=1)[:3000]
        time.sleep(0.1)
    return r


def envoy_split(s: Stack) -> dict[str, int]:
    """The cluster weights of iris's split route in Envoy's own config (its admin port)."""
    dump = get_json(f"http://127.0.0.1:{s.envoy_admin}/config_dump?resource=dynamic_route_configs")
    for config in dump["configs"]:
        for host in config["route_config"].get("virtual_hosts", []):
            for route in host["routes"]:
                if route["name"] == "iris/split":
                    action = route["route"]
                    if "cluster" in action:
                        return {action["cluster"]: 100}
                    return {
                        c["name"]: c.get("weight", 0)
                        for c in action["weighted_clusters"]["clusters"]
                    }
    raise AssertionError("no iris/split route in Envoy's config")


def wait_envoy_split(s: Stack, want: dict[str, int], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (found := envoy_split(s)) != want:
        assert time.monotonic() < deadline, found
        time.sleep(0.05)


@pytest.mark.parametrize(
    "fault, check",
    [
        (Behaviour(fail_every=20), "error_rate failed"),  # 5% of requests fail
        (Behaviour(delay=0.03), "latency_vs_baseline failed"),  # six times slower
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
        wait_envoy_split(s, {"iris/v1": 100})  # the canary is out of Envoy's route
    assert r["phase"] == "rolled_back" and r["canary_weight"] == 0
    decision = r["history"][-1]
    assert decision["kind"] == "rollback" and check in decision["reason"], decision["reason"]
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
