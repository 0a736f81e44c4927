"""Telemetry through real Envoys: every request reaches the control plane's store over the
gRPC access log service, counted exactly, per version, across Envoys and failures."""

from __future__ import annotations

import asyncio
import http.client
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator

import grpc
import pytest
from aiohttp import web

from control_plane.telemetry import ANONYMOUS, OUTCOMES
from gateway import observe
from gateway.processes import free_port, wait_http
from tests.stack import (
    LoadLoop,
    Stack,
    cli,
    get_json,
    get_text,
    infer,
    ninety_ten,
    poll,
    routing_yaml,
)


def prometheus_samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of one metric: {sorted label pairs: value}."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line[len(name) + 1 :].rpartition("} ")
            pairs = tuple(sorted(tuple(p.split("=", 1)) for p in labels.split(",")))
            out[tuple((k, v.strip('"')) for k, v in pairs)] = float(value)
    return out


class Observer:
    """What the control plane and Envoy say about each iris version."""

    def __init__(self, stack: Stack):
        self.stack = stack

    def metrics(self) -> dict[str, float]:
        """infergate_requests_total per version (all status classes)."""
        text = get_text(f"http://127.0.0.1:{self.stack.admin}/metrics")
        totals: dict[str, float] = {}
        for labels, value in prometheus_samples(text, "infergate_requests_total").items():
            version = dict(labels)["version"]
            totals[version] = totals.get(version, 0) + value
        return totals

    def traffic(self, window: str = "60s") -> dict[str, dict]:
        report = get_json(f"http://127.0.0.1:{self.stack.admin}/traffic")
        versions = report["models"].get("iris", {"versions": {}})["versions"]
        return {
            v: row["windows"][window] | {"weight": row["weight"]} for v, row in versions.items()
        }

    def envoy_completed(self, admin: int, version: str) -> int:
        """Requests the Envoy with admin port `admin` completed to `version`."""
        name = f"cluster.iris/{version}.upstream_rq_completed"
        return observe.envoy_stat(f"http://127.0.0.1:{admin}", name)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_repository, envoy_binary) -> Iterator[Stack]:
    with ninety_ten(tmp_path_factory.mktemp("telemetry"), model_repository) as s:
        yield s


def send(port: int, n: int, new_connections: bool = False) -> list[int]:
    conn = None if new_connections else http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        return [infer(port, conn=conn).status for _ in range(n)]
    finally:
        if conn:
            conn.close()


def test_exactly_1000_requests_at_90_10_are_counted_like_envoys_own_counters(stack):
    seen = Observer(stack)
    assert send(stack.listen, 1000) == [200] * 1000
    envoy = {v: seen.envoy_completed(stack.envoy_admin, v) for v in ("v1", "v2")}
    assert sum(envoy.values()) == 1000
    assert 800 < envoy["v1"] < 980  # the split happened
    poll(lambda: sum(seen.metrics().values()) >= 1000, what="1,000 logged requests")
    time.sleep(0.5)  # one more flush interval: nothing beyond 1,000 may arrive
    assert seen.metrics() == envoy
    traffic = seen.traffic()
    assert {v: traffic[v]["requests"] for v in ("v1", "v2")} == envoy
    assert traffic["v1"]["weight"] == 90 and traffic["v2"]["weight"] == 10
    assert traffic["v1"]["error_rate"] == 0
    assert traffic["v1"]["status_classes"] == {"2xx": envoy["v1"]}
    assert 0 < traffic["v1"]["p50"] <= traffic["v1"]["p99"] < 1


