"""Train three iris classifier versions into a model repository.

Usage: python examples/train_iris.py OUT_DIR  ->  OUT_DIR/iris/{v1,v2,v3}/model.joblib
"""

from __future__ import annotations

import sys
from pathlib import Path

import joblib
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.tree import DecisionTreeClassifier

VERSIONS = {
    "v1": lambda: LogisticRegression(max_iter=500),
    "v2": lambda: LogisticRegression(C=0.1, max_iter=500),
    "v3": lambda: DecisionTreeClassifier(max_depth=3, random_state=0),
}


def train(out_dir: Path) -> list[Path]:
    """Fit every version on the iris data set and write it; return the written files."""
    x, y = load_iris(return_X_y=True)
    written = []
    for version, make in VERSIONS.items():
        path = out_dir / "iris" / version / "model.joblib"
        path.parent.mkdir(parents=True, exist_ok=True)
        joblib.dump(make().fit(x, y), path)
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    for path in train(Path(argv[0])):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
