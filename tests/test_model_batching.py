"""Adaptive batching: merged predict calls give exactly the unbatched results."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from model_servers.repository import LoadedModel, load_model
from model_servers.settings import Batching
from tests.app_client import app_client as _client
from tests.app_client import poll
from tests.iris_numpy import IRIS_X as X

ROOT = Path(__file__).resolve().parent.parent


def value(text: str, name: str) -> float:
    """A sample's value summed over all label sets."""
    samples = (s for family in text_string_to_metric_families(text) for s in family.samples)
    return sum(s.value for s in samples if s.name == name)


def histogram(text: str, name: str) -> tuple[float, float]:
    """(sum, count) of a histogram summed over all label sets."""
    return value(text, f"{name}_sum"), value(text, f"{name}_count")


def random_request(rng: random.Random, i: int) -> dict[str, Any]:
    """A mix of batch sizes, datatypes, requested outputs and some invalid requests."""
    rows = rng.choice([1, 1, 1, 2, 3, 5, 8, 16, 40])
    features = 4
    kind = rng.random()
    if kind < 0.03:
        features = 3  # rejected by validation before batching
    x = np.array([X[rng.randrange(len(X))][:features] for _ in range(rows)])
    x = x + np.array([[rng.uniform(-0.5, 0.5) for _ in range(features)] for _ in range(rows)])
    data: list[Any] = x.tolist()
    if 0.03 <= kind < 0.06:
        data[rng.randrange(rows)][0] = float("nan")  # rejected by sklearn inside the batch
    datatype = rng.choice(["FP64", "FP64", "FP32", "INT64"])
    if datatype == "INT64":
        data = [[round(v) if v == v else 0 for v in row] for row in data]
    body: dict[str, Any] = {
        "id": f"r{i}",
        "inputs": [{"name": "x", "datatype": datatype, "shape": [rows, features], "data": data}],
    }
    outputs = rng.choice([None, ["predict"], ["predict_proba"], ["predict_proba", "predict"]])
    if outputs:
        body["outputs"] = [{"name": n} for n in outputs]
    return body


def assert_same_up_to_blas(want: tuple[int, Any], have: tuple[int, Any], where: str) -> None:
    """Equal, except FP64 outputs of matrix products may differ in the last bits.

    BLAS picks kernels (summation order, FMA) by matrix shape, so a row's logistic
    regression probabilities can change in the last bits with the batch it is computed in.
    """
    assert have[0] == want[0], where
    if want[0] != 200:
        assert have == want, where
        return
    strip = [{k: v for k, v in o.items() if k != "data"} for o in want[1]["outputs"]]
    assert [{k: v for k, v in o.items() if k != "data"} for o in have[1]["outputs"]] == strip
    assert {k: v for k, v in have[1].items() if k != "outputs"} == {
        k: v for k, v in want[1].items() if k != "outputs"
    }
    for w, h in zip(want[1]["outputs"], have[1]["outputs"], strict=True):
        if w["datatype"] == "FP64":
            np.testing.assert_allclose(h["data"], w["data"], rtol=1e-12, atol=0, err_msg=where)
        else:
            assert h["data"] == w["data"], where


async def _send_all(client: TestClient, bodies: list[bytes], path: str) -> list[tuple[int, Any]]:
    limit = asyncio.Semaphore(128)

    async def one(body: bytes) -> tuple[int, Any]:
        async with limit:
            resp = await client.post(path, data=body)
            return resp.status, await resp.json()

    return await asyncio.gather(*(one(b) for b in bodies))


