"""The trained iris versions as plain-Python models that answer with numpy alone.

End-to-end tests start about a hundred model servers. Unpickling a scikit-learn estimator
imports scikit-learn and scipy first: 2.1 s of CPU per server, against 0.7 s for a
python-runtime model. `export` writes each trained version's parameters and a `model.py`
that computes `predict` as the estimator does (a linear model's arg-max score, or a
decision tree walked on float32 inputs); `tests/test_iris_numpy.py` checks that both give
the same answers. The model-server tests keep serving the joblib files themselves.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import joblib
import numpy as np

# The iris features as scikit-learn's `load_iris` returns them, read from the file it ships
# without importing scikit-learn (1.4 s of CPU in every test worker that collects a module).
_SKLEARN = Path(importlib.util.find_spec("sklearn").origin).parent
IRIS_X = np.loadtxt(
    _SKLEARN / "datasets/data/iris.csv", delimiter=",", skiprows=1, usecols=range(4)
)

MODEL = '''\
"""A trained iris version, from the parameters in params.npz (tests/iris_numpy.py)."""

from pathlib import Path

import numpy as np


class Iris:
    def load(self):
        self.p = dict(np.load(Path(__file__).with_name("params.npz")))
        if "left" in self.p:  # a tree walks faster on Python lists (a request is one row)
            self.tree = [self.p[k].tolist() for k in ("feature", "threshold", "left", "right")]

    def validate(self, inputs):
        if len(inputs) != 1:
            raise ValueError(f"expected exactly one input tensor, got {len(inputs)}")
        ((name, x),) = inputs.items()
        if x.ndim != 2 or x.dtype.kind not in "iuf" or x.shape[1] != 4:
            raise ValueError(f"input '{name}' must be a numeric tensor [N, 4], got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"input '{name}' contains NaN or infinity")

    def predict(self, inputs):
        (x,) = inputs.values()
        p = self.p
        if "coef" in p:  # a linear model: the class with the highest score
            scores = x.astype(np.float64) @ p["coef"].T + p["intercept"]
        else:  # a decision tree, compared on float32 inputs as scikit-learn does
            feature, threshold, left, right = self.tree
            leaves = []
            for row in x.astype(np.float32).tolist():
                node = 0
                while left[node] != -1:
                    node = left[node] if row[feature[node]] <= threshold[node] else right[node]
                leaves.append(node)
            scores = p["value"][leaves]
        return {"predict": p["classes"][scores.argmax(axis=1)].astype(np.int64)}
'''

SETTINGS = """\
runtime: python
class: model.py:Iris
outputs: [{name: predict, datatype: INT64, shape: [-1]}]
"""


def parameters(estimator) -> dict[str, np.ndarray]:
    """What `MODEL` needs of a fitted LogisticRegression or DecisionTreeClassifier."""
    if hasattr(estimator, "coef_"):
        return {
            "classes": estimator.classes_,
            "coef": estimator.coef_,
            "intercept": estimator.intercept_,
        }
    tree = estimator.tree_
    return {
        "classes": estimator.classes_,
        "feature": tree.feature,
        "threshold": tree.threshold,
        "left": tree.children_left,
        "right": tree.children_right,
        "value": tree.value[:, 0, :],
    }


def export(trained: Path, out: Path) -> Path:
    """Write every `<model>/<version>/model.joblib` under `trained` as a python-runtime
    version under `out`; return `out`."""
    for path in sorted(trained.glob("*/*/model.joblib")):
        folder = out / path.parent.relative_to(trained)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "params.npz", **parameters(joblib.load(path)))
        (folder / "model.py").write_text(MODEL)
        (folder / "model-settings.yaml").write_text(SETTINGS)
    return out
