"""aiohttp server speaking the Open Inference Protocol (KServe V2) REST API.

Endpoints (every model path also under `/versions/<v>`): health, server and model metadata,
model readiness, `infer` (JSON or the binary tensor data extension), the repository
extension (`/v2/repository/index`, `/v2/repository/models/<m>[/versions/<v>]/load|unload`),
recorded answers (`/v2/answers`) and Prometheus `/metrics`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

from aiohttp import web

from model_servers.admin import OPEN_ON_LOOPBACK, AdminGuard, ServerTls
from model_servers.answers import DEFAULT_MAX_BYTES as DEFAULT_ANSWERS_MAX_BYTES
from model_servers.answers import AnswerLog, is_shadow
from model_servers.dataplane import DataPlane
from model_servers.load_report import HEADER as LOAD_REPORT_HEADER
from model_servers.processes import run_processes
from model_servers.protocol import InferenceRequest, ProtocolError, decode_request, render_response
from model_servers.repository import LoadedModel, list_models, list_versions, load_model
from model_servers.runtime_base import Tensors
from model_servers.settings import Batching

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_SIZE = 16 * 1024 * 1024
MAX_BODY_HEADER = "x-infergate-max-body"  # set by the gateway's oversize routes
DISCARD_LIMIT = 256 * 1024 * 1024  # bytes of a refused body read before closing anyway
BINARY_HEADER = "Inference-Header-Content-Length"
MAX_ANSWERS_LIMIT = 10_000
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(body).encode(), status=status, content_type="application/json"
    )


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


@web.middleware
async def _json_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Answer ProtocolErrors, routing errors and unexpected exceptions with `{"error": ...}`."""
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


async def _discard_body(request: web.Request) -> None:
    """Read and drop the rest of a body we refuse (up to DISCARD_LIMIT), so that a client
    that sends it all before reading, and Envoy in between, gets the 413 rather than a reset
    (closing a socket with unread data resets it)."""
    left = DISCARD_LIMIT
    while left > 0 and (chunk := await request.content.readany()):
        left -= len(chunk)


class _RestCodec:
    """An inference request as JSON, or JSON + binary tensor data; its response likewise."""

    def __init__(self, request: web.Request, max_body_size: int) -> None:
        self.request = request
        self.max_body_size = max_body_size
        self.body = b""
        self.header_length: int | None = None

    def _too_large(self) -> ProtocolError:
        return ProtocolError(413, f"request body exceeds {self.max_body_size} bytes")

    async def refuse_declared_oversize(self) -> None:
        """413 for a body whose content-length is over the limit, once it is read and dropped."""
        if (self.request.content_length or 0) > self.max_body_size:
            await _discard_body(self.request)
            raise self._too_large()

    async def read(self) -> int:
        await self.refuse_declared_oversize()
        try:
            self.body = await self.request.read()
        except web.HTTPRequestEntityTooLarge:
            await _discard_body(self.request)
            raise self._too_large() from None
        raw = self.request.headers.get(BINARY_HEADER)
        if raw is not None:
            if not raw.isdigit() or int(raw) > len(self.body):
                raise ProtocolError(400, f"{BINARY_HEADER} must be an int <= the body size")
            self.header_length = int(raw)
        return len(self.body)

    def decode(self) -> InferenceRequest:
        body, binary = self.body, b""
        if self.header_length is not None:
            body, binary = body[: self.header_length], body[self.header_length :]
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise ProtocolError(400, f"invalid JSON body: {exc}") from None
        return decode_request(payload, binary)

    def encode(
        self, model: LoadedModel, request: InferenceRequest, outputs: Tensors
    ) -> web.Response:
        payload, json_length = render_response(model.name, model.version, outputs, request)
        if json_length is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(
            body=payload,
            content_type="application/octet-stream",
            headers={BINARY_HEADER: str(json_length)},
        )


