"""aiohttp server speaking the Open Inference Protocol (KServe V2) REST API for one model."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

from aiohttp import web

from model_servers.metrics import ModelMetrics
from model_servers.protocol import ProtocolError, decode_request, encode_response
from model_servers.repository import LoadedModel, load_model

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_SIZE = 16 * 1024 * 1024
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _server_version() -> str:
    try:
        return package_version("infergate")
    except PackageNotFoundError:
        return "0+unknown"


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(body).encode(), status=status, content_type="application/json"
    )


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


@web.middleware
async def _json_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Answer routing errors and unexpected exceptions with JSON `{"error": ...}`."""
    try:
        return await handler(request)
    except ProtocolError as exc:
        return _error(exc.status, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _error(exc.status, f"{request.method} {request.path}: {exc.reason}")
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _error(500, "internal server error")


class _ModelService:
    """Request handlers for one loaded model version."""

    def __init__(self, model: LoadedModel, max_body_size: int, workers: int) -> None:
        self.model = model
        self.max_body_size = max_body_size
        self.workers = workers
        self.metrics = ModelMetrics(model.name, model.version)
        self.draining = False
        self.executor: ThreadPoolExecutor | None = None
        self._model_metadata = json.dumps(
            {
                "name": model.name,
                "versions": [model.version],
                "platform": model.runtime.platform,
                **model.runtime.metadata(),
            }
        ).encode()
        self._server_metadata = json.dumps(
            {"name": "infergate", "version": _server_version(), "extensions": []}
        ).encode()

    async def executor_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context owning the prediction thread pool."""
        self.executor = ThreadPoolExecutor(self.workers, thread_name_prefix="predict")
        yield
        self.executor.shutdown(wait=True)

    def _check_model(self, request: web.Request) -> None:
        """Raise ProtocolError(404) if the path names another model or version."""
        name = request.match_info["model"]
        version = request.match_info.get("version")
        if name != self.model.name:
            raise ProtocolError(404, f"model '{name}' not found")
        if version is not None and version != self.model.version:
            raise ProtocolError(404, f"version '{version}' of model '{name}' not found")

    async def live(self, request: web.Request) -> web.Response:
        return _json({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        return _json({"ready": not self.draining}, 503 if self.draining else 200)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.Response(body=self._server_metadata, content_type="application/json")

    async def model_metadata(self, request: web.Request) -> web.Response:
        self._check_model(request)
        return web.Response(body=self._model_metadata, content_type="application/json")

    async def model_ready(self, request: web.Request) -> web.Response:
        self._check_model(request)
        ready = not self.draining
        return _json({"name": self.model.name, "ready": ready}, 200 if ready else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": self.metrics.content_type}
        )

    async def infer(self, request: web.Request) -> web.Response:
        start = time.perf_counter()
        self.metrics.inflight.inc()
        response: web.Response | None = None
        try:
            self._check_model(request)
            response = await self._infer(request)
        except ProtocolError as exc:
            response = _error(exc.status, exc.message)
        except Exception:
            log.exception("inference failed")
            response = _error(500, "internal server error")
        finally:
            self.metrics.inflight.dec()
            status = 500 if response is None else response.status
            self.metrics.observe(status, time.perf_counter() - start)
        return response

    async def _infer(self, request: web.Request) -> web.Response:
        too_large = ProtocolError(413, f"request body exceeds {self.max_body_size} bytes")
        if (request.content_length or 0) > self.max_body_size:
            raise too_large
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise too_large from None
        loop = asyncio.get_running_loop()
        payload = await loop.run_in_executor(self.executor, self._infer_sync, body)
        return web.Response(body=payload, content_type="application/json")

    def _infer_sync(self, body: bytes) -> bytes:
        """Parse, predict and serialise in a worker thread, off the event loop."""
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise ProtocolError(400, f"invalid JSON body: {exc}") from None
        request = decode_request(payload)
        try:
            outputs = self.model.runtime.predict(request.inputs, request.outputs)
        except (ValueError, TypeError) as exc:  # estimators reject bad input this way
            raise ProtocolError(400, f"prediction failed: {exc}") from None
        response = encode_response(self.model.name, self.model.version, outputs, request.id)
        return json.dumps(response).encode()


_SERVICE = web.AppKey("service", _ModelService)


def make_app(
    model: LoadedModel, *, max_body_size: int = DEFAULT_MAX_BODY_SIZE, workers: int = 4
) -> web.Application:
    """Build the OIP application serving `model`; predictions run on `workers` threads."""
    service = _ModelService(model, max_body_size, workers)
    app = web.Application(client_max_size=max_body_size, middlewares=[_json_errors])
    app[_SERVICE] = service
    app.cleanup_ctx.append(service.executor_ctx)
    models = "/v2/models/{model}"
    versions = models + "/versions/{version}"
    app.router.add_get("/v2/health/live", service.live)
    app.router.add_get("/v2/health/ready", service.ready)
    app.router.add_get("/v2", service.server_metadata)
    app.router.add_get("/metrics", service.prometheus)
    for prefix in (models, versions):
        app.router.add_get(prefix, service.model_metadata)
        app.router.add_get(prefix + "/ready", service.model_ready)
        app.router.add_post(prefix + "/infer", service.infer)
    return app


def serve(
    repository: Path,
    model: str,
    version: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    workers: int = 4,
    drain_grace: float = 0.0,
    shutdown_timeout: float = 30.0,
) -> None:
    """Serve one model version until SIGTERM/SIGINT, then drain and return.

    On a signal, readiness turns false; after `drain_grace` seconds the listener closes and
    in-flight requests get up to `shutdown_timeout` seconds to finish.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    loaded = load_model(Path(repository), model, version)
    app = make_app(loaded, max_body_size=max_body_size, workers=workers)
    asyncio.run(_run(app, host, port, drain_grace, shutdown_timeout))


async def _run(
    app: web.Application, host: str, port: int, drain_grace: float, shutdown_timeout: float
) -> None:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        service = app[_SERVICE]
        log.info(
            "serving %s version %s on http://%s:%d",
            service.model.name,
            service.model.version,
            host,
            port,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("signal received: draining")
        service.draining = True
        await asyncio.sleep(drain_grace)
    finally:
        await runner.cleanup()
    log.info("stopped")