def test_infergate_top_shows_the_versions(stack):
    admin = f"http://127.0.0.1:{stack.admin}"
    out = subprocess.run(
        cli("top", "--admin-url", admin, "--once"), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    v1 = next(line for line in lines if " v1 " in line)
    assert "iris" in v1 and " 90 " in v1
    assert any("test-envoy" in line and "sotw" in line for line in lines)


def test_two_envoys_on_one_control_plane_add_up(stack):
    seen = Observer(stack)
    second, second_listen = free_port(), free_port()
    stack.launch_envoy("second-envoy", second, delta=True, listen=second_listen)
    wait_http(f"http://127.0.0.1:{second}/ready", timeout=30)
    stack.wait_converged(nodes=2)
    before = seen.metrics()
    admins = (stack.envoy_admin, second)
    envoy_before = {(a, v): seen.envoy_completed(a, v) for a in admins for v in ("v1", "v2")}
    # Listeners never share a port: the second Envoy serves on an address of its own.
    for port in (stack.listen, second_listen):
        assert send(port, 200, new_connections=True) == [200] * 200
    delta = {k: seen.envoy_completed(*k) - n for k, n in envoy_before.items()}
    assert sum(delta.values()) == 400
    assert all(sum(n for (a, _), n in delta.items() if a == admin) > 0 for admin in admins)
    want = {v: before.get(v, 0) + delta[admins[0], v] + delta[admins[1], v] for v in ("v1", "v2")}
    poll(lambda: seen.metrics() == want, what=f"the sum of both Envoys {want}")


Handler = Callable[[web.Request], Awaitable[web.Response]]


async def answer_500(request: web.Request) -> web.Response:
    return web.json_response({"error": "broken on purpose"}, status=500)


class FakeServer:
    """An aiohttp upstream on its own thread: ready for health checks, `handler` for the
    rest (by default 500)."""

    def __init__(self, handler: Handler = answer_500) -> None:
        self.port = free_port()
        self.handler = handler
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _start(self) -> web.AppRunner:
        async def handle(request: web.Request) -> web.Response:
            if request.path.startswith("/v2/health"):
                return web.json_response({"ready": True})
            return await self.handler(request)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        return runner

    def __enter__(self) -> FakeServer:
        self._thread.start()
        self._runner = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def test_a_version_answering_500_shows_error_rate_1(stack):
    seen = Observer(stack)
    with FakeServer() as bad:
        text = routing_yaml(stack.listen, {**stack.model_ports, "bad": [bad.port]}, {"bad": 100})
        started = time.time()
        stack.write(text)
        stack.wait_converged(after=started, nodes=1)
        statuses = send(stack.listen, 50)
        assert set(statuses) <= {500, 503} and len(statuses) == 50
        row = poll(
            lambda: (
                seen.traffic("10s").get("bad", {}).get("requests", 0) >= 50
                and seen.traffic("10s")["bad"]
            ),
            what="the failing version's requests",
        )
        assert row["requests"] == 50
        assert row["error_rate"] == 1.0
    stack.apply({"v1": 90, "v2": 10})


def test_a_killed_endpoint_shows_up_as_envoy_local_failures(stack):
    seen = Observer(stack)
    stack.apply({"v2": 100})
    stack.models[stack.model_ports["v2"][0]].stop(sig=signal.SIGKILL)
    statuses = send(stack.listen, 30)
    assert set(statuses) == {503}
    row = poll(
        lambda: (r := seen.traffic("10s")["v2"])["local_failures"] >= 30 and r,
        what="local failures of the killed version",
    )
    assert row["local_failures"] == 30  # Envoy's own 503s (UF / UH), not silence
    assert row["status_classes"]["5xx"] == 30
    stack.apply({"v1": 100})


def test_a_malformed_access_log_stream_is_dropped_with_a_log_line(stack):
    channel = grpc.insecure_channel(f"127.0.0.1:{stack.xds}")
    call = channel.stream_unary(
        "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs",
        request_serializer=None,
        response_deserializer=None,
    )
    with pytest.raises(grpc.RpcError) as raised:
        call(iter([b"\xff\xff\xff not a protobuf"]), timeout=10)
    channel.close()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    metrics = get_text(f"http://127.0.0.1:{stack.admin}/metrics")
    assert "infergate_telemetry_dropped_streams_total 1.0" in metrics
    log = stack.workdir / "control-plane.log"
    poll(lambda: "dropping the access log stream" in log.read_text(), what="the log line")
    seen = Observer(stack)
    before = sum(seen.metrics().values())
    assert send(stack.listen, 10) == [200] * 10  # Envoy's own stream still counts
    poll(lambda: sum(seen.metrics().values()) == before + 10, what="10 more requests")


def test_sigkill_of_the_control_plane_fails_no_request_and_counting_resumes(stack):
    seen = Observer(stack)
    stack.apply({"v1": 100})
    with LoadLoop(stack.listen) as load:
        poll(lambda: seen.traffic("10s")["v1"]["requests"] > 0, what="traffic before the kill")
        stack.control_plane.stop(sig=signal.SIGKILL)
        sent_before_restart = len(load.results)
        poll(lambda: len(load.results) > sent_before_restart + 50, what="load without a plane")
        stack.start_control_plane()
        stack.wait_converged()
        restarted = time.monotonic()
        poll(lambda: seen.traffic("10s")["v1"]["requests"] > 20, what="counting after restart")
        poll(lambda: any(r[0] > restarted for r in load.results), what="requests after restart")
    assert load.failures() == []


def usage_total(report: dict, consumer: str, model: str) -> dict[str, float]:
    """Requests since start by outcome of one consumer and model in a /traffic report."""
    for row in report["consumers"]:
        if (row["consumer"], row["model"]) == (consumer, model):
            return row["total"]["outcomes"]
    return dict.fromkeys(OUTCOMES, 0.0)


def concurrently(n: int, call: Callable[[], int]) -> list[int]:
    """`call()` from n threads at once."""
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(call())) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


