"""ONNX models through onnxruntime (the optional `onnx` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model_servers.runtime_base import ModelLoadError, Tensors
from model_servers.settings import ModelSettings, TensorSpec
from model_servers.signature import check_inputs, check_outputs

MISSING_EXTRA = (
    "the ONNX runtime needs the 'onnx' extra (onnxruntime): pip install 'infergate[onnx]'"
)
_ONNX_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def _spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
    return TensorSpec(arg.name, _ONNX_TYPES.get(arg.type, "BYTES"), shape)


class OnnxRuntime:
    """Runs an `.onnx` graph on CPU; inputs and outputs are the graph's own."""

    platform = "onnxruntime_onnx"

    def __init__(self, session: Any, settings: ModelSettings) -> None:
        self.session = session
        self.inputs = settings.inputs or tuple(_spec(a) for a in session.get_inputs())
        self.outputs = settings.outputs or tuple(_spec(a) for a in session.get_outputs())
        self._output_names = [spec.name for spec in self.outputs]

    @classmethod
    def load(cls, path: Path, settings: ModelSettings) -> OnnxRuntime:
        try:
            import onnxruntime
        except ImportError:
            raise ModelLoadError(MISSING_EXTRA) from None
        try:
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"cannot load ONNX model {path}: {exc}") from None
        return cls(session, settings)

    def metadata(self) -> dict[str, list[dict[str, Any]]]:
        return {
            "inputs": [s.as_metadata() for s in self.inputs],
            "outputs": [s.as_metadata() for s in self.outputs],
        }

    def validate(self, inputs: Tensors, requested: Sequence[str] | None) -> None:
        check_inputs(self.inputs, inputs)
        check_outputs(self._output_names, requested)

    def predict(self, inputs: Tensors, requested: Sequence[str] | None) -> Tensors:
        names = list(dict.fromkeys(requested)) if requested else self._output_names
        feed = {k: v.astype(str) if v.dtype == object else v for k, v in inputs.items()}
        results = self.session.run(names, feed)
        return {name: np.asarray(value) for name, value in zip(names, results, strict=True)}
