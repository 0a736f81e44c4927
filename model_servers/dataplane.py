"""The protocol logic of a model server, shared by the REST and gRPC transports.

A transport decodes its request into calls on `DataPlane`, and encodes what they return
(or the `ProtocolError` they raise, the one error type: its `status` is an HTTP status that
each transport maps once). The data plane owns the registry, draining, the in-flight count,
the ORCA load report, the metrics, readiness, metadata and validate -> predict.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Protocol, TypeVar

from model_servers.answers import AnswerLog
from model_servers.load_report import LoadReporter
from model_servers.metrics import ServerMetrics
from model_servers.protocol import InferenceRequest, ProtocolError
from model_servers.registry import ModelRegistry, ServedModel
from model_servers.repository import LoadedModel
from model_servers.runtime_base import Tensors
from model_servers.settings import Batching

log = logging.getLogger(__name__)

EXTENSIONS = ["model_repository", "binary_tensor_data", "parameters"]
# bodies up to this size are decoded and encoded on the event loop: a thread hop costs more
INLINE_BYTES = 64 * 1024

T = TypeVar("T")


class Codec(Protocol[T]):
    """One inference request in a transport's encoding, and how to encode its answer."""

    async def read(self) -> int:
        """Receive the request body; return its size in bytes."""
        ...

    def decode(self) -> InferenceRequest:
        """The request; raise ProtocolError(400) when malformed."""
        ...

    def encode(self, model: LoadedModel, request: InferenceRequest, outputs: Tensors) -> T:
        """The response carrying `outputs`."""
        ...


def _server_version() -> str:
    try:
        return package_version("infergate")
    except PackageNotFoundError:
        return "0+unknown"


class DataPlane:
    """Readiness, metadata and inference over a ModelRegistry, for any transport."""

    def __init__(self, registry: ModelRegistry, answers: AnswerLog | None = None) -> None:
        self.registry = registry
        self.answers = answers  # None: answers are not recorded
        self.metrics = registry.metrics
        self.draining = False
        self.inflight = 0
        self.load_report = LoadReporter(
            {
                "queue_depth": lambda: sum(s.queue_depth for s in registry.served),
                "inflight": lambda: self.inflight,
            }
        )
        self.server_metadata: dict[str, Any] = {
            "name": "infergate",
            "version": _server_version(),
            "extensions": EXTENSIONS,
        }

    @classmethod
    def create(
        cls,
        models: Iterable[LoadedModel],
        repository: Path | None,
        workers: int,
        batching: Batching | None,
        answers: AnswerLog | None = None,
    ) -> DataPlane:
        """A data plane serving `models`, predicting on `workers` threads, recording its
        answers in `answers` if given."""
        executor = ThreadPoolExecutor(workers, thread_name_prefix="predict")
        registry = ModelRegistry(repository, ServerMetrics(), executor, batching)
        for model in models:
            registry.add(model)
        return cls(registry, answers)

    async def close(self) -> None:
        """Finish queued batches, then stop the predict threads."""
        await self.registry.close()
        self.registry.executor.shutdown(wait=True)

    def drain(self) -> None:
        """Report not ready from now on; requests are still served."""
        self.draining = True

    @property
    def ready(self) -> bool:
        return not self.draining

    def resolve(self, name: str, version: str | None) -> ServedModel:
        """The loaded version named (newest when None); ProtocolError(404) counted if none."""
        try:
            return self.registry.resolve(name, version or None)
        except ProtocolError:
            self.metrics.unknown_model.inc()
            raise

    def model_ready(self, name: str, version: str | None) -> bool:
        """Whether the model answers; ProtocolError(404) if it is not loaded."""
        self.resolve(name, version)
        return self.ready

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        """OIP model metadata: name, versions, platform, inputs, outputs."""
        return self.resolve(name, version).metadata

    async def infer(
        self,
        served: ServedModel,
        codec: Codec[T],
        request_id: str | None = None,
        shadow: bool | None = False,
    ) -> T:
        """Decode, validate, predict and encode one request, counting it in the metrics and
        the load report; a failure is a ProtocolError (unexpected ones become a 500).

        With a `request_id` (`x-request-id`) and answer recording on, a successful answer
        is recorded, marked as one to a mirrored request if `shadow` (None: unknown)."""
        start = time.perf_counter()
        served.metrics.inflight.inc()
        self.inflight += 1
        status = 500
        try:
            result = await self._infer(served, codec, request_id, shadow)
            status = 200
            return result
        except ProtocolError as exc:
            status = exc.status
            raise
        except Exception:
            log.exception("inference failed")
            raise ProtocolError(500, "internal server error") from None
        finally:
            served.metrics.inflight.dec()
            self.inflight -= 1
            served.metrics.observe(status, time.perf_counter() - start)
            self.load_report.record()

    async def _infer(
        self, served: ServedModel, codec: Codec[T], request_id: str | None, shadow: bool | None
    ) -> T:
        inline = await codec.read() <= INLINE_BYTES
        executor = self.registry.executor
        loop = asyncio.get_running_loop()

        def decode() -> InferenceRequest:
            request = codec.decode()
            served.model.runtime.validate(request.inputs, request.outputs)
            return request

        request = decode() if inline else await loop.run_in_executor(executor, decode)
        outputs = await served.predict(request, executor, small=inline)
        if inline:
            response = codec.encode(served.model, request, outputs)
        else:
            args = (served.model, request, outputs)
            response = await loop.run_in_executor(executor, codec.encode, *args)
        if request_id and self.answers is not None:
            model = served.model
            self.answers.add(request_id, model.name, model.version, shadow, outputs)
        return response
