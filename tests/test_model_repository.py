"""Model settings files, the three runtimes and the repository extension API."""

from __future__ import annotations

import shutil
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

from model_servers.onnx_runtime import MISSING_EXTRA
from model_servers.repository import load_model
from model_servers.runtime_base import ModelLoadError
from model_servers.server import initial_models, make_app
from model_servers.settings import Batching, SettingsError, load_settings, parse_settings

PYTHON_MODEL = """
import numpy as np

class Scaler:
    def __init__(self, factor=1):
        self.factor = factor
        self.loaded = False

    def load(self):
        self.loaded = True

    def validate(self, inputs):
        if np.any(inputs["x"] < 0):
            raise ValueError("x must be >= 0")

    def predict(self, inputs):
        assert self.loaded
        x = inputs["x"]
        return {"y": x * self.factor, "total": x.sum(axis=1)}
"""

PYTHON_SETTINGS = """
runtime: python
class: model.py:Scaler
parameters: {factor: 3}
batching: {max_batch_size: 16, max_batch_delay_ms: 1}
inputs: [{name: x, datatype: INT32, shape: [-1, 2]}]
outputs: [{name: y, datatype: INT32, shape: [-1, 2]}, {name: total, datatype: INT64, shape: [-1]}]
"""


def _onnx_model(path: Path) -> np.ndarray:
    """A linear ONNX graph y = x @ w over FP32 [N, 4]; return w."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return w


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, sklearn_repository: Path) -> Path:
    """The session's iris models and a Python, an ONNX and a broken model, in a copy."""
    out = tmp_path_factory.mktemp("models")
    shutil.copytree(sklearn_repository, out, dirs_exist_ok=True)
    scaler = out / "scaler" / "1"
    scaler.mkdir(parents=True)
    (scaler / "model.py").write_text(PYTHON_MODEL)
    (scaler / "model-settings.yaml").write_text(PYTHON_SETTINGS)
    linear = out / "linear" / "1"
    linear.mkdir(parents=True)
    (linear / "model-settings.yaml").write_text("runtime: onnx\n")
    _onnx_model(linear / "model.onnx")
    broken = out / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model-settings.yaml").write_text("runtime: sklearn\nfile: missing.joblib\n")
    return out


@pytest.fixture
async def client(repo: Path) -> AsyncIterator[TestClient]:
    client = TestClient(
        TestServer(make_app(initial_models(repo, "iris", "v1"), repository=repo), host="127.0.0.1")
    )
    await client.start_server()
    yield client
    await client.close()


def _tensor(name: str, datatype: str, data: list[Any]) -> dict[str, Any]:
    shape = list(np.asarray(data).shape)
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}


# --- settings ------------------------------------------------------------------------------


def test_settings_defaults_and_parsing(repo: Path) -> None:
    assert load_settings(repo / "iris" / "v1").runtime == "sklearn"
    settings = load_settings(repo / "scaler" / "1")
    assert (settings.runtime, settings.file, settings.class_name) == (
        "python",
        "model.py",
        "model.py:Scaler",
    )
    assert settings.batching == Batching(16, 1.0) and settings.parameters == {"factor": 3}
    assert [s.name for s in settings.outputs] == ["y", "total"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"runtime": "tensorflow"}, "runtime must be one of"),
        ({"colour": 1}, "unknown keys"),
        ({"runtime": "python"}, "needs 'class"),
        ({"batching": {"max_batch_size": 0}}, "max_batch_size"),
        ({"batching": {"max_batch_delay_ms": -1}}, "max_batch_delay_ms"),
        ({"inputs": [{"name": "x", "datatype": "FP128", "shape": [1]}]}, "inputs\\[0\\]"),
    ],
)
def test_settings_errors(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        parse_settings(raw)


def test_broken_model_and_missing_onnx_extra(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelLoadError, match="missing.joblib"):
        load_model(repo, "broken", "1")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ModelLoadError) as info:
        load_model(repo, "linear", "1")
    assert str(info.value) == MISSING_EXTRA and "'onnx' extra" in MISSING_EXTRA


# --- runtimes through the server ----------------------------------------------------------


async def test_python_runtime(repo: Path) -> None:
    client = TestClient(
        TestServer(make_app(initial_models(repo, "scaler", None)), host="127.0.0.1")
    )
    await client.start_server()
    try:
        meta = await (await client.get("/v2/models/scaler")).json()
        assert meta["platform"] == "python"
        assert meta["inputs"] == [{"name": "x", "datatype": "INT32", "shape": [-1, 2]}]
        resp = await client.post("/v2/models/scaler/infer", json=_tensor("x", "INT32", [[1, 2]]))
        body = await resp.json()
        assert resp.status == 200, body
        assert {o["name"]: o["data"] for o in body["outputs"]} == {"y": [3, 6], "total": [3]}
        only = {**_tensor("x", "INT32", [[1, 2], [3, 4]]), "outputs": [{"name": "total"}]}
        body = await (await client.post("/v2/models/scaler/infer", json=only)).json()
        assert body["outputs"] == [
            {"name": "total", "datatype": "INT64", "shape": [2], "data": [3, 7]}
        ]
        for bad in (
            _tensor("x", "INT32", [[-1, 2]]),  # the model's validate()
            _tensor("x", "FP32", [[1, 2]]),  # declared datatype
            _tensor("x", "INT32", [[1, 2, 3]]),  # declared shape
            _tensor("z", "INT32", [[1, 2]]),  # declared name
            {**_tensor("x", "INT32", [[1, 2]]), "outputs": [{"name": "nope"}]},
        ):
            resp = await client.post("/v2/models/scaler/infer", json=bad)
            assert resp.status == 400, await resp.text()
    finally:
        await client.close()


