"""KServe V2 `GRPCInferenceService` on grpcio's asyncio server: a transport over the same
DataPlane as the REST API."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np

from model_servers.admin import OPEN_ON_LOOPBACK, AdminGuard, ServerTls
from model_servers.binary_data import tensor_from_bytes, tensor_to_bytes
from model_servers.dataplane import DataPlane
from model_servers.grpc_stubs import load
from model_servers.load_report import HEADER as LOAD_REPORT_HEADER
from model_servers.protocol import (
    DTYPES,
    InferenceRequest,
    ProtocolError,
    datatype_of,
    decode_tensor,
)
from model_servers.repository import LoadedModel
from model_servers.runtime_base import Tensors

pb, services = load()

# the gRPC status of each ProtocolError status; anything else is INTERNAL
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
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


def encode_infer_response(model: LoadedModel, outputs: Tensors, rid: str) -> Any:
    """A ModelInferResponse with every output in raw_output_contents."""
    response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=rid)
    for name, array in outputs.items():
        response.outputs.add(name=name, datatype=datatype_of(array), shape=list(array.shape))
        response.raw_output_contents.append(tensor_to_bytes(array))
    return response


class _GrpcCodec:
    """A ModelInferRequest (parsed by grpc), and the ModelInferResponse for its outputs."""

    def __init__(self, message: Any) -> None:
        self.message = message

    async def read(self) -> int:
        return self.message.ByteSize()

    def decode(self) -> InferenceRequest:
        return decode_infer_request(self.message)

    def encode(self, model: LoadedModel, request: InferenceRequest, outputs: Tensors) -> Any:
        return encode_infer_response(model, outputs, self.message.id)


_Rpc = Callable[[Any, Any, Any], Awaitable[Any]]


def _aborts_on_error(rpc: _Rpc) -> _Rpc:
    """Abort the call with the gRPC code of a ProtocolError's HTTP status (`CODES`)."""

    @functools.wraps(rpc)
    async def call(self: Any, request: Any, context: Any) -> Any:
        try:
            return await rpc(self, request, context)
        except ProtocolError as exc:
            await context.abort(CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.message)

    return call


class InferenceServicer(services.GRPCInferenceServiceServicer):
    """The KServe V2 RPCs, and Triton's repository load/unload, over a DataPlane."""

    def __init__(self, core: DataPlane, admin: AdminGuard) -> None:
        self.core = core
        self.admin = admin

    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=self.core.ready)

    @_aborts_on_error
    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ModelReadyResponse(ready=self.core.model_ready(request.name, request.version))

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerMetadataResponse(**self.core.server_metadata)

    @_aborts_on_error
    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ModelMetadataResponse(**self.core.model_metadata(request.name, request.version))

    @_aborts_on_error
    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        """Inference; the ORCA load report goes out in the trailing metadata."""
        served = self.core.resolve(request.model_name, request.model_version)
        request_id = None  # grpcio does not expose :authority: whether a shadow is unknown
        if self.core.answers is not None:
            request_id = dict(context.invocation_metadata() or ()).get("x-request-id")
        try:
            return await self.core.infer(served, _GrpcCodec(request), request_id, None)
        finally:
            context.set_trailing_metadata([(LOAD_REPORT_HEADER, self.core.load_report.value())])

    @_aborts_on_error
    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:  # noqa: N802
        await self._repository_change(request, context, self.core.registry.load)
        return pb.RepositoryModelLoadResponse()

    @_aborts_on_error
    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:  # noqa: N802
        await self._repository_change(request, context, self.core.registry.unload)
        return pb.RepositoryModelUnloadResponse()

    async def _repository_change(
        self, request: Any, context: Any, change: Callable[[str, str | None], Awaitable[Any]]
    ) -> None:
        self.admin.check(dict(context.invocation_metadata() or ()).get("authorization"))
        version = request.parameters.get("version")
        await change(request.model_name, version.string_param if version else None)


def make_grpc_server(
    core: DataPlane,
    address: str,
    admin: AdminGuard = OPEN_ON_LOOPBACK,
    tls: ServerTls | None = None,
) -> grpc.aio.Server:
    """An unstarted grpc.aio server for `core`, listening on `address` (host:port), over
    TLS if `tls` is given (then requiring a client certificate if it names a client CA)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
    )
    services.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(core, admin), server)
    if tls is None:
        server.add_insecure_port(address)
    else:
        server.add_secure_port(address, _credentials(tls))
    return server


def _credentials(tls: ServerTls) -> grpc.ServerCredentials:
    ca = tls.client_ca.read_bytes() if tls.client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(tls.key.read_bytes(), tls.cert.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )
