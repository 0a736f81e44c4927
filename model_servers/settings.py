"""Per-version model settings: `<repository>/<model>/<version>/model-settings.yaml`.

Example::

    runtime: sklearn            # sklearn (default) | onnx | python
    file: model.joblib          # model file, relative to the version folder
    class: model.py:IrisModel   # python runtime only: <file>:<class>
    batching: {max_batch_size: 32, max_batch_delay_ms: 2}
    inputs:  [{name: x, datatype: FP64, shape: [-1, 4]}]
    outputs: [{name: y, datatype: INT64, shape: [-1]}]
    parameters: {}              # python runtime only: keyword arguments for the class
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from model_servers.protocol import DTYPES

SETTINGS_FILE = "model-settings.yaml"
RUNTIMES = ("sklearn", "onnx", "python")
_DEFAULT_FILES = {"sklearn": "model.joblib", "onnx": "model.onnx", "python": "model.py"}
_KEYS = {"runtime", "file", "class", "batching", "inputs", "outputs", "parameters"}


class SettingsError(ValueError):
    """An invalid settings file."""


@dataclass(frozen=True)
class TensorSpec:
    """A declared input or output: name, OIP datatype, shape with -1 for any size."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def as_metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Batching:
    """Adaptive batching: merge up to `max_batch_size` rows, waiting up to `max_delay_ms`."""

    max_batch_size: int = 1
    max_delay_ms: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.max_batch_size > 1


@dataclass(frozen=True)
class ModelSettings:
    """What a version folder declares; defaults describe a bare `model.joblib`."""

    runtime: str = "sklearn"
    file: str = "model.joblib"
    class_name: str | None = None
    batching: Batching = field(default_factory=Batching)
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)


def load_settings(version_dir: Path) -> ModelSettings:
    """Read the version's settings file, or the defaults when it has none."""
    path = version_dir / SETTINGS_FILE
    if not path.is_file():
        return ModelSettings()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: invalid YAML: {exc}") from None
    try:
        return parse_settings(raw)
    except SettingsError as exc:
        raise SettingsError(f"{path}: {exc}") from None


def parse_settings(raw: Any) -> ModelSettings:
    """Validate a parsed settings mapping."""
    if not isinstance(raw, dict):
        raise SettingsError("settings must be a mapping")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise SettingsError(f"unknown keys {unknown}; allowed: {sorted(_KEYS)}")
    runtime = raw.get("runtime", "sklearn")
    if runtime not in RUNTIMES:
        raise SettingsError(f"runtime must be one of {list(RUNTIMES)}, got {runtime!r}")
    file = raw.get("file", _DEFAULT_FILES[runtime])
    class_name = raw.get("class")
    if runtime == "python" and not isinstance(class_name, str):
        raise SettingsError("the python runtime needs 'class: <file.py>:<ClassName>'")
    parameters = raw.get("parameters", {})
    if not isinstance(file, str) or not isinstance(parameters, dict):
        raise SettingsError("'file' must be a string and 'parameters' a mapping")
    return ModelSettings(
        runtime=runtime,
        file=file,
        class_name=class_name,
        batching=_batching(raw.get("batching", {})),
        inputs=_specs(raw.get("inputs", []), "inputs"),
        outputs=_specs(raw.get("outputs", []), "outputs"),
        parameters=parameters,
    )


def _batching(raw: Any) -> Batching:
    if not isinstance(raw, dict) or set(raw) - {"max_batch_size", "max_batch_delay_ms"}:
        raise SettingsError("'batching' takes max_batch_size and max_batch_delay_ms")
    size = raw.get("max_batch_size", 1)
    delay = raw.get("max_batch_delay_ms", 0)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise SettingsError("max_batch_size must be an int >= 1")
    if not isinstance(delay, int | float) or isinstance(delay, bool) or delay < 0:
        raise SettingsError("max_batch_delay_ms must be a number >= 0")
    return Batching(size, float(delay))


def _specs(raw: Any, where: str) -> tuple[TensorSpec, ...]:
    if not isinstance(raw, list):
        raise SettingsError(f"'{where}' must be a list")
    specs = []
    for i, item in enumerate(raw):
        ok = (
            isinstance(item, dict)
            and isinstance(item.get("name"), str)
            and item.get("datatype") in DTYPES
            and isinstance(item.get("shape"), list)
            and all(isinstance(d, int) and d >= -1 for d in item["shape"])
        )
        if not ok:
            raise SettingsError(
                f"{where}[{i}] needs a string name, an OIP datatype and a shape of ints >= -1"
            )
        specs.append(TensorSpec(item["name"], item["datatype"], tuple(item["shape"])))
    return tuple(specs)
