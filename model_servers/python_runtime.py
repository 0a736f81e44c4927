"""Plain Python models: a class with `load()` and `predict(inputs) -> outputs`.

The settings name it as `class: <file.py>:<ClassName>`; `parameters` become keyword
arguments of the constructor. `predict` receives and returns `dict[str, numpy.ndarray]`;
an optional `validate(inputs)` raises ValueError to reject one request with a 400.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model_servers.protocol import ProtocolError
from model_servers.runtime_base import ModelLoadError, Tensors
from model_servers.settings import ModelSettings
from model_servers.signature import check_inputs, check_outputs, select_outputs


class PythonRuntime:
    """Adapts a user model object to the runtime interface."""

    platform = "python"

    def __init__(self, model: Any, settings: ModelSettings) -> None:
        self.model = model
        self.settings = settings
        self._output_names = [spec.name for spec in settings.outputs]

    @classmethod
    def load(cls, path: Path, settings: ModelSettings) -> PythonRuntime:
        file, _, class_name = (settings.class_name or "").rpartition(":")
        source = path.parent / file if file else path
        # a unique module name per file, so two versions' `model.py` do not collide
        module_name = "infergate_model_" + hashlib.sha1(str(source).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(module_name, source)
        if spec is None or spec.loader is None or not source.is_file():
            raise ModelLoadError(f"cannot import {source}")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
            model = getattr(module, class_name)(**settings.parameters)
            model.load()
        except Exception as exc:
            raise ModelLoadError(f"cannot load {source}:{class_name}: {exc!r}") from exc
        return cls(model, settings)

    def metadata(self) -> dict[str, list[dict[str, Any]]]:
        return {
            "inputs": [s.as_metadata() for s in self.settings.inputs],
            "outputs": [s.as_metadata() for s in self.settings.outputs],
        }

    def validate(self, inputs: Tensors, requested: Sequence[str] | None) -> None:
        check_inputs(self.settings.inputs, inputs)
        check_outputs(self._output_names, requested)
        validate = getattr(self.model, "validate", None)
        if validate is not None:
            try:
                validate(inputs)
            except ValueError as exc:
                raise ProtocolError(400, str(exc)) from None

    def predict(self, inputs: Tensors, requested: Sequence[str] | None) -> Tensors:
        return select_outputs(dict(self.model.predict(inputs)), requested)
