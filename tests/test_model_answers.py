"""Answer recording for the shadow phase: the bounded log, `GET /v2/answers`, and, through
the real Envoy, that the primary and its mirror see the same `x-request-id`."""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from aiohttp.test_utils import TestClient

from model_servers.answers import AnswerLog, is_shadow
from model_servers.repository import load_model
from tests.app_client import app_client
from tests.stack import Stack, count_versions

BODY = {
    "inputs": [{"name": "x", "datatype": "FP64", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]
}


def ids(page: dict) -> list[str]:
    return [a["request_id"] for a in page["answers"]]


# --- the log ---------------------------------------------------------------------------


def test_log_keeps_the_newest_n_and_pages_by_cursor() -> None:
    log = AnswerLog(3)
    for i in range(5):
        log.add(f"r{i}", "iris", "v1", False, {"y": np.array([i])})
    page = log.since(0, 2)
    assert ids(page) == ["r2", "r3"] and page["next"] == 4 and page["dropped"] == 2
    page = log.since(page["next"], 10)
    assert ids(page) == ["r4"] and page["next"] == 5 and page["dropped"] == 0
    assert log.since(5, 10) == {"epoch": log.epoch, "answers": [], "next": 5, "dropped": 0}


def test_log_drops_the_oldest_over_the_byte_cap() -> None:
    log = AnswerLog(100, max_bytes=3 * (800 + 2))  # three answers of 100 FP64 and a 2-char id
    for i in range(5):
        log.add(f"r{i}", "iris", "v1", False, {"y": np.zeros(100)})
    assert ids(log.since(0, 100)) == ["r2", "r3", "r4"]


def test_log_copies_outputs_and_encodes_them_as_oip_tensors() -> None:
    log = AnswerLog(10)
    batch = np.array([[1.5, 2.0], [3.0, 4.0]])
    log.add("a", "iris", "v2", True, {"p": batch[1:], "s": np.array([b"\xff", b"ok"], object)})
    batch[1, 0] = -1  # the batcher's array may be reused: the record must not change
    (answer,) = log.lookup({"a", "unknown"})["answers"]
    assert answer["model"] == "iris" and answer["version"] == "v2" and answer["shadow"] is True
    assert answer["outputs"] == [
        {"name": "p", "datatype": "FP64", "shape": [1, 2], "data": [3.0, 4.0]},
        {
            "name": "s",
            "datatype": "BYTES",
            "shape": [2],
            "data": ["/w==", "b2s="],
            "parameters": {"encoding": "base64"},
        },
    ]


@pytest.mark.parametrize(
    "authority, shadow",
    [
        ("127.0.0.1-shadow:8000", True),
        ("iris-shadow", True),
        ("127.0.0.1:8000", False),
        ("shadow.example:80", False),
        (None, False),
    ],
)
def test_is_shadow(authority: str | None, shadow: bool) -> None:
    assert is_shadow(authority) is shadow


# --- the REST API ----------------------------------------------------------------------


@pytest.fixture
async def recording(repo: Path) -> AsyncIterator[TestClient]:
    client = await app_client(load_model(repo, "iris", "v1"), answers=AnswerLog(100))
    yield client
    await client.close()


async def test_answers_are_recorded_by_request_id(recording: TestClient) -> None:
    headers = {"x-request-id": "req-1", "Host": "127.0.0.1-shadow:9"}
    resp = await recording.post("/v2/models/iris/infer", json=BODY, headers=headers)
    answer = await resp.json()
    await recording.post("/v2/models/iris/infer", json=BODY, headers={"x-request-id": "req-2"})
    resp = await recording.post("/v2/models/iris/infer", json=BODY)  # no id: nothing to pair
    assert resp.status == 200
    bad = {"inputs": [{"name": "x", "datatype": "FP64", "shape": [1, 3], "data": [1, 2, 3]}]}
    resp = await recording.post("/v2/models/iris/infer", json=bad, headers={"x-request-id": "r3"})
    assert resp.status == 400  # failed requests are not answers

    page = await (await recording.get("/v2/answers?since=0&limit=10")).json()
    assert ids(page) == ["req-1", "req-2"] and page["next"] == 2
    first, second = page["answers"]
    assert first["outputs"] == answer["outputs"]
    assert (first["model"], first["version"], first["shadow"]) == ("iris", "v1", True)
    assert second["shadow"] is False
    assert ids(await (await recording.get("/v2/answers?since=2")).json()) == []
    assert ids(await (await recording.get("/v2/answers?ids=req-2,x")).json()) == ["req-2"]


@pytest.mark.parametrize("query", ["since=-1", "since=a", "limit=0", "limit=10001"])
async def test_bad_answer_queries_get_400(recording: TestClient, query: str) -> None:
    resp = await recording.get(f"/v2/answers?{query}")
    assert resp.status == 400 and "limit" in (await resp.json())["error"]


async def test_answers_are_off_by_default(repo: Path) -> None:
    client = await app_client(load_model(repo, "iris", "v1"))
    try:
        await client.post("/v2/models/iris/infer", json=BODY, headers={"x-request-id": "a"})
        resp = await client.get("/v2/answers")
        assert resp.status == 404
        assert "--record-answers" in (await resp.json())["error"]
    finally:
        await client.close()


# --- through the real Envoy ------------------------------------------------------------


def answers(port: int) -> list[dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/answers?limit=10000") as resp:
        return json.load(resp)["answers"]


def by_id(records: list[dict]) -> list[dict]:
    return sorted(records, key=lambda a: a["request_id"])


def grpc_infer(client, grpcclient, n: int) -> None:
    x = np.array([[5.1, 3.5, 1.4, 0.2]])
    for _ in range(n):
        tensor = grpcclient.InferInput("input-0", list(x.shape), "FP64")
        tensor.set_data_from_numpy(x)
        assert client.infer("iris", [tensor]).get_response().model_version == "v1"


def test_envoy_sends_the_same_request_id_to_the_primary_and_the_mirror(
    tmp_path: Path, model_repository: Path, envoy_binary: str
) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    stack = Stack(
        tmp_path,
        model_repository,
        replicas={"v1": 1, "v3": 1},
        grpc=True,
        model_options=("--record-answers", "1000"),
    )
    try:
        stack.start_all({"v1": 100})
        stack.apply({"v1": 100}, shadow=("v3", 100))
        n = 30
        assert count_versions(stack.listen, n) == {"v1": n}
        with grpcclient.InferenceServerClient(f"127.0.0.1:{stack.grpc[0]}") as client:
            grpc_infer(client, grpcclient, n)
        (primary_port,), (shadow_port,) = stack.model_ports["v1"], stack.model_ports["v3"]
        deadline = time.monotonic() + 10  # mirrored requests finish after the client's answer
        while len(answers(shadow_port)) < 2 * n and time.monotonic() < deadline:
            time.sleep(0.1)
        primary, shadow = answers(primary_port), answers(shadow_port)
        assert len(primary) == len(shadow) == 2 * n
        assert {a["request_id"] for a in primary} == {a["request_id"] for a in shadow}
        assert len({a["request_id"] for a in primary}) == 2 * n  # one id per request
        # over REST the Host tells the mirror; over gRPC it is unknown (null)
        pairs = Counter(
            (p["version"], p["shadow"], s["version"], s["shadow"])
            for p, s in zip(by_id(primary), by_id(shadow), strict=True)
        )
        assert pairs == {("v1", False, "v3", True): n, ("v1", None, "v3", None): n}
    finally:
        stack.stop()
