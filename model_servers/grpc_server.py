"""KServe V2 `GRPCInferenceService` on grpcio's asyncio server, over the same registry,
validation, batching and metrics as the REST API."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from model_servers.binary_data import tensor_from_bytes, tensor_to_bytes
from model_servers.grpc_stubs import load
from model_servers.protocol import (
    DTYPES,
    InferenceRequest,
    ProtocolError,
    datatype_of,
    decode_tensor,
)
from model_servers.registry import ModelRegistry, ServedModel

pb, services = load()

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _parameter(value: Any) -> Any:
    return getattr(value, value.WhichOneof("parameter_choice") or "string_param")


def decode_infer_request(message: Any) -> InferenceRequest:
    """A ModelInferRequest as an InferenceRequest; raise ProtocolError(400) when malformed."""
    raw = list(message.raw_input_contents)
    if raw and len(raw) != len(message.inputs):
        raise ProtocolError(400, "raw_input_contents must have one entry per input")
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(message.inputs):
        where = f"input '{tensor.name}'"
        dtype = DTYPES.get(tensor.datatype)
        shape = list(tensor.shape)
        if dtype is None or any(d < 0 for d in shape) or not shape:
            raise ProtocolError(400, f"{where}: bad datatype {tensor.datatype!r} or shape {shape}")
        if raw:
            try:
                array = tensor_from_bytes(raw[i], dtype, shape)
            except ValueError as exc:
                raise ProtocolError(400, f"{where}: {exc}") from None
        elif tensor.datatype == "BYTES":
            values = list(tensor.contents.bytes_contents)
            if len(values) != int(np.prod(shape)):
                raise ProtocolError(400, f"{where}: {len(values)} elements for shape {shape}")
            array = np.array(values, dtype=object).reshape(shape)
        elif tensor.datatype in _CONTENTS:
            data = list(getattr(tensor.contents, _CONTENTS[tensor.datatype]))
            json_tensor = {"name": tensor.name, "datatype": tensor.datatype, "shape": shape}
            _, array, _ = decode_tensor({**json_tensor, "data": data}, where)
        else:
            raise ProtocolError(400, f"{where}: {tensor.datatype} needs raw_input_contents")
        if tensor.name in inputs:
            raise ProtocolError(400, f"duplicate input '{tensor.name}'")
        inputs[tensor.name] = array
    if not inputs:
        raise ProtocolError(400, "'inputs' must be a non-empty list of tensors")
    outputs = [o.name for o in message.outputs] or None
    parameters = {k: _parameter(v) for k, v in message.parameters.items()}
    return InferenceRequest(inputs, outputs, message.id or None, parameters)


def encode_infer_response(served: ServedModel, outputs: dict[str, np.ndarray], rid: str) -> Any:
    """A ModelInferResponse with every output in raw_output_contents."""
    response = pb.ModelInferResponse(
        model_name=served.model.name, model_version=served.model.version, id=rid
    )
    for name, array in outputs.items():
        response.outputs.add(name=name, datatype=datatype_of(array), shape=list(array.shape))
        response.raw_output_contents.append(tensor_to_bytes(array))
    return response


class InferenceServicer(services.GRPCInferenceServiceServicer):
    """The six KServe V2 RPCs."""

    def __init__(
        self, registry: ModelRegistry, draining: Callable[[], bool], metadata: dict[str, Any]
    ) -> None:
        self.registry = registry
        self.draining = draining
        self.metadata = metadata

    async def _resolve(self, name: str, version: str, context: Any) -> ServedModel:
        try:
            return self.registry.resolve(name, version or None)
        except ProtocolError as exc:
            self.registry.metrics.unknown_model.inc()
            await context.abort(_CODES[exc.status], exc.message)
            raise  # abort raises; this keeps type checkers informed

    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=not self.draining())

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        try:
            self.registry.resolve(request.name, request.version or None)
        except ProtocolError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=not self.draining())

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerMetadataResponse(**self.metadata)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        served = await self._resolve(request.name, request.version, context)
        meta = served.model.runtime.metadata()
        return pb.ModelMetadataResponse(
            name=served.model.name,
            versions=[served.model.version],
            platform=served.model.runtime.platform,
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]],
        )

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        served = await self._resolve(request.model_name, request.model_version, context)
        start = time.perf_counter()
        served.metrics.inflight.inc()
        status = 500
        try:
            decoded = decode_infer_request(request)
            served.model.runtime.validate(decoded.inputs, decoded.outputs)
            outputs = await served.predict(decoded, self.registry.executor)
            response = encode_infer_response(served, outputs, request.id)
            status = 200
            return response
        except ProtocolError as exc:
            status = exc.status
            await context.abort(_CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.message)
        finally:
            served.metrics.inflight.dec()
            served.metrics.observe(status, time.perf_counter() - start)


def make_grpc_server(servicer: InferenceServicer, address: str) -> grpc.aio.Server:
    """An unstarted grpc.aio server listening on `address` (host:port)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
    )
    services.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    server.add_insecure_port(address)
    return server