@pytest.mark.parametrize("version", ["v1", "v3"])
async def test_thousand_random_requests_match_unbatched(repo: Path, version: str) -> None:
    rng = random.Random(f"batching-{version}")
    bodies = [json.dumps(random_request(rng, i)).encode() for i in range(1000)]
    path = f"/v2/models/iris/versions/{version}/infer"
    model = load_model(repo, "iris", version)
    unbatched = await _client(model)
    batched = await _client(model, batching=Batching(max_batch_size=64, max_delay_ms=2))
    try:
        expected = [
            (r.status, await r.json()) for r in [await unbatched.post(path, data=b) for b in bodies]
        ]
        got = await _send_all(batched, bodies, path)
        text = await (await batched.get("/metrics")).text()
    finally:
        await batched.close()
        await unbatched.close()
    statuses = [status for status, _ in expected]
    assert 900 < statuses.count(200) < 1000 and set(statuses) == {200, 400}
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        if version == "v3":  # a tree: per-row arithmetic, bit-identical in any batch
            assert have == want, f"request {i}: {bodies[i][:200]!r}"
        else:
            assert_same_up_to_blas(want, have, f"request {i}: {bodies[i][:200]!r}")
    merged_requests, calls = histogram(text, "infergate_model_batch_requests")
    rows, _ = histogram(text, "infergate_model_batch_size")
    assert calls < 700, "requests were not merged"
    assert merged_requests >= statuses.count(200)
    assert rows / calls > 3


class _RecordingModel:
    """Doubles its input; records the batch sizes it was called with. Calls wait for `gate`."""

    platform = "python"

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.entered = threading.Event()
        self.gate = threading.Event()

    def metadata(self) -> dict[str, list[dict[str, Any]]]:
        return {"inputs": [], "outputs": []}

    def validate(self, inputs: dict[str, np.ndarray], requested: Any) -> None:
        return None

    def predict(self, inputs: dict[str, np.ndarray], requested: Any) -> dict[str, np.ndarray]:
        self.entered.set()
        self.gate.wait(30)
        x = inputs["x"]
        self.calls.append(len(x))
        if np.any(x < 0):
            raise ValueError("negative input")
        return {"y": x * 2}


def _body(values: list[int]) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "INT64", "shape": [len(values)], "data": values}]}


@pytest.fixture
async def recording() -> AsyncIterator[tuple[TestClient, _RecordingModel]]:
    model = _RecordingModel()
    settings_batching = Batching(max_batch_size=8, max_delay_ms=0)
    client = await _client(LoadedModel("rec", "1", model), batching=settings_batching)
    yield client, model
    model.gate.set()
    await client.close()


async def test_requests_queue_while_model_busy_and_merge(
    recording: tuple[TestClient, _RecordingModel],
) -> None:
    client, model = recording

    async def metrics() -> str:
        return await (await client.get("/metrics")).text()

    async def entered() -> bool:
        return model.entered.is_set()

    async def all_queued() -> bool:
        return value(await metrics(), "infergate_model_queue_depth") == 7

    first = asyncio.create_task(client.post("/v2/models/rec/infer", json=_body([1])))
    await poll(entered, "the first request is inside predict()")
    rest = [
        asyncio.create_task(client.post("/v2/models/rec/infer", json=_body([i, i + 1])))
        for i in range(10, 16)
    ]
    bad = asyncio.create_task(client.post("/v2/models/rec/infer", json=_body([-1])))
    await poll(all_queued, "the queue depth rises to 7, behind the blocked first call")
    model.gate.set()
    responses = [await t for t in [first, *rest, bad]]
    bodies = [await r.json() for r in responses]
    assert [r.status for r in responses] == [200] * 7 + [400]
    assert bodies[0]["outputs"][0]["data"] == [2]
    for i, body in zip(range(10, 16), bodies[1:7], strict=True):
        assert body["outputs"][0]["data"] == [2 * i, 2 * i + 2]
    assert "negative" in bodies[7]["error"]
    # first alone; then 8 rows (4 requests); then 2 + 2 + 1 rows merged with the bad one,
    # which fails the merged call: each of those three is rerun alone
    assert model.calls == [1, 8, 5, 2, 2, 1]
    text = await metrics()
    assert histogram(text, "infergate_model_batch_requests") == (1 + 4 + 3, 3)
    assert histogram(text, "infergate_model_batch_size") == (1 + 8 + 5, 3)
    assert value(text, "infergate_model_queue_depth") == 0