async def answer_as_asked(request: web.Request) -> web.Response:
    """The status in the request's x-answer header (default 200), after x-sleep seconds."""
    await asyncio.sleep(float(request.headers.get("x-sleep", 0)))
    return web.json_response(
        {"answer": "as asked"}, status=int(request.headers.get("x-answer", 200))
    )


def test_usage_per_consumer_and_model_counts_rejections_by_reason(stack):
    """Requests with different x-infergate-consumer headers, and rejections Envoy or the
    upstream makes without API management: 404 for an unknown model (no route, no
    cluster), 413 / 403 / 401 from the upstream, 503 from a circuit breaker's overflow."""
    admin = f"http://127.0.0.1:{stack.admin}"
    with FakeServer(answer_as_asked) as fake:
        echo = (
            "  echo:\n"
            f"    versions: {{v1: {{endpoints: [127.0.0.1:{fake.port}]}}}}\n"
            "    traffic: {v1: 100}\n"
            "    resilience:\n"
            "      circuit_breakers: {max_connections: 1, max_pending_requests: 1, "
            "max_requests: 1}\n"
        )
        started = time.time()
        stack.write(routing_yaml(stack.listen, stack.model_ports, {"v1": 100}, extra=echo))
        stack.wait_converged(after=started)
        conn = http.client.HTTPConnection("127.0.0.1", stack.listen, timeout=10)

        def call(consumer: str | None, path: str = "/v2/models/iris/infer", **headers) -> int:
            if consumer:
                headers["x-infergate-consumer"] = consumer
            return infer(stack.listen, path, headers, conn).status

        echo_path = "/v2/models/echo/infer"
        poll(lambda: call("probe", echo_path) == 200, what="the echo model")
        anonymous_before = usage_total(get_json(f"{admin}/traffic"), ANONYMOUS, "iris")["ok"]
        key = {"authorization": "Bearer sk-alice-secret", "x-api-key": "sk-alice-secret"}
        assert [call("alice", **key) for _ in range(5)] == [200] * 5
        assert [call("bob") for _ in range(3)] == [200] * 3
        assert [call("bob", "/v2/models/nosuch/infer") for _ in range(2)] == [404] * 2
        assert [call(None) for _ in range(2)] == [200] * 2
        answers = {"x-answer": "413"}, {"x-answer": "403"}, {"x-answer": "401"}
        assert [call("carol", echo_path, **a) for a in answers] == [413, 403, 401]
        conn.close()
        slow = {"x-infergate-consumer": "dave", "x-sleep": "0.5"}
        shed = Counter(concurrently(4, lambda: infer(stack.listen, echo_path, slow).status))
        assert shed[200] >= 1 and shed[503] >= 1 and shed[200] + shed[503] == 4, shed

    ok = dict.fromkeys(OUTCOMES, 0.0)
    want = {
        ("alice", "iris"): ok | {"ok": 5},
        ("bob", "iris"): ok | {"ok": 3},
        ("bob", "nosuch"): ok | {"client_error": 2},
        ("carol", "echo"): ok | {"too_large": 1, "forbidden": 1},
        ("dave", "echo"): ok | {"ok": shed[200], "shed": shed[503]},
    }

    def named(report: dict) -> dict:
        return {
            (row["consumer"], row["model"]): row["total"]["outcomes"]
            for row in report["consumers"]
            if row["consumer"] in ("alice", "bob", "carol", "dave")
        }

    report = poll(
        lambda: (r := get_json(f"{admin}/traffic")) and named(r) == want and r,
        what=f"usage per consumer {want}",
    )
    assert usage_total(report, ANONYMOUS, "iris")["ok"] == anonymous_before + 2
    # The 401 counts for no consumer, whatever the header claimed.
    assert usage_total(report, ANONYMOUS, "echo")["unauthorized"] == 1
    metrics = prometheus_samples(get_text(f"{admin}/metrics"), "infergate_consumer_requests_total")
    for (consumer, model), outcomes in want.items():
        for kind, n in outcomes.items():
            labels = (("consumer", consumer), ("model", model), ("outcome", kind))
            assert metrics[labels] == n, labels
    out = subprocess.run(
        cli("usage", "--admin-url", admin, "--window", "total"),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert out.returncode == 0, out.stderr
    # Only the consumer's name is logged, never a credential.
    shown = (get_text(f"{admin}/traffic"), get_text(f"{admin}/metrics"), out.stdout)
    assert all("alice" in text and "sk-alice-secret" not in text for text in shown)
    assert "sk-alice-secret" not in (stack.workdir / "control-plane.log").read_text()
    carol = next(line for line in out.stdout.splitlines() if "carol" in line)
    cells = [cell.strip() for cell in carol.split("│")[1:-1]]
    assert cells == ["carol", "echo", "2", "0", "0", "1", "1", "0", "0", "0", "0", "0"]
    stack.apply({"v1": 90, "v2": 10})
