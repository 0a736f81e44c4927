"""Protocol completeness: datatypes, parameters, binary tensor data, Triton's HTTP client,
and random payloads that must never break the server."""

from __future__ import annotations

import asyncio
import http.client
import json
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_servers.protocol import DTYPES
from model_servers.repository import LoadedModel
from model_servers.server import initial_models, make_app


class EchoRuntime:
    """Returns every input as an output of the same name (any datatype, any shape)."""

    platform = "python"

    def metadata(self) -> dict[str, list[dict[str, Any]]]:
        return {"inputs": [], "outputs": []}

    def validate(self, inputs: dict[str, np.ndarray], requested: Any) -> None:
        return None

    def predict(self, inputs: dict[str, np.ndarray], requested: Any) -> dict[str, np.ndarray]:
        return dict(inputs) if not requested else {n: inputs[n] for n in requested}


class ThreadedServer:
    """The app on a real 127.0.0.1 socket, its event loop in a background thread."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        assert self._started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(self.app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = self.runner.addresses[0][1]
        self._started.set()
        self.loop.run_forever()

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ThreadedServer]:
    models = [*initial_models(repo, "iris", None), LoadedModel("echo", "1", EchoRuntime())]
    with ThreadedServer(make_app(models, repository=repo)) as running:
        yield running


def _post(server: ThreadedServer, path: str, payload: Any) -> tuple[int, Any]:
    status, _, body = server.request("POST", path, json.dumps(payload).encode())
    return status, json.loads(body)


# --- endpoints, health and datatypes ---------------------------------------------------------


@pytest.mark.parametrize("prefix", ["/v2/models/iris", "/v2/models/iris/versions/v2"])
def test_every_model_endpoint_with_and_without_version(server: ThreadedServer, prefix: str) -> None:
    status, _, body = server.request("GET", prefix)
    assert status == 200 and json.loads(body)["name"] == "iris"
    status, _, body = server.request("GET", prefix + "/ready")
    assert status == 200 and json.loads(body) == {"name": "iris", "ready": True}
    tensor = {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}
    status, body = _post(server, prefix + "/infer", {"inputs": [tensor]})
    assert status == 200 and body["outputs"][0]["data"] == [0]


def test_health(server: ThreadedServer) -> None:
    assert server.request("GET", "/v2/health/live")[::2] == (200, b'{"live": true}')
    assert server.request("GET", "/v2/health/ready")[::2] == (200, b'{"ready": true}')


SAMPLES: dict[str, list[Any]] = {
    "BOOL": [True, False, True, True],
    "UINT8": [0, 1, 254, 255],
    "UINT16": [0, 1, 65534, 65535],
    "UINT32": [0, 1, 2, 2**32 - 1],
    "UINT64": [0, 1, 2, 2**64 - 1],
    "INT8": [-128, -1, 0, 127],
    "INT16": [-(2**15), -1, 0, 2**15 - 1],
    "INT32": [-(2**31), -1, 0, 2**31 - 1],
    "INT64": [-(2**63), -1, 0, 2**63 - 1],
    "FP16": [0.5, -2.0, 65504.0, 0.0009765625],
    "FP32": [0.5, -2.0, 3.4028234663852886e38, 1.401298464324817e-45],
    "FP64": [0.1, -2.5, 1.7976931348623157e308, 5e-324],
    "BYTES": ["", "a", "héllo", "x" * 300],
}


@pytest.mark.parametrize("datatype", SAMPLES)
def test_json_datatypes_round_trip(server: ThreadedServer, datatype: str) -> None:
    tensor = {"name": "t", "datatype": datatype, "shape": [2, 2], "data": SAMPLES[datatype]}
    payload = {"id": "7", "parameters": {"tag": "x"}, "inputs": [tensor]}
    status, body = _post(server, "/v2/models/echo/infer", payload)
    assert status == 200, body
    assert body["outputs"] == [tensor] and body["id"] == "7"


def _binary(datatype: str, values: list[Any]) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in values)
    return (
        np.array(values, dtype=DTYPES[datatype])
        .astype(DTYPES[datatype].newbyteorder("<"))
        .tobytes()
    )


@pytest.mark.parametrize("datatype", SAMPLES)
@pytest.mark.parametrize("binary_output", [False, True])
def test_binary_datatypes_round_trip(
    server: ThreadedServer, datatype: str, binary_output: bool
) -> None:
    data = _binary(datatype, SAMPLES[datatype])
    tensor = {
        "name": "t",
        "datatype": datatype,
        "shape": [4],
        "parameters": {"binary_data_size": len(data)},
    }
    header = json.dumps(
        {"inputs": [tensor], "parameters": {"binary_data_output": binary_output}}
    ).encode()
    status, headers, body = server.request(
        "POST",
        "/v2/models/echo/versions/1/infer",
        header + data,
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert status == 200, body
    if not binary_output:
        assert "Inference-Header-Content-Length" not in headers
        [out] = json.loads(body)["outputs"]
        assert out == {"name": "t", "datatype": datatype, "shape": [4], "data": SAMPLES[datatype]}
        return
    length = int(headers["Inference-Header-Content-Length"])
    [out] = json.loads(body[:length])["outputs"]
    assert out["parameters"] == {"binary_data_size": len(data)}
    assert out["datatype"] == datatype and out["shape"] == [4]
    assert body[length:] == data


def test_binary_output_per_tensor_and_mixed_inputs(server: ThreadedServer) -> None:
    a = np.array([1.5, 2.5], dtype=np.float32)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "a",
                    "datatype": "FP32",
                    "shape": [2],
                    "parameters": {"binary_data_size": 8},
                },
                {"name": "b", "datatype": "INT32", "shape": [1], "data": [3]},
            ],
            "outputs": [{"name": "a"}, {"name": "b", "parameters": {"binary_data": True}}],
        }
    ).encode()
    status, headers, body = server.request(
        "POST",
        "/v2/models/echo/infer",
        header + a.tobytes(),
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert status == 200, body
    length = int(headers["Inference-Header-Content-Length"])
    outputs = json.loads(body[:length])["outputs"]
    assert outputs[0]["data"] == [1.5, 2.5]
    assert outputs[1]["parameters"] == {"binary_data_size": 4}
    assert body[length:] == np.array([3], dtype="<i4").tobytes()


@pytest.mark.parametrize(
    ("header_length", "tensor_params", "extra", "message"),
    [
        ("x", {"binary_data_size": 8}, b"", "Inference-Header-Content-Length"),
        (None, {"binary_data_size": 16}, b"", "shorter"),
        (None, {"binary_data_size": 4}, b"", "needs 8"),
        (None, {"binary_data_size": 8}, b"zz", "left unused"),
        (None, {"binary_data_size": -1}, b"", "binary_data_size"),
        (None, "nope", b"", "parameters"),
    ],
)
def test_binary_errors(
    server: ThreadedServer,
    header_length: str | None,
    tensor_params: Any,
    extra: bytes,
    message: str,
) -> None:
    tensor = {"name": "a", "datatype": "FP32", "shape": [2], "parameters": tensor_params}
    header = json.dumps({"inputs": [tensor]}).encode()
    body = header + np.zeros(2, dtype=np.float32).tobytes() + extra
    status, _, answer = server.request(
        "POST",
        "/v2/models/echo/infer",
        body,
        {"Inference-Header-Content-Length": header_length or str(len(header))},
    )
    assert status == 400 and message in json.loads(answer)["error"]


# --- Triton's client -------------------------------------------------------------------------


def test_triton_http_client(server: ThreadedServer) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("iris", "v1")
    assert client.get_model_metadata("iris")["name"] == "iris"
    x = np.array([[5.1, 3.5, 1.4, 0.2], [6.2, 3.4, 5.4, 2.3]], dtype=np.float64)
    for binary in (True, False):
        tensor = httpclient.InferInput("input-0", list(x.shape), "FP64")
        tensor.set_data_from_numpy(x, binary_data=binary)
        outputs = [
            httpclient.InferRequestedOutput("predict", binary_data=binary),
            httpclient.InferRequestedOutput("predict_proba", binary_data=True),
        ]
        result = client.infer("iris", [tensor], model_version="v1", outputs=outputs)
        assert result.as_numpy("predict").tolist() == [0, 2]
        assert result.as_numpy("predict_proba").shape == (2, 3)
    words = np.array([b"a", b"\xff\x00binary"], dtype=object)
    tensor = httpclient.InferInput("w", [2], "BYTES")
    tensor.set_data_from_numpy(words, binary_data=True)
    result = client.infer("echo", [tensor], outputs=[httpclient.InferRequestedOutput("w")])
    assert result.as_numpy("w").tolist() == words.tolist()
    tensor.set_data_from_numpy(words, binary_data=True)
    with pytest.raises(Exception, match="not UTF-8"):  # JSON cannot carry these bytes
        client.infer("echo", [tensor], outputs=[httpclient.InferRequestedOutput("w", False)])
    index = client.get_model_repository_index()
    assert {"name": "iris", "version": "v3", "state": "READY", "reason": ""} in index
    client.unload_model("iris")
    assert not client.is_model_ready("iris", "v1")
    client.load_model("iris")
    assert client.is_model_ready("iris", "v1")
    client.close()


# --- random payloads -------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)
tensors = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["input-0", "x", "t", ""]) | json_values,
        "datatype": st.sampled_from([*SAMPLES, "FP8"]) | json_values,
        "shape": st.lists(st.integers(-2, 5), max_size=3) | json_values,
    },
    optional={
        "data": st.lists(
            st.integers() | st.floats() | st.booleans() | st.text(max_size=3), max_size=12
        )
        | json_values,
        "parameters": st.fixed_dictionaries({"binary_data_size": st.integers(-1, 20)})
        | json_values,
    },
)
payloads = json_values | st.fixed_dictionaries(
    {"inputs": st.lists(tensors, max_size=3)},
    optional={
        "id": json_values,
        "outputs": st.lists(st.fixed_dictionaries({"name": st.text(max_size=8)}), max_size=3)
        | json_values,
        "parameters": json_values,
    },
)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    payload=payloads,
    path=st.sampled_from(
        ["/v2/models/iris/infer", "/v2/models/iris/versions/v2/infer", "/v2/models/echo/infer"]
    ),
    trailer=st.binary(max_size=24),
    header_delta=st.none() | st.integers(-3, 3),
)
def test_random_payloads_never_break_the_server(
    server: ThreadedServer, payload: Any, path: str, trailer: bytes, header_delta: int | None
) -> None:
    body = json.dumps(payload).encode()
    headers = {}
    if header_delta is not None:
        headers["Inference-Header-Content-Length"] = str(max(0, len(body) + header_delta))
        body += trailer
    status, _, answer = server.request("POST", path, body, headers)
    assert 200 <= status < 500, answer
    assert server.request("GET", "/v2/health/live")[0] == 200
