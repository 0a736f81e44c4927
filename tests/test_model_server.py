"""Tests for the Open Inference Protocol model server (model_servers/)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import joblib
import numpy as np
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.processes import free_port
from model_servers.protocol import ProtocolError, decode_request, encode_response
from model_servers.repository import LoadedModel, ModelNotFoundError, load_model
from model_servers.runtimes import SklearnRuntime
from tests.app_client import app_client as _client
from tests.app_client import poll
from tests.iris_numpy import IRIS_X as X

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = X[[0, 60, 120, 149]]


@pytest.fixture
async def client(repo: Path) -> AsyncIterator[TestClient]:
    client = await _client(load_model(repo, "iris", "v1"))
    yield client
    await client.close()


def infer_body(x: np.ndarray, datatype: str = "FP64", **extra: Any) -> dict[str, Any]:
    tensor = {"name": "input-0", "datatype": datatype, "shape": list(x.shape), "data": x.tolist()}
    return {"inputs": [tensor], **extra}


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name}{labels}")


# --- health and metadata ---------------------------------------------------------------


async def test_live_and_ready(client: TestClient) -> None:
    resp = await client.get("/v2/health/live")
    assert resp.status == 200 and await resp.json() == {"live": True}
    resp = await client.get("/v2/health/ready")
    assert resp.status == 200 and await resp.json() == {"ready": True}
    for path in ("/v2/models/iris/ready", "/v2/models/iris/versions/v1/ready"):
        resp = await client.get(path)
        assert resp.status == 200 and (await resp.json())["ready"] is True


async def test_server_metadata(client: TestClient) -> None:
    resp = await client.get("/v2")
    assert resp.status == 200
    body = await resp.json()
    assert body["name"] == "infergate" and body["version"]
    assert {"model_repository", "binary_tensor_data"} <= set(body["extensions"])


# --- inference ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
async def test_infer_matches_sklearn(repo: Path, version: str) -> None:
    estimator = joblib.load(repo / "iris" / version / "model.joblib")
    client = await _client(load_model(repo, "iris", version))
    try:
        resp = await client.post(
            f"/v2/models/iris/versions/{version}/infer", json=infer_body(SAMPLE)
        )
        assert resp.status == 200
        body = await resp.json()
    finally:
        await client.close()
    assert body["model_name"] == "iris" and body["model_version"] == version
    assert "id" not in body
    [out] = body["outputs"]
    assert out == {
        "name": "predict",
        "datatype": "INT64",
        "shape": [4],
        "data": estimator.predict(SAMPLE).tolist(),
    }


async def test_infer_unversioned_path_flat_data_and_id(client: TestClient, repo: Path) -> None:
    estimator = joblib.load(repo / "iris" / "v1" / "model.joblib")
    body = infer_body(SAMPLE, "FP32", id="req-42")
    body["inputs"][0]["data"] = SAMPLE.reshape(-1).tolist()
    resp = await client.post("/v2/models/iris/infer", json=body)
    assert resp.status == 200
    result = await resp.json()
    assert result["id"] == "req-42" and result["model_version"] == "v1"
    expected = estimator.predict(SAMPLE.astype(np.float32).astype(np.float64)).tolist()
    assert result["outputs"][0]["data"] == expected


async def test_infer_integer_input(client: TestClient) -> None:
    resp = await client.post(
        "/v2/models/iris/infer", json=infer_body(np.array([[5, 3, 1, 0]]), "INT32")
    )
    assert resp.status == 200
    assert (await resp.json())["outputs"][0]["data"] == [0]


async def test_output_selection(client: TestClient, repo: Path) -> None:
    estimator = joblib.load(repo / "iris" / "v1" / "model.joblib")
    resp = await client.post(
        "/v2/models/iris/infer",
        json=infer_body(SAMPLE, outputs=[{"name": "predict_proba"}]),
    )
    assert resp.status == 200
    [proba] = (await resp.json())["outputs"]
    assert proba["name"] == "predict_proba" and proba["datatype"] == "FP64"
    assert proba["shape"] == [4, 3]
    np.testing.assert_allclose(np.reshape(proba["data"], (4, 3)), estimator.predict_proba(SAMPLE))

    resp = await client.post(
        "/v2/models/iris/infer",
        json=infer_body(SAMPLE, outputs=[{"name": "predict_proba"}, {"name": "predict"}]),
    )
    assert [o["name"] for o in (await resp.json())["outputs"]] == ["predict_proba", "predict"]


# --- errors ------------------------------------------------------------------------------


def _tensor(**overrides: Any) -> dict[str, Any]:
    tensor = {"name": "input-0", "datatype": "FP64", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}
    return {"inputs": [{**tensor, **overrides}]}


BAD_REQUESTS = {
    "invalid json": b'{"inputs": [',
    "not utf-8": b"\xff\xfe\xfa",
    "not an object": b"[1, 2]",
    "missing inputs": b"{}",
    "empty inputs": b'{"inputs": []}',
    "input not an object": b'{"inputs": [3]}',
    "unknown datatype": _tensor(datatype="FLOAT"),
    "missing datatype": _tensor(datatype=None),
    "missing data": {"inputs": [{"name": "x", "datatype": "FP64", "shape": [1, 4]}]},
    "missing name": _tensor(name=None),
    "bad shape": _tensor(shape=[1, -4]),
    "shape not a list": _tensor(shape="1x4"),
    "element count mismatch": _tensor(shape=[2, 4]),
    "ragged nested data": _tensor(shape=[2, 2], data=[[1.0, 2.0], [3.0]]),
    "strings for FP64": _tensor(data=["a", "b", "c", "d"]),
    "floats for INT64": _tensor(datatype="INT64"),
    "out of range UINT8": _tensor(datatype="UINT8", data=[1, 2, 3, 256]),
    "BYTES input for sklearn": _tensor(datatype="BYTES", data=["a", "b", "c", "d"]),
    "wrong feature count": _tensor(shape=[1, 3], data=[1.0, 2.0, 3.0]),
    "1-D input": _tensor(shape=[4]),
    "two inputs": {"inputs": _tensor()["inputs"] + _tensor(name="other")["inputs"]},
    "duplicate input names": {"inputs": _tensor()["inputs"] * 2},
    "unknown output": {**_tensor(), "outputs": [{"name": "decision_path"}]},
    "outputs not a list": {**_tensor(), "outputs": "predict"},
    "id not a string": {**_tensor(), "id": 7},
    "NaN rejected by sklearn": b'{"inputs": [{"name": "x", "datatype": "FP64", "shape": [1, 4],'
    b' "data": [NaN, 1, 2, 3]}]}',
}


@pytest.mark.parametrize("body", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
async def test_bad_requests_are_400(client: TestClient, body: bytes | dict[str, Any]) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = await client.post("/v2/models/iris/infer", data=data)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert isinstance(error, str) and error


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/v2/models/rose/infer", 404),
        ("POST", "/v2/models/iris/versions/v9/infer", 404),
        ("GET", "/v2/models/rose", 404),
        ("GET", "/v2/models/iris/versions/v9", 404),
        ("GET", "/v2/models/iris/versions/v9/ready", 404),
        ("GET", "/v2/no/such/route", 404),
        ("DELETE", "/v2/models/iris/infer", 405),
    ],
)
async def test_routing_errors_are_json(
    client: TestClient, method: str, path: str, status: int
) -> None:
    resp = await client.request(method, path, json=_tensor())
    assert resp.status == status
    assert resp.content_type == "application/json"
    assert "error" in await resp.json()


async def test_error_message_names_the_input(client: TestClient) -> None:
    resp = await client.post("/v2/models/iris/infer", json=_tensor(name="features", shape=[3, 4]))
    assert "features" in (await resp.json())["error"]


async def test_oversize_body_is_413(repo: Path) -> None:
    client = await _client(load_model(repo, "iris", "v1"), max_body_size=1024)
    try:
        big = infer_body(np.tile(SAMPLE, (100, 1)))
        resp = await client.post("/v2/models/iris/infer", json=big)
        assert resp.status == 413
        assert "error" in await resp.json()

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: limit hit while reading
            payload = json.dumps(big).encode()
            for i in range(0, len(payload), 512):
                yield payload[i : i + 512]

        resp = await client.post("/v2/models/iris/infer", data=chunks())
        assert resp.status == 413
        assert "error" in await resp.json()
        assert (await client.post("/v2/models/iris/infer", json=_tensor())).status == 200
    finally:
        await client.close()


async def test_the_gateways_lower_max_body_header_is_413_before_the_model_is_resolved(
    client: TestClient,
) -> None:
    """`x-infergate-max-body` (the gateway's oversize route) lowers the limit; the body is
    refused even for a version this server does not serve (any version's server gets it)."""
    body = json.dumps(_tensor()).encode()
    lower = {"x-infergate-max-body": str(len(body) - 1), "content-type": "application/json"}
    for path in ("/v2/models/iris/infer", "/v2/models/iris/versions/v9/infer"):
        resp = await client.post(path, data=body, headers=lower)
        assert resp.status == 413, path
        assert f"exceeds {len(body) - 1} bytes" in (await resp.json())["error"]
    at_limit = {**lower, "x-infergate-max-body": str(len(body))}
    resp = await client.post("/v2/models/iris/infer", data=body, headers=at_limit)
    assert resp.status == 200


class _BrokenEstimator:
    n_features_in_ = 4

    def predict(self, x: np.ndarray) -> np.ndarray:
        raise RuntimeError("boom")


async def test_unexpected_prediction_error_is_json_500() -> None:
    client = await _client(LoadedModel("iris", "v1", SklearnRuntime(_BrokenEstimator())))
    try:
        resp = await client.post("/v2/models/iris/infer", json=_tensor())
        assert resp.status == 500
        assert "error" in await resp.json()
        assert (await client.get("/v2/health/live")).status == 200
        text = await (await client.get("/metrics")).text()
        assert metric(text, "infergate_model_requests_total", outcome="server_error") == 1
    finally:
        await client.close()


# --- metrics and concurrency -------------------------------------------------------------


async def test_metrics_count_requests(client: TestClient) -> None:
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.content_type == "text/plain"
    labels = {"model": "iris", "version": "v1"}
    before = await resp.text()
    assert metric(before, "infergate_model_requests_total", outcome="ok", **labels) == 0
    for _ in range(3):
        assert (await client.post("/v2/models/iris/infer", json=_tensor())).status == 200
    assert (await client.post("/v2/models/iris/infer", data=b"nope")).status == 400
    after = await (await client.get("/metrics")).text()
    assert metric(after, "infergate_model_requests_total", outcome="ok", **labels) == 3
    assert metric(after, "infergate_model_requests_total", outcome="client_error", **labels) == 1
    assert metric(after, "infergate_model_requests_total", outcome="server_error", **labels) == 0
    assert metric(after, "infergate_model_request_seconds_count", **labels) == 4
    assert metric(after, "infergate_model_inflight_requests") == 0


class _BlockingEstimator:
    n_features_in_ = 4

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def predict(self, x: np.ndarray) -> np.ndarray:
        self.started.set()
        self.release.wait(10)
        return np.zeros(len(x), dtype=np.int64)


async def test_health_and_metrics_answer_while_model_is_busy() -> None:
    estimator = _BlockingEstimator()
    client = await _client(LoadedModel("slow", "v1", SklearnRuntime(estimator)))
    try:
        pending = asyncio.create_task(client.post("/v2/models/slow/infer", json=_tensor()))
        assert await asyncio.to_thread(estimator.started.wait, 5)
        resp = await asyncio.wait_for(client.get("/v2/health/ready"), 2)
        assert resp.status == 200
        text = await (await asyncio.wait_for(client.get("/metrics"), 2)).text()
        assert metric(text, "infergate_model_inflight_requests") == 1
        estimator.release.set()
        resp = await pending
        assert resp.status == 200 and (await resp.json())["outputs"][0]["data"] == [0]
    finally:
        estimator.release.set()
        await client.close()


class _ThreadRecordingModel:
    """Echoes its input; records the thread that validated each request (part of decoding)."""

    platform = "python"

    def __init__(self) -> None:
        self.threads: list[str] = []

    def metadata(self) -> dict[str, list[dict[str, Any]]]:
        return {"inputs": [], "outputs": []}

    def validate(self, inputs: dict[str, np.ndarray], requested: Any) -> None:
        self.threads.append(threading.current_thread().name)

    def predict(self, inputs: dict[str, np.ndarray], requested: Any) -> dict[str, np.ndarray]:
        return {"y": inputs["x"]}


async def test_large_bodies_are_decoded_off_the_event_loop() -> None:
    """Over 64 KiB (DataPlane's INLINE_BYTES, for both transports) decoding leaves the loop."""
    model = _ThreadRecordingModel()
    client = await _client(LoadedModel("echo", "1", model))
    try:
        for n in (10, 20_000):  # a JSON body of about 100 bytes, and of over 100 KiB
            tensor = {"name": "x", "datatype": "INT64", "shape": [n], "data": list(range(n))}
            resp = await client.post("/v2/models/echo/infer", json={"inputs": [tensor]})
            assert resp.status == 200 and (await resp.json())["outputs"][0]["shape"] == [n]
    finally:
        await client.close()
    loop_thread = threading.current_thread().name
    assert model.threads[0] == loop_thread and model.threads[1].startswith("predict")


# --- protocol and repository units ----------------------------------------------------------


@pytest.mark.parametrize(
    ("datatype", "data", "dtype"),
    [
        ("BOOL", [True, False], np.bool_),
        ("UINT8", [0, 255], np.uint8),
        ("UINT16", [0, 65535], np.uint16),
        ("UINT32", [0, 2**32 - 1], np.uint32),
        ("UINT64", [0, 2**64 - 1], np.uint64),
        ("INT8", [-128, 127], np.int8),
        ("INT16", [-1, 2], np.int16),
        ("INT32", [-1, 2], np.int32),
        ("INT64", [-(2**63), 2**63 - 1], np.int64),
        ("FP16", [0.5, 1], np.float16),
        ("FP32", [0.5, 1], np.float32),
        ("FP64", [0.5, 1], np.float64),
        ("BYTES", ["a", "bc"], object),
    ],
)
def test_decode_datatypes(datatype: str, data: list[Any], dtype: Any) -> None:
    raw = {"name": "t", "datatype": datatype, "shape": [2, 1], "data": data}
    request = decode_request({"inputs": [raw]})
    array = request.inputs["t"]
    assert array.dtype == np.dtype(dtype) and array.shape == (2, 1)
    assert array.reshape(-1).tolist() == data
    assert request.outputs is None and request.id is None


def test_decode_nested_data_is_row_major() -> None:
    raw = {"name": "t", "datatype": "INT32", "shape": [3, 2], "data": [[1, 2, 3], [4, 5, 6]]}
    array = decode_request({"inputs": [raw], "outputs": [{"name": "y"}], "id": "a"}).inputs["t"]
    assert array.tolist() == [[1, 2], [3, 4], [5, 6]]


@pytest.mark.parametrize(
    ("datatype", "data"),
    [
        ("BOOL", [1, 0]),
        ("INT8", [128, 0]),
        ("UINT8", [-1, 0]),
        ("UINT64", [-1, 2**64 - 1]),
        ("UINT64", [0.5, 2**64 - 1]),
        ("FP32", [True, False]),
    ],
)
def test_decode_rejects_mismatched_values(datatype: str, data: list[Any]) -> None:
    raw = {"name": "t", "datatype": datatype, "shape": [2], "data": data}
    with pytest.raises(ProtocolError) as info:
        decode_request({"inputs": [raw]})
    assert info.value.status == 400 and "'t'" in info.value.message


def test_encode_response() -> None:
    outputs = {"a": np.array([[1.5, 2.0]]), "b": np.array(["x", "y"], dtype=object)}
    assert encode_response("m", "v2", outputs, "id-1") == {
        "model_name": "m",
        "model_version": "v2",
        "id": "id-1",
        "outputs": [
            {"name": "a", "datatype": "FP64", "shape": [1, 2], "data": [1.5, 2.0]},
            {"name": "b", "datatype": "BYTES", "shape": [2], "data": ["x", "y"]},
        ],
    }
    assert "id" not in encode_response("m", "v2", {})


def test_load_model_errors(repo: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="rose"):
        load_model(repo, "rose", "v1")
    with pytest.raises(ModelNotFoundError, match="available: v1, v2, v3"):
        load_model(repo, "iris", "v9")
    with pytest.raises(ModelNotFoundError, match="invalid"):
        load_model(repo, "iris", "..")
    model = load_model(repo, "iris", "v3")
    assert (model.name, model.version, model.runtime.platform) == ("iris", "v3", "sklearn")


# --- serve() in a subprocess ---------------------------------------------------------------

GATED_MODULE = """
import time
from pathlib import Path
import numpy as np

class GatedModel:
    n_features_in_ = 4

    def __init__(self, gate):
        self.gate = Path(gate)

    def predict(self, x):
        deadline = time.monotonic() + 30
        while not self.gate.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return np.ones(len(x), dtype=np.int64)
"""


def _start_server(
    repository: Path, model: str, version: str, port: int, pythonpath: Path, **options: Any
) -> subprocess.Popen[bytes]:
    code = (
        "from pathlib import Path; from model_servers.server import serve; "
        f"serve(Path({str(repository)!r}), {model!r}, {version!r}, '127.0.0.1', {port}, "
        f"**{options!r})"
    )
    env = {"PYTHONPATH": f"{pythonpath}:{ROOT}", "PATH": "/usr/bin:/bin"}
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stderr=subprocess.PIPE)


async def _wait_ready(session: aiohttp.ClientSession, base: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        try:
            async with session.get(f"{base}/v2/health/ready") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("server did not become ready")


async def test_serve_drains_in_flight_request_on_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SIGTERM readiness turns 503 while a request is in predict(); it still finishes."""
    (tmp_path / "infergate_gated_model.py").write_text(GATED_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    from infergate_gated_model import GatedModel  # type: ignore[import-not-found]

    gate = tmp_path / "gate"  # predict() returns once this file exists
    (tmp_path / "repo" / "gated" / "v7").mkdir(parents=True)
    joblib.dump(GatedModel(str(gate)), tmp_path / "repo" / "gated" / "v7" / "model.joblib")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _start_server(tmp_path / "repo", "gated", "v7", port, tmp_path, drain_grace=2.0)
    try:
        async with aiohttp.ClientSession() as session:

            async def inflight() -> bool:
                async with session.get(f"{base}/metrics") as resp:
                    return metric(await resp.text(), "infergate_model_inflight_requests") == 1

            async def not_ready() -> bool:
                async with session.get(f"{base}/v2/health/ready") as resp:
                    return resp.status == 503 and await resp.json() == {"ready": False}

            await _wait_ready(session, base, proc)
            pending = asyncio.create_task(
                session.post(f"{base}/v2/models/gated/versions/v7/infer", json=_tensor())
            )
            await poll(inflight, "the request is inside predict()")
            proc.send_signal(signal.SIGTERM)
            await poll(not_ready, "readiness turns 503")
            assert not pending.done()
            gate.touch()
            resp = await pending
            assert resp.status == 200
            body = await resp.json()
            assert body["model_version"] == "v7" and body["outputs"][0]["data"] == [1]
        assert await asyncio.to_thread(proc.wait, 10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_serve_exits_promptly_on_sigint(repo: Path, tmp_path: Path) -> None:
    port = free_port()
    proc = _start_server(repo, "iris", "v2", port, tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{port}"
            await _wait_ready(session, base, proc)
            async with session.post(f"{base}/v2/models/iris/infer", json=_tensor()) as resp:
                assert (await resp.json())["model_version"] == "v2"
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(proc.wait, 10) == 0
        assert time.monotonic() - start < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