class _RestHandlers:
    """The OIP REST endpoints over a DataPlane: decode, call it, encode."""

    def __init__(self, core: DataPlane, max_body_size: int, admin: AdminGuard) -> None:
        self.core = core
        self.max_body_size = max_body_size
        self.admin = admin
        self.server_metadata_body = json.dumps(core.server_metadata).encode()

    @staticmethod
    def _model(request: web.Request) -> tuple[str, str | None]:
        return request.match_info["model"], request.match_info.get("version")

    async def live(self, request: web.Request) -> web.Response:
        return _json({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.core.ready
        return _json({"ready": ready}, 200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.Response(body=self.server_metadata_body, content_type="application/json")

    async def model_metadata(self, request: web.Request) -> web.Response:
        return _json(self.core.model_metadata(*self._model(request)))

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = self._model(request)
        ready = self.core.model_ready(name, version)
        return _json({"name": name, "ready": ready}, 200 if ready else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        metrics = self.core.metrics
        return web.Response(body=metrics.render(), headers={"Content-Type": metrics.content_type})

    async def infer(self, request: web.Request) -> web.Response:
        # The gateway's lower limit for this model (`max_body`) comes as a header, for any
        # version's path: refuse before resolving the model.
        limit = request.headers.get(MAX_BODY_HEADER, "")
        codec = _RestCodec(
            request, min(self.max_body_size, int(limit)) if limit.isdigit() else self.max_body_size
        )
        request_id, shadow = None, False
        if self.core.answers is not None:
            request_id = request.headers.get("x-request-id")
            shadow = is_shadow(request.headers.get("Host"))
        try:
            await codec.refuse_declared_oversize()
            served = self.core.resolve(*self._model(request))
            response = await self.core.infer(served, codec, request_id, shadow)
        except ProtocolError as exc:
            response = _error(exc.status, exc.message)
        response.headers[LOAD_REPORT_HEADER] = self.core.load_report.value()
        return response

    async def repository_index(self, request: web.Request) -> web.Response:
        only_ready = False
        if request.method == "POST" and request.can_read_body:
            body = await self._json_body(request)
            only_ready = body.get("ready", False) is True
        rows = await asyncio.to_thread(self.core.registry.index)
        return _json([r for r in rows if r["state"] == "READY" or not only_ready])

    async def repository_load(self, request: web.Request) -> web.Response:
        return await self._repository_change(request, self.core.registry.load, "READY")

    async def repository_unload(self, request: web.Request) -> web.Response:
        return await self._repository_change(request, self.core.registry.unload, "UNAVAILABLE")

    async def _repository_change(
        self,
        request: web.Request,
        change: Callable[[str, str | None], Awaitable[list[str]]],
        state: str,
    ) -> web.Response:
        self.admin.check(request.headers.get("Authorization"))
        await self._json_body(request)
        name, version = self._model(request)
        versions = await change(name, version)
        log.info("%s %s versions %s", change.__name__, name, versions)
        return _json({"name": name, "versions": versions, "state": state})

    async def answers(self, request: web.Request) -> web.Response:
        """Recorded answers: `?ids=a,b` by request id, else `?since=<cursor>&limit=<n>`."""
        self.admin.check(request.headers.get("Authorization"))
        log = self.core.answers
        if log is None:
            raise ProtocolError(404, "answers are not recorded: start with --record-answers N")
        query = request.query
        if "ids" in query:
            return _json(log.lookup({i for i in query["ids"].split(",") if i}))
        since, limit = query.get("since", "0"), query.get("limit", "1000")
        if not (since.isdigit() and limit.isdigit() and 1 <= int(limit) <= MAX_ANSWERS_LIMIT):
            raise ProtocolError(
                400, f"'since' must be a cursor >= 0 and 'limit' 1-{MAX_ANSWERS_LIMIT}"
            )
        return _json(log.since(int(since), int(limit)))

    @staticmethod
    async def _json_body(request: web.Request) -> dict[str, Any]:
        """An optional JSON object body (repository requests may carry `parameters`)."""
        raw = await request.read()
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise ProtocolError(400, f"invalid JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise ProtocolError(400, "request body must be a JSON object")
        return body


CORE = web.AppKey("core", DataPlane)


def make_app(
    models: LoadedModel | Iterable[LoadedModel] = (),
    *,
    repository: Path | None = None,
    max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    workers: int = 4,
    batching: Batching | None = None,
    answers: AnswerLog | None = None,
    admin: AdminGuard = OPEN_ON_LOOPBACK,
) -> web.Application:
    """Build the OIP application serving `models`; predictions run on `workers` threads.

    `repository` enables loading more versions at run time; `batching` overrides the
    batching settings of every model; `answers` records answers; `admin` guards the
    admin endpoints (default: open, as on loopback). `app[CORE]` is its DataPlane.
    """
    models = [models] if isinstance(models, LoadedModel) else models
    core = DataPlane.create(models, repository, workers, batching, answers)
    handlers = _RestHandlers(core, max_body_size, admin)
    app = web.Application(client_max_size=max_body_size, middlewares=[_json_errors])
    app[CORE] = core

    async def shutdown(app: web.Application) -> None:
        await core.close()

    app.on_cleanup.append(shutdown)
    model = "/v2/models/{model}"
    version = model + "/versions/{version}"
    repo = "/v2/repository/models/{model}"
    app.router.add_get("/v2/health/live", handlers.live)
    app.router.add_get("/v2/health/ready", handlers.ready)
    app.router.add_get("/v2", handlers.server_metadata)
    app.router.add_get("/metrics", handlers.prometheus)
    app.router.add_get("/v2/answers", handlers.answers)
    app.router.add_get("/v2/repository/index", handlers.repository_index)
    app.router.add_post("/v2/repository/index", handlers.repository_index)
    for prefix in (model, version):
        app.router.add_get(prefix, handlers.model_metadata)
        app.router.add_get(prefix + "/ready", handlers.model_ready)
        app.router.add_post(prefix + "/infer", handlers.infer)
    for prefix in (repo, repo + "/versions/{version}"):
        app.router.add_post(prefix + "/load", handlers.repository_load)
        app.router.add_post(prefix + "/unload", handlers.repository_unload)
    return app


def initial_models(repository: Path, model: str | None, version: str | None) -> list[LoadedModel]:
    """Load one version, every version of one model (version None), or everything (None)."""
    if model is None:
        pairs = [(m, v) for m in list_models(repository) for v in list_versions(repository, m)]
    elif version is None:
        pairs = [(model, v) for v in list_versions(repository, model)]
    else:
        pairs = [(model, version)]
    return [load_model(repository, m, v) for m, v in pairs]


def serve(
    repository: Path,
    model: str | None,
    version: str | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    workers: int = 4,
    max_batch_size: int | None = None,
    max_batch_delay_ms: float = 0.0,
    grpc_port: int | None = None,
    processes: int = 1,
    reuse_port: bool = False,
    drain_grace: float = 0.0,
    on_drain: Callable[[], None] | None = None,
    shutdown_timeout: float = 30.0,
    record_answers: int = 0,
    answers_max_bytes: int = DEFAULT_ANSWERS_MAX_BYTES,
    admin_token: str | None = None,
    tls: ServerTls | None = None,
) -> None:
    """Serve one model version (or, with None, every version / every model) until
    SIGTERM/SIGINT, then drain and return.

    `max_batch_size` (with `max_batch_delay_ms`) overrides the models' batching settings.
    `grpc_port` also serves the KServe V2 gRPC API there. `processes` > 1 runs that many
    server processes sharing the ports through SO_REUSEPORT (metrics are per process).
    On a signal, readiness turns false and `on_drain` runs (in a thread; one process only:
    e.g. deregistration, so the gateway stops routing here); after `drain_grace` seconds the
    listener closes and in-flight requests get up to `shutdown_timeout` seconds to finish.
    `record_answers` > 0 keeps that many of the newest answers (at most `answers_max_bytes`
    of outputs) for `/v2/answers`. `admin_token` guards the admin endpoints (see
    `AdminGuard`); `tls` serves both APIs over TLS.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if record_answers and processes > 1:
        raise ValueError("recording answers needs one process: each would keep its own log")
    if processes > 1:
        options = {
            "admin_token": admin_token,
            "tls": tls,
            "max_body_size": max_body_size,
            "workers": workers,
            "max_batch_size": max_batch_size,
            "max_batch_delay_ms": max_batch_delay_ms,
            "grpc_port": grpc_port,
            "reuse_port": True,
            "drain_grace": drain_grace,
            "shutdown_timeout": shutdown_timeout,
        }
        code = run_processes(processes, serve, repository, model, version, host, port, **options)
        if code:
            raise SystemExit(code)
        return
    repository = Path(repository)
    loaded = initial_models(repository, model, version)
    batching = None if max_batch_size is None else Batching(max_batch_size, max_batch_delay_ms)
    admin = AdminGuard(host, admin_token)
    app = make_app(
        loaded,
        repository=repository,
        max_body_size=max_body_size,
        workers=workers,
        batching=batching,
        answers=AnswerLog(record_answers, answers_max_bytes) if record_answers else None,
        admin=admin,
    )
    listen = _Listen(host, port, grpc_port, reuse_port, admin, tls)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_run(app, listen, drain_grace, shutdown_timeout, on_drain))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when installed (the optional `fast` extra), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


class _Listen(NamedTuple):
    host: str
    port: int
    grpc_port: int | None
    reuse_port: bool
    admin: AdminGuard
    tls: ServerTls | None


async def _run(
    app: web.Application,
    listen: _Listen,
    drain_grace: float,
    shutdown_timeout: float,
    on_drain: Callable[[], None] | None = None,
) -> None:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    core = app[CORE]
    grpc_server = None
    host, tls = listen.host, listen.tls
    try:
        ssl_context = tls.ssl_context() if tls else None
        reuse_port = listen.reuse_port or None
        site = web.TCPSite(
            runner, host, listen.port, ssl_context=ssl_context, reuse_port=reuse_port
        )
        await site.start()
        if listen.grpc_port is not None:
            from model_servers.grpc_server import make_grpc_server  # grpc only when asked for

            address = f"{host}:{listen.grpc_port}"
            grpc_server = make_grpc_server(core, address, listen.admin, tls)
            await grpc_server.start()
            log.info("gRPC on %s", address)
        names = [f"{s.model.name}/{s.model.version}" for s in core.registry.served]
        scheme = "https" if tls else "http"
        where = f"{scheme}://{host}:{listen.port}"
        log.info("serving %s on %s", ", ".join(names) or "nothing yet", where)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("signal received: draining")
        core.drain()
        if on_drain is not None:
            await asyncio.to_thread(on_drain)
        await asyncio.sleep(drain_grace)
    finally:
        if grpc_server is not None:
            await grpc_server.stop(shutdown_timeout)
        await runner.cleanup()
    log.info("stopped")