async def test_onnx_runtime(repo: Path) -> None:
    pytest.importorskip("onnxruntime")
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    client = TestClient(TestServer(make_app(initial_models(repo, "linear", "1")), host="127.0.0.1"))
    await client.start_server()
    try:
        meta = await (await client.get("/v2/models/linear/versions/1")).json()
        assert meta["platform"] == "onnxruntime_onnx"
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
        x = np.array([[1, 2, 3, 4], [0.5, 0, 0, 1]], dtype=np.float32)
        resp = await client.post("/v2/models/linear/infer", json=_tensor("x", "FP32", x.tolist()))
        body = await resp.json()
        assert resp.status == 200, body
        [out] = body["outputs"]
        assert out["name"] == "y" and out["datatype"] == "FP32" and out["shape"] == [2, 3]
        assert out["data"] == (x @ w).reshape(-1).tolist()
        resp = await client.post("/v2/models/linear/infer", json=_tensor("x", "FP64", x.tolist()))
        assert resp.status == 400
    finally:
        await client.close()


# --- repository extension -----------------------------------------------------------------


async def test_repository_index_load_unload(client: TestClient, repo: Path) -> None:
    index = await (await client.get("/v2/repository/index")).json()
    states = {(r["name"], r["version"]): r["state"] for r in index}
    assert states[("iris", "v1")] == "READY"
    assert states[("iris", "v2")] == states[("scaler", "1")] == "UNAVAILABLE"
    assert (await client.post("/v2/models/iris/versions/v2/infer", json=_iris())).status == 404

    resp = await client.post("/v2/repository/models/iris/versions/v2/load")
    assert resp.status == 200, await resp.text()
    body = await (await client.post("/v2/models/iris/versions/v2/infer", json=_iris())).json()
    assert body["model_version"] == "v2"
    # unversioned requests go to the newest loaded version
    body = await (await client.post("/v2/models/iris/infer", json=_iris())).json()
    assert body["model_version"] == "v2"

    ready = await (await client.post("/v2/repository/index", json={"ready": True})).json()
    assert {(r["name"], r["version"]) for r in ready} == {("iris", "v1"), ("iris", "v2")}

    resp = await client.post("/v2/repository/models/iris/versions/v2/unload")
    assert resp.status == 200
    assert (await client.post("/v2/models/iris/versions/v2/infer", json=_iris())).status == 404
    body = await (await client.post("/v2/models/iris/infer", json=_iris())).json()
    assert body["model_version"] == "v1"

    assert (await client.post("/v2/repository/models/scaler/load", json={})).status == 200
    resp = await client.post("/v2/models/scaler/infer", json=_tensor("x", "INT32", [[1, 1]]))
    assert resp.status == 200
    assert (await client.post("/v2/repository/models/iris/unload")).status == 200
    assert (await client.get("/v2/models/iris")).status == 404
    assert (await client.get("/v2/health/ready")).status == 200


async def test_repository_errors(client: TestClient) -> None:
    resp = await client.post("/v2/repository/models/rose/load")
    assert resp.status == 404 and "rose" in (await resp.json())["error"]
    resp = await client.post("/v2/repository/models/broken/load")
    assert resp.status == 400 and "missing.joblib" in (await resp.json())["error"]
    index = await (await client.get("/v2/repository/index")).json()
    [row] = [r for r in index if r["name"] == "broken"]
    assert row["state"] == "UNAVAILABLE" and "missing.joblib" in row["reason"]
    assert (await client.post("/v2/repository/models/iris/versions/v3/unload")).status == 404
    resp = await client.post("/v2/repository/models/iris/load", data=b"[1]")
    assert resp.status == 400


def test_initial_models(repo: Path) -> None:
    assert [(m.name, m.version) for m in initial_models(repo, "iris", "v2")] == [("iris", "v2")]
    assert [m.version for m in initial_models(repo, "iris", None)] == ["v1", "v2", "v3"]


def _iris() -> dict[str, Any]:
    return _tensor("input-0", "FP64", [[5.1, 3.5, 1.4, 0.2]])


def test_bare_joblib_still_loads(tmp_path: Path) -> None:
    from sklearn.dummy import DummyClassifier

    (tmp_path / "m" / "7").mkdir(parents=True)
    joblib.dump(DummyClassifier().fit([[0], [1]], [0, 1]), tmp_path / "m" / "7" / "model.joblib")
    assert load_model(tmp_path, "m", "7").runtime.platform == "sklearn"
    (tmp_path / "m" / "7" / "model-settings.yaml").write_text(textwrap.dedent("runtime: [\n"))
    with pytest.raises(ModelLoadError, match="invalid YAML"):
        load_model(tmp_path, "m", "7")
