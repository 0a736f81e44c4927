"""Prometheus metrics and ORCA load reports of the model server."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from model_servers.load_report import LoadReporter
from model_servers.server import initial_models, make_app
from model_servers.settings import Batching

ROOT = Path(__file__).resolve().parent.parent
BODY = {"inputs": [{"name": "x", "datatype": "FP64", "shape": [2, 4], "data": [1.0] * 8}]}
ORCA = re.compile(
    r"TEXT cpu_utilization=(?P<cpu>[0-9.]+), rps_fractional=(?P<rps>[0-9.]+), "
    r"named_metrics\.queue_depth=(?P<queue>\d+), named_metrics\.inflight=(?P<inflight>\d+)"
)


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_batch_queue_and_unknown_model_metrics(repo: Path) -> None:
    app = make_app(initial_models(repo, "iris", "v1"), batching=Batching(32, 2))
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        responses = await asyncio.gather(
            *(client.post("/v2/models/iris/infer", json=BODY) for _ in range(40))
        )
        assert {r.status for r in responses} == {200}
        assert (await client.post("/v2/models/rose/infer", json=BODY)).status == 404
        text = await (await client.get("/metrics")).text()
    finally:
        await client.close()
    got = samples(text)
    labels = frozenset({("model", "iris"), ("version", "v1")})
    assert got[("infergate_model_batch_size_sum", labels)] == 80
    calls = got[("infergate_model_batch_size_count", labels)]
    assert got[("infergate_model_batch_requests_sum", labels)] == 40
    assert calls == got[("infergate_model_batch_requests_count", labels)] < 40
    assert got[("infergate_model_queue_depth", labels)] == 0
    assert got[("infergate_model_inflight_requests", labels)] == 0
    assert got[("infergate_unknown_model_requests_total", frozenset())] == 1
    ok = frozenset({*labels, ("outcome", "ok")})
    assert got[("infergate_model_requests_total", ok)] == 40


async def test_orca_load_report_header(repo: Path) -> None:
    client = TestClient(TestServer(make_app(initial_models(repo, "iris", "v1")), host="127.0.0.1"))
    await client.start_server()
    try:
        first = await client.post("/v2/models/iris/infer", json=BODY)
        assert ORCA.fullmatch(first.headers["endpoint-load-metrics"])
        for _ in range(20):
            await client.post("/v2/models/iris/infer", json=BODY)
        await asyncio.sleep(0.6)  # past the reporter's interval
        resp = await client.post("/v2/models/iris/infer", json={"inputs": []})
        assert resp.status == 400
        report = ORCA.fullmatch(resp.headers["endpoint-load-metrics"])
        assert report is not None
        assert float(report["rps"]) > 0 and 0 <= float(report["cpu"]) <= 1
        assert report["queue"] == "0" and report["inflight"] == "0"
    finally:
        await client.close()


def test_load_reporter_rates(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    cpu = [10.0]
    monkeypatch.setattr("model_servers.load_report.time.monotonic", lambda: now[0])
    monkeypatch.setattr("model_servers.load_report.time.process_time", lambda: cpu[0])
    monkeypatch.setattr("model_servers.load_report.os.cpu_count", lambda: 2)
    reporter = LoadReporter({"queue_depth": lambda: 3}, interval=1.0)
    for _ in range(50):
        reporter.record()
    now[0] += 2.0
    cpu[0] += 1.0
    assert reporter.value() == (
        "TEXT cpu_utilization=0.250, rps_fractional=25.0, named_metrics.queue_depth=3"
    )
