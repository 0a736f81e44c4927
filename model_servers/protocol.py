"""Open Inference Protocol (KServe V2) JSON tensors <-> numpy arrays."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model_servers.binary_data import tensor_from_bytes, tensor_to_bytes

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_DATATYPE_OF_DTYPE = {dtype: name for name, dtype in DTYPES.items() if name != "BYTES"}
# numpy kinds that JSON values of each datatype's kind may parse to
_ACCEPTED_KINDS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf", "O": "U"}


class ProtocolError(Exception):
    """A request the protocol rejects; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class InferenceRequest:
    """A decoded inference request."""

    inputs: dict[str, np.ndarray]
    outputs: list[str] | None  # requested output names, None for the model's defaults
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    binary_outputs: frozenset[str] = frozenset()  # outputs to send as binary data
    all_binary: bool = False  # `binary_data_output`: every output as binary data

    def wants_binary(self, output: str) -> bool:
        return self.all_binary or output in self.binary_outputs


def _parameters(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ProtocolError(400, f"{where}: 'parameters' must be an object")
    return raw


def decode_request(payload: Any, binary: bytes = b"") -> InferenceRequest:
    """Decode a parsed OIP JSON request body and the binary data that followed it.

    Raise ProtocolError(400) when malformed.
    """
    if not isinstance(payload, dict):
        raise ProtocolError(400, "request body must be a JSON object")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(400, "'id' must be a string")
    parameters = _parameters(payload.get("parameters"), "request")
    all_binary = parameters.get("binary_data_output", False)
    if not isinstance(all_binary, bool):
        raise ProtocolError(400, "'binary_data_output' must be a boolean")
    raw_inputs = payload.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError(400, "'inputs' must be a non-empty list of tensors")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, raw in enumerate(raw_inputs):
        name, array, used = decode_tensor(raw, f"inputs[{i}]", binary, offset)
        offset += used
        if name in inputs:
            raise ProtocolError(400, f"duplicate input '{name}'")
        inputs[name] = array
    if offset != len(binary):
        raise ProtocolError(400, f"{len(binary) - offset} bytes of binary data left unused")
    outputs, binary_outputs = _requested_outputs(payload.get("outputs"))
    return InferenceRequest(inputs, outputs, request_id, parameters, binary_outputs, all_binary)


def _requested_outputs(raw: Any) -> tuple[list[str] | None, frozenset[str]]:
    if raw is None:
        return None, frozenset()
    if not isinstance(raw, list):
        raise ProtocolError(400, "'outputs' must be a list")
    names = []
    binary = set()
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ProtocolError(400, f"outputs[{i}] must be an object with a string 'name'")
        flag = _parameters(item.get("parameters"), f"outputs[{i}]").get("binary_data", False)
        if not isinstance(flag, bool):
            raise ProtocolError(400, f"outputs[{i}]: 'binary_data' must be a boolean")
        names.append(item["name"])
        if flag:
            binary.add(item["name"])
    return names, frozenset(binary)


def decode_tensor(
    raw: Any, where: str = "tensor", binary: bytes = b"", offset: int = 0
) -> tuple[str, np.ndarray, int]:
    """Decode one OIP tensor object into (name, array, binary bytes used).

    A tensor with `parameters.binary_data_size` takes its data from `binary[offset:]`.
    """
    if not isinstance(raw, dict):
        raise ProtocolError(400, f"{where} must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError(400, f"{where} needs a non-empty string 'name'")
    where = f"input '{name}'"
    datatype = raw.get("datatype")
    dtype = DTYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise ProtocolError(400, f"{where}: unsupported datatype {datatype!r}")
    shape = raw.get("shape")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise ProtocolError(400, f"{where}: 'shape' must be a non-empty list of ints >= 0")
    size = _parameters(raw.get("parameters"), where).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ProtocolError(400, f"{where}: 'binary_data_size' must be an int >= 0")
        if "data" in raw:
            raise ProtocolError(400, f"{where}: both 'data' and 'binary_data_size'")
        if offset + size > len(binary):
            raise ProtocolError(400, f"{where}: binary data is shorter than binary_data_size")
        try:
            array = tensor_from_bytes(binary[offset : offset + size], dtype, shape)
        except ValueError as exc:
            raise ProtocolError(400, f"{where}: {exc}") from None
        return name, array, size
    if "data" not in raw:
        raise ProtocolError(400, f"{where}: missing 'data'")
    try:
        parsed = np.asarray(raw["data"])
    except ValueError as exc:  # ragged nesting
        raise ProtocolError(400, f"{where}: 'data' is not a regular array: {exc}") from None
    if dtype == np.uint64 and parsed.dtype.kind in "fO":  # ints >= 2**63 mixed with others
        parsed = _exact_uint64(raw["data"], where)
    expected = math.prod(shape)
    if parsed.size != expected:
        raise ProtocolError(
            400, f"{where}: shape {shape} needs {expected} elements, 'data' has {parsed.size}"
        )
    if parsed.size and parsed.dtype.kind not in _ACCEPTED_KINDS[dtype.kind]:
        raise ProtocolError(400, f"{where}: 'data' values do not match datatype {datatype}")
    if dtype.kind in "iu" and parsed.size:
        info = np.iinfo(dtype)
        if parsed.min() < info.min or parsed.max() > info.max:
            raise ProtocolError(400, f"{where}: values out of range for {datatype}")
    return name, parsed.astype(dtype, copy=False).reshape(shape), 0


def _exact_uint64(data: Any, where: str) -> np.ndarray:
    """Parse UINT64 data that numpy's default inference turned into floats or objects."""
    values = np.asarray(data, dtype=object).reshape(-1).tolist()
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ProtocolError(400, f"{where}: 'data' values do not match datatype UINT64")
    try:
        return np.array(values, dtype=np.uint64)
    except OverflowError:
        raise ProtocolError(400, f"{where}: values out of range for UINT64") from None


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype name for a numpy array (strings and objects map to BYTES)."""
    return _DATATYPE_OF_DTYPE.get(array.dtype, "BYTES")


def encode_tensor(name: str, array: np.ndarray) -> dict[str, Any]:
    """Encode an array as an OIP output tensor with flat row-major data."""
    datatype = datatype_of(array)
    flat = array.reshape(-1)
    if datatype == "BYTES":
        try:
            data = [v.decode() if isinstance(v, bytes) else str(v) for v in flat.tolist()]
        except UnicodeDecodeError:
            raise ProtocolError(
                400, f"output '{name}' is not UTF-8: request it with binary_data"
            ) from None
    else:
        data = flat.tolist()
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}


def encode_response(
    model_name: str,
    model_version: str,
    outputs: Mapping[str, np.ndarray],
    request_id: str | None = None,
) -> dict[str, Any]:
    """Build an OIP inference response body."""
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = [encode_tensor(name, array) for name, array in outputs.items()]
    return response


def render_response(
    model_name: str,
    model_version: str,
    outputs: Mapping[str, np.ndarray],
    request: InferenceRequest,
) -> tuple[bytes, int | None]:
    """Serialise a response: (body, JSON header length when binary outputs follow it)."""
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        response["id"] = request.id
    tensors = []
    chunks = []
    for name, array in outputs.items():
        if request.wants_binary(name):
            chunk = tensor_to_bytes(array)
            tensors.append(
                {
                    "name": name,
                    "datatype": datatype_of(array),
                    "shape": list(array.shape),
                    "parameters": {"binary_data_size": len(chunk)},
                }
            )
            chunks.append(chunk)
        else:
            tensors.append(encode_tensor(name, array))
    response["outputs"] = tensors
    header = json.dumps(response).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)
