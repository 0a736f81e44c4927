"""The end-to-end tests' numpy iris models answer exactly as the trained estimators."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model_servers.protocol import ProtocolError
from model_servers.repository import load_model


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_numpy_versions_predict_what_the_estimators_predict(
    sklearn_repository: Path, model_repository: Path, version: str
) -> None:
    rng = np.random.default_rng(1)
    # iris-like rows at the data set's resolution (0.1 cm), 3 classes of each version
    x = rng.uniform([4, 2, 1, 0.1], [8, 4.5, 7, 2.5], (20_000, 4)).round(1)
    estimator = load_model(sklearn_repository, "iris", version).runtime
    numpy = load_model(model_repository, "iris", version).runtime
    assert numpy.platform == "python" and estimator.platform == "sklearn"
    want = estimator.predict({"x": x}, None)["predict"]
    got = numpy.predict({"x": x}, None)["predict"]
    assert got.dtype == want.dtype and len(set(want)) == 3
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "inputs",
    [
        {"x": np.zeros((1, 3))},
        {"x": np.zeros(4)},
        {"x": np.array([["a", "b", "c", "d"]])},
        {"x": np.array([[np.nan, 1, 1, 1]])},
        {"x": np.zeros((1, 4)), "y": np.zeros((1, 4))},
    ],
    ids=["3 features", "1-D", "strings", "NaN", "two inputs"],
)
def test_numpy_versions_reject_what_the_estimators_reject(
    sklearn_repository: Path, model_repository: Path, inputs: dict
) -> None:
    estimator = load_model(sklearn_repository, "iris", "v1").runtime
    with pytest.raises((ProtocolError, ValueError)):  # NaN: only scikit-learn's predict says
        estimator.validate(inputs, None)
        estimator.predict(inputs, None)
    with pytest.raises(ProtocolError) as rejected:  # a 400 before the batcher merges it
        load_model(model_repository, "iris", "v1").runtime.validate(inputs, None)
    assert rejected.value.status == 400
