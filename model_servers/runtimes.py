"""Model runtimes: turn decoded input tensors into named output arrays."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import joblib
import numpy as np

from model_servers.protocol import ProtocolError

MODEL_FILE = "model.joblib"


class SklearnRuntime:
    """Serves a scikit-learn estimator saved with joblib as `model.joblib`.

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
    def load(cls, version_dir: Path) -> SklearnRuntime:
        """Load `<version_dir>/model.joblib`."""
        return cls(joblib.load(version_dir / MODEL_FILE))

    def metadata(self) -> dict[str, list[dict[str, Any]]]:
        """OIP `inputs` and `outputs` tensor metadata."""
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

    def predict(
        self, inputs: dict[str, np.ndarray], requested: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the estimator; raise ProtocolError(400) for unusable inputs or outputs."""
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
        names = requested or self.default_outputs
        unknown = [n for n in names if n not in self._methods]
        if unknown:
            raise ProtocolError(
                400, f"unknown outputs {unknown}; available: {sorted(self._methods)}"
            )
        x = x.astype(np.float64, copy=False)
        return {n: _normalise(self._methods[n](x)) for n in dict.fromkeys(names)}


def _normalise(array: Any) -> np.ndarray:
    """Widen numeric results to INT64 / FP64, as the metadata advertises."""
    array = np.asarray(array)
    if array.dtype.kind in "iu":
        return array.astype(np.int64, copy=False)
    if array.dtype.kind == "f":
        return array.astype(np.float64, copy=False)
    return array
