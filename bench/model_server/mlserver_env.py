"""MLServer in a virtualenv of its own, created on first use (pinned: MLServer 1.7.1, and
the scikit-learn and numpy versions that trained the model, so both servers load the same
file)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

DEFAULT_VENV = Path(__file__).resolve().parents[1] / ".venvs" / "mlserver"


def ensure_mlserver(venv: Path = DEFAULT_VENV) -> Path:
    """The `mlserver` executable, installing it into `venv` when it is not there yet."""
    binary = venv / "bin" / "mlserver"
    if binary.exists():
        return binary
    print(f"installing MLServer into {venv} (once)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    packages = [
        "mlserver==1.7.1",
        "mlserver-sklearn==1.7.1",
        "uvloop<0.22",  # MLServer 1.7.1's workers crash at start with uvloop 0.22+
        f"scikit-learn=={version('scikit-learn')}",
        f"numpy=={version('numpy')}",
    ]
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *packages]
    subprocess.run(pip, check=True)
    return binary
