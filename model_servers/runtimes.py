"""The scikit-learn runtime, and `load_runtime`, which picks a runtime for a version."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model_servers.onnx_runtime import OnnxRuntime
from model_servers.protocol import ProtocolError
from model_servers.python_runtime import PythonRuntime
from model_servers.runtime_base import ModelLoadError, Runtime, Tensors
from model_servers.settings import ModelSettings


class SklearnRuntime:
    """Serves a scikit-learn estimator saved with joblib.

    Takes one [N, F] numeric tensor; outputs `predict` and, for estimators that have it,
    `predict_proba`. Only `predict` is returned unless the request names outputs.
    """

    platform = "sklearn"
    default_outputs = ("predict",)

    def __init__(self, estimator: Any) -> None:
        self.estimator = estimator
        self.n_features: int | None = getattr(estimator, "n_features_in_", None)
        self._methods = {"predict": estimator.predict}
        if hasattr(estimator, "predict_proba"):
            self._methods["predict_proba"] = estimator.predict_proba

    @classmethod
    def load(cls, path: Path) -> SklearnRuntime:
        """Load a joblib file (joblib is imported here: other runtimes' servers start
        without it)."""
        import joblib

        return cls(joblib.load(path))

    def metadata(self) -> dict[str, list[dict[str, Any]]]:
        features = -1 if self.n_features is None else self.n_features
        outputs = [{"name": "predict", "datatype": self._predict_datatype(), "shape": [-1]}]
        if "predict_proba" in self._methods:
            n_classes = len(getattr(self.estimator, "classes_", ())) or -1
            outputs.append({"name": "predict_proba", "datatype": "FP64", "shape": [-1, n_classes]})
        return {
            "inputs": [{"name": "input-0", "datatype": "FP64", "shape": [-1, features]}],
            "outputs": outputs,
        }

    def _predict_datatype(self) -> str:
        classes = getattr(self.estimator, "classes_", None)
        if classes is None:
            return "FP64"
        kind = np.asarray(classes).dtype.kind
        return {"b": "BOOL", "i": "INT64", "u": "INT64", "f": "FP64"}.get(kind, "BYTES")

    def validate(self, inputs: Tensors, requested: Sequence[str] | None) -> None:
        if len(inputs) != 1:
            raise ProtocolError(400, f"expected exactly one input tensor, got {len(inputs)}")
        ((name, x),) = inputs.items()
        if x.ndim != 2 or x.dtype.kind not in "iuf":
            raise ProtocolError(
                400, f"input '{name}' must be a 2-D numeric tensor [N, F], got {x.dtype}{x.shape}"
            )
        if self.n_features is not None and x.shape[1] != self.n_features:
            raise ProtocolError(
                400, f"input '{name}' has {x.shape[1]} features, model expects {self.n_features}"
            )
        unknown = [n for n in requested or () if n not in self._methods]
        if unknown:
            raise ProtocolError(
                400, f"unknown outputs {unknown}; available: {sorted(self._methods)}"
            )

    def predict(self, inputs: Tensors, requested: Sequence[str] | None) -> Tensors:
        (x,) = inputs.values()
        x = x.astype(np.float64, copy=False)
        names = requested or self.default_outputs
        return {n: _normalise(self._methods[n](x)) for n in dict.fromkeys(names)}


def _normalise(array: Any) -> np.ndarray:
    """Widen numeric results to INT64 / FP64, as the metadata advertises."""
    array = np.asarray(array)
    if array.dtype.kind in "iu":
        return array.astype(np.int64, copy=False)
    if array.dtype.kind == "f":
        return array.astype(np.float64, copy=False)
    return array


def load_runtime(version_dir: Path, settings: ModelSettings) -> Runtime:
    """Instantiate the runtime `settings` names for the files in `version_dir`."""
    path = version_dir / settings.file
    if not path.is_file():
        raise ModelLoadError(f"{settings.runtime} model file {path} not found")
    if settings.runtime == "onnx":
        return OnnxRuntime.load(path, settings)
    if settings.runtime == "python":
        return PythonRuntime.load(path, settings)
    return SklearnRuntime.load(path)
