"""The KServe V2 gRPC API, exercised with Triton's gRPC client against a real server process.

The server runs in a subprocess: its stubs and tritonclient's both define the `inference`
protobuf package, which one process's descriptor pool cannot hold twice.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import joblib
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_iris

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
X, _ = load_iris(return_X_y=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int, int]]:
    repo = tmp_path_factory.mktemp("models")
    script = ROOT / "examples" / "train_iris.py"
    subprocess.run([sys.executable, str(script), str(repo)], check=True, capture_output=True)
    http_port, grpc_port = _free_port(), _free_port()
    code = (
        "from model_servers.server import serve; "
        f"serve({str(repo)!r}, 'iris', None, '127.0.0.1', {http_port}, "
        f"grpc_port={grpc_port}, max_batch_size=16)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
                if client.is_server_ready():
                    break
            except InferenceServerException:
                pass
            assert time.monotonic() < deadline, "gRPC server did not start"
            time.sleep(0.1)
        yield repo, http_port, grpc_port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def client(server: tuple[Path, int, int]) -> Iterator[object]:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server[2]}")
    yield client
    client.close()


def _infer(client: object, x: np.ndarray, version: str = "", datatype: str = "FP64") -> object:
    tensor = grpcclient.InferInput("input-0", list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("predict", "predict_proba")]
    return client.infer("iris", [tensor], model_version=version, outputs=outputs)


def test_health_and_metadata(client: object) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("iris", "v2")
    with pytest.raises(InferenceServerException) as info:  # as REST's 404
        client.is_model_ready("rose")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "infergate" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("iris", "v1", as_json=True)
    assert model["versions"] == ["v1"] and model["platform"] == "sklearn"
    assert model["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": ["-1", "4"]}]


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_infer_matches_sklearn(client: object, server: tuple[Path, int, int], version: str) -> None:
    estimator = joblib.load(server[0] / "iris" / version / "model.joblib")
    x = X[::7]
    result = _infer(client, x, version)
    assert result.get_response().model_version == version
    assert result.as_numpy("predict").tolist() == estimator.predict(x).tolist()
    np.testing.assert_allclose(result.as_numpy("predict_proba"), estimator.predict_proba(x))
    x32 = x.astype(np.float32)
    result = _infer(client, x32, version, "FP32")
    assert result.as_numpy("predict").tolist() == estimator.predict(x32.astype(float)).tolist()


def _v3_metrics(http_port: int) -> dict[str, float]:
    """The iris/v3 samples of the server's /metrics, as `name` or `name{label=value}`."""
    url = f"http://127.0.0.1:{http_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            if labels.pop("model", None) == "iris" and labels.pop("version", None) == "v3":
                samples[sample.name + "".join(f"{{{k}={v}}}" for k, v in labels.items())] = (
                    sample.value
                )
    return samples


def test_concurrent_batched_infer(client: object, server: tuple[Path, int, int]) -> None:
    estimator = joblib.load(server[0] / "iris" / "v3" / "model.joblib")
    rows = [X[i : i + 1 + i % 5] for i in range(0, 150, 3)]
    before = _v3_metrics(server[1])
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda x: _infer(client, x, "v3"), rows))
    for x, result in zip(rows, results, strict=True):
        assert result.as_numpy("predict").tolist() == estimator.predict(x).tolist()
    after = _v3_metrics(server[1])

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


def test_errors(client: object) -> None:
    with pytest.raises(InferenceServerException) as info:
        _infer(client, np.zeros((2, 3)))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "features" in str(info.value)
    tensor = grpcclient.InferInput("input-0", [1, 4], "FP64")
    tensor.set_data_from_numpy(np.zeros((1, 4)))
    with pytest.raises(InferenceServerException) as info:
        client.infer("rose", [tensor])
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert client.is_server_live()
