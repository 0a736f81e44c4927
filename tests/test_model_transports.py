"""REST and gRPC against one real server process: both transports give the same answers.

Every case of `CASES` runs through the REST API (urllib) and the KServe V2 gRPC API
(Triton's gRPC client) and must give the same outcome. The server runs in a subprocess:
its stubs and tritonclient's both define the `inference` protobuf package, which one
process's descriptor pool cannot hold twice.
"""

from __future__ import annotations

import json
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import joblib
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from gateway.processes import Child, free_port, model_server_child  # noqa: E402
from tests.iris_numpy import IRIS_X as X  # noqa: E402

# the gRPC status of each HTTP error status (docs/model-server.md)
GRPC_CODE = {
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    413: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
}
ORCA = re.compile(
    r"TEXT cpu_utilization=[0-9.]+, rps_fractional=[0-9.]+, "
    r"named_metrics\.queue_depth=\d+, named_metrics\.inflight=\d+"
)


class Server(NamedTuple):
    child: Child
    http: str  # base URL
    grpc: str  # host:port


@contextmanager
def _serve(repo: Path, log: Path, *serve_options: str) -> Iterator[Server]:
    """`infergate serve` of every iris version with REST and gRPC ports."""
    http_port, grpc_port = free_port(), free_port()
    child = model_server_child(
        str(repo), "iris", None, ("127.0.0.1", http_port), str(log), grpc_port, serve_options
    ).start()
    server = Server(child, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")
    try:
        deadline = time.monotonic() + 30
        while not _ready(server):
            assert child.running, log.read_text()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        yield server
    finally:
        child.stop(timeout=10, sig=signal.SIGKILL)


def _ready(server: Server) -> bool:
    try:
        with grpcclient.InferenceServerClient(server.grpc) as client:
            return client.is_server_ready() and _rest(server, "GET", "/v2/health/ready")[0] == 200
    except (InferenceServerException, OSError):
        return False


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with _serve(repo, log, "--max-batch-size", "16") as running:
        yield running


@pytest.fixture
def client(server: Server) -> Iterator[Any]:
    client = grpcclient.InferenceServerClient(server.grpc)
    yield client
    client.close()


# --- one call, two transports ----------------------------------------------------------


def _rest(server: Server, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.http + path, data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _rest_outcome(status: int, body: Any, ok: Callable[[Any], Any]) -> Any:
    """What a REST answer means: ok(body), or the gRPC code of its error and the message."""
    if "error" in body:
        return GRPC_CODE[status], body["error"]
    return ok(body)


def _grpc_outcome(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except InferenceServerException as exc:
        return exc.status().removeprefix("StatusCode."), exc.message()


def _tensor_body(x: np.ndarray) -> dict[str, Any]:
    tensor = {"name": "input-0", "datatype": "FP64", "shape": list(x.shape), "data": x.tolist()}
    return {"inputs": [tensor], "outputs": [{"name": "predict"}]}


def _model_path(name: str, version: str) -> str:
    return f"/v2/models/{name}" + (f"/versions/{version}" if version else "")


class Case(NamedTuple):
    rest: Callable[[Server], Any]
    grpc: Callable[[Any], Any]
    expected: Any


def model_ready(name: str, version: str, expected: Any) -> Case:
    def rest(server: Server) -> Any:
        status, body = _rest(server, "GET", _model_path(name, version) + "/ready")
        return _rest_outcome(status, body, lambda b: b["ready"])

    return Case(rest, lambda c: _grpc_outcome(lambda: c.is_model_ready(name, version)), expected)


def model_metadata(name: str, version: str, expected: Any) -> Case:
    def rest(server: Server) -> Any:
        return _rest_outcome(*_rest(server, "GET", _model_path(name, version)), lambda b: b)

    def grpc_(client: Any) -> Any:
        meta = _grpc_outcome(lambda: client.get_model_metadata(name, version, as_json=True))
        if isinstance(meta, dict):  # not an error
            for tensor in meta["inputs"] + meta["outputs"]:
                tensor["shape"] = [int(d) for d in tensor["shape"]]  # int64: a JSON string
        return meta

    return Case(rest, grpc_, expected)


def infer(name: str, version: str, x: np.ndarray, expected: Any) -> Case:
    def rest(server: Server) -> Any:
        status, body = _rest(server, "POST", _model_path(name, version) + "/infer", _tensor_body(x))
        return _rest_outcome(status, body, lambda b: (b["model_version"], b["outputs"][0]["data"]))

    def grpc_(client: Any) -> Any:
        tensor = grpcclient.InferInput("input-0", list(x.shape), "FP64")
        tensor.set_data_from_numpy(x)
        outputs = [grpcclient.InferRequestedOutput("predict")]

        def call() -> Any:
            result = client.infer(name, [tensor], model_version=version, outputs=outputs)
            return result.get_response().model_version, result.as_numpy("predict").tolist()

        return _grpc_outcome(call)

    return Case(rest, grpc_, expected)


IRIS_V1 = {
    "name": "iris",
    "versions": ["v1"],
    "platform": "sklearn",
    "inputs": [{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}],
    "outputs": [
        {"name": "predict", "datatype": "INT64", "shape": [-1]},
        {"name": "predict_proba", "datatype": "FP64", "shape": [-1, 3]},
    ],
}
CASES = {
    "server ready": Case(
        lambda s: _rest(s, "GET", "/v2/health/ready")[1]["ready"],
        lambda c: c.is_server_ready(),
        True,
    ),
    "server live": Case(
        lambda s: _rest(s, "GET", "/v2/health/live")[1]["live"], lambda c: c.is_server_live(), True
    ),
    "server metadata": Case(
        lambda s: _rest(s, "GET", "/v2")[1],
        lambda c: c.get_server_metadata(as_json=True),
        {
            "name": "infergate",
            "version": package_version("infergate"),
            "extensions": ["model_repository", "binary_tensor_data", "parameters"],
        },
    ),
    "model ready": model_ready("iris", "v2", True),
    "newest model ready": model_ready("iris", "", True),
    "unknown model ready": model_ready("rose", "", ("NOT_FOUND", "model 'rose' not found")),
    "unknown version ready": model_ready(
        "iris", "v9", ("NOT_FOUND", "version 'v9' of model 'iris' not found")
    ),
    "model metadata": model_metadata("iris", "v1", IRIS_V1),
    "unknown model metadata": model_metadata("rose", "", ("NOT_FOUND", "model 'rose' not found")),
    "infer": infer("iris", "v1", X[[0, 60, 120]], ("v1", [0, 1, 2])),
    "infer newest": infer("iris", "", X[[0]], ("v3", [0])),
    "infer unknown model": infer("rose", "", X[[0]], ("NOT_FOUND", "model 'rose' not found")),
    "infer unknown version": infer(
        "iris", "v9", X[[0]], ("NOT_FOUND", "version 'v9' of model 'iris' not found")
    ),
    "infer bad input": infer(
        "iris",
        "v1",
        X[:2, :3],
        ("INVALID_ARGUMENT", "input 'input-0' has 3 features, model expects 4"),
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_transports_agree(server: Server, client: Any, case: Case) -> None:
    assert case.rest(server) == case.grpc(client) == case.expected


def _infer(client: Any, x: np.ndarray, version: str = "", datatype: str = "FP64") -> Any:
    tensor = grpcclient.InferInput("input-0", list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("predict", "predict_proba")]
    return client.infer("iris", [tensor], model_version=version, outputs=outputs)


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_grpc_infer_matches_sklearn(client: Any, repo: Path, version: str) -> None:
    estimator = joblib.load(repo / "iris" / version / "model.joblib")
    x = X[::7]
    result = _infer(client, x, version)
    assert result.get_response().model_version == version
    assert result.as_numpy("predict").tolist() == estimator.predict(x).tolist()
    np.testing.assert_allclose(result.as_numpy("predict_proba"), estimator.predict_proba(x))
    x32 = x.astype(np.float32)
    result = _infer(client, x32, version, "FP32")
    assert result.as_numpy("predict").tolist() == estimator.predict(x32.astype(float)).tolist()


def _v3_metrics(server: Server) -> dict[str, float]:
    """The iris/v3 samples of the server's /metrics, as `name` or `name{label=value}`."""
    text = urllib.request.urlopen(server.http + "/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            if labels.pop("model", None) == "iris" and labels.pop("version", None) == "v3":
                samples[sample.name + "".join(f"{{{k}={v}}}" for k, v in labels.items())] = (
                    sample.value
                )
    return samples


def test_concurrent_batched_grpc_infer(client: Any, server: Server, repo: Path) -> None:
    estimator = joblib.load(repo / "iris" / "v3" / "model.joblib")
    rows = [X[i : i + 1 + i % 5] for i in range(0, 150, 3)]
    before = _v3_metrics(server)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda x: _infer(client, x, "v3"), rows))
    for x, result in zip(rows, results, strict=True):
        assert result.as_numpy("predict").tolist() == estimator.predict(x).tolist()
    after = _v3_metrics(server)

    def added(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert added("infergate_model_requests_total{outcome=ok}") == len(rows)
    # every request went through the batcher (max_batch_size=16 reached the server): the
    # predict calls hold every request and row once, and none more than 16 rows
    assert added("infergate_model_batch_requests_sum") == len(rows)
    assert added("infergate_model_batch_size_sum") == sum(len(x) for x in rows)
    calls = added("infergate_model_batch_size_count")
    assert added("infergate_model_batch_size_bucket{le=16.0}") == calls
    assert "infergate_model_queue_depth" in after  # only batching models have one


# --- draining and the load report --------------------------------------------------------


def test_transports_agree_while_draining(repo: Path, tmp_path: Path) -> None:
    """After SIGTERM both transports report not ready, and both still answer requests."""
    with _serve(repo, tmp_path / "server.log", "--drain-grace", "60") as server:
        draining = {
            "server ready": Case(CASES["server ready"].rest, CASES["server ready"].grpc, False),
            "model ready": model_ready("iris", "v2", False),
            "unknown model ready": CASES["unknown model ready"],
            "infer": CASES["infer"],
        }
        server.child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        with grpcclient.InferenceServerClient(server.grpc) as client:
            while client.is_server_ready():  # the signal is handled on the server's loop
                assert time.monotonic() < deadline, "server did not start draining"
                time.sleep(0.02)
            for name, case in draining.items():
                assert case.rest(server) == case.grpc(client) == case.expected, name
        assert _rest(server, "GET", "/v2/health/ready") == (503, {"ready": False})


def _grpc_infer_with_trailers(server: Server, x: np.ndarray) -> tuple[grpc.StatusCode, Any]:
    """ModelInfer with Triton's messages over a plain channel: (code, trailing metadata)."""
    request = service_pb2.ModelInferRequest(model_name="iris", model_version="v1")
    tensor = request.inputs.add(name="input-0", datatype="FP64", shape=list(x.shape))
    tensor.contents.fp64_contents.extend(x.ravel().tolist())
    with grpc.insecure_channel(server.grpc) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        try:
            _, rpc = call.with_call(request, timeout=10)
        except grpc.RpcError as exc:
            rpc = exc
        return rpc.code(), dict(rpc.trailing_metadata())


def test_grpc_response_carries_load_report(server: Server) -> None:
    """The ORCA report goes in gRPC trailing metadata, under REST's header name, also with
    an error, as REST sends it on every inference answer."""
    body = json.dumps(_tensor_body(X[:2])).encode()
    rest = urllib.request.urlopen(server.http + "/v2/models/iris/versions/v1/infer", body)
    assert ORCA.fullmatch(rest.headers["endpoint-load-metrics"])
    for x, code in ((X[:2], grpc.StatusCode.OK), (X[:2, :3], grpc.StatusCode.INVALID_ARGUMENT)):
        got, trailers = _grpc_infer_with_trailers(server, x)
        assert got == code
        assert ORCA.fullmatch(trailers["endpoint-load-metrics"]), trailers
