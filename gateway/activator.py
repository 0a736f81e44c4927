"""Hold requests for a version that has no ready replica, and forward them once it has one.

As Knative's activator: while an autoscaled version (`min: 0`) has no ready replica, the
supervisor registers a gate of this activator as the version's only endpoint, so Envoy sends
the version's requests here. A gate answers Envoy's health check, holds each request (the
autoscaler counts held requests, so a replica starts), and forwards it to the first ready
replica; after `timeout` seconds without one it answers 503 `{"error": ...}`, and at once
when the version's replica exits before it is ready (`fail`). Once Envoy
routes to a ready replica itself, the supervisor deregisters the gate.

One listener per version (the request path does not always name the version: a weighted
route sends `/v2/models/m/infer` to any of them). The gates run on one asyncio loop in a
daemon thread; the supervisor's thread calls `open`, `forward_to`, `close` and `held`.
With `upstream_tls` the gates serve mutual TLS as the replicas do (Envoy's clusters speak
it to every endpoint) and forward over it with the mesh's client certificate.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from control_plane.upstream_tls import TlsFileError, UpstreamTls, read
from gateway.processes import free_port, host_port
from model_servers.admin import ServerTls

log = logging.getLogger("infergate.activator")

Key = tuple[str, str]
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}


@dataclass
class Gate:
    key: Key
    address: tuple[str, int]
    runner: web.AppRunner | None = None
    target: str | None = None  # ip:port of a ready replica
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    held: int = 0
    failure: str = ""  # why the last replica start failed (told to the requests it held)


class Activator:
    def __init__(self, timeout: float = 25.0, tls: UpstreamTls | None = None):
        self.timeout = timeout
        self.tls = tls
        self.gates: dict[Key, Gate] = {}
        self.loop = asyncio.new_event_loop()
        self._session: aiohttp.ClientSession | None = None
        threading.Thread(target=self.loop.run_forever, daemon=True, name="activator").start()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def open(self, key: Key) -> str:
        """Listen for `key` (if not yet) and return the gate's ip:port."""
        if key not in self.gates:
            self.gates[key] = self._call(self._open(key))
        return host_port(self.gates[key].address)

    def forward_to(self, key: Key, target: str | None) -> None:
        """Forward held and new requests of `key` to `target` (None: hold them)."""
        gate = self.gates.get(key)
        if gate is not None and gate.target != target:
            self.loop.call_soon_threadsafe(self._set_target, gate, target)

    def fail(self, key: Key, reason: str) -> None:
        """Answer the requests held for `key` now with 503 and `reason` (its replica exited
        before it was ready); later requests are held for the next start."""
        gate = self.gates.get(key)
        if gate is not None:
            self.loop.call_soon_threadsafe(self._fail, gate, reason)

    def close(self, key: Key) -> None:
        gate = self.gates.pop(key, None)
        if gate is not None and gate.runner is not None:
            self._call(gate.runner.cleanup())

    def held(self) -> dict[Key, int]:
        return {key: gate.held for key, gate in self.gates.items() if gate.held}

    def stop(self) -> None:
        for key in list(self.gates):
            self.close(key)
        if self._session is not None:
            self._call(self._session.close())
        self.loop.call_soon_threadsafe(self.loop.stop)

    # -- on the loop

    @staticmethod
    def _set_target(gate: Gate, target: str | None) -> None:
        gate.target = target
        if target:
            gate.ready.set()
        else:
            gate.ready.clear()

    @staticmethod
    def _fail(gate: Gate, reason: str) -> None:
        if gate.target is None:
            gate.failure = reason
            gate.ready.set()  # wakes the requests waiting on this event; new ones get a new one
            gate.ready = asyncio.Event()

    async def _open(self, key: Key) -> Gate:
        gate = Gate(key, ("127.0.0.1", free_port()), ready=asyncio.Event())
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/v2/health/ready", self._healthy)
        app.router.add_get("/v2/health/live", self._healthy)
        app.router.add_route("*", "/{tail:.*}", lambda request: self._hold(gate, request))
        gate.runner = web.AppRunner(app, access_log=None)
        await gate.runner.setup()
        server_tls = None
        if self.tls:
            server_tls = ServerTls(self.tls.server_cert, self.tls.server_key, self.tls.ca)
        ssl_context = server_tls.ssl_context() if server_tls else None
        await web.TCPSite(gate.runner, *gate.address, ssl_context=ssl_context).start()
        log.info("activator holds requests of %s/%s at %s", *key, host_port(gate.address))
        return gate

    @staticmethod
    def _unavailable(message: str) -> web.Response:
        see = " (see infergate status and the replica's log)"
        return web.json_response({"error": message + see}, status=503)

    @staticmethod
    async def _healthy(_: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    async def _hold(self, gate: Gate, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        gate.held += 1
        model, version = gate.key
        try:
            await asyncio.wait_for(gate.ready.wait(), self.timeout)
        except TimeoutError:
            why = f"became ready within {self.timeout:g}s"
            return self._unavailable(f"no replica of {model}/{version} {why}")
        finally:
            gate.held -= 1
        if gate.target is None:
            return self._unavailable(f"no replica of {model}/{version} could start: {gate.failure}")
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        scheme = "https" if self.tls else "http"
        url = f"{scheme}://{gate.target}{request.rel_url}"
        try:
            client: ssl.SSLContext | bool = read(self.tls).client_context() if self.tls else True
            async with self._session.request(
                request.method, url, headers=headers, data=body, ssl=client
            ) as resp:
                payload = await resp.read()
                out = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP}
                return web.Response(status=resp.status, body=payload, headers=out)
        except (aiohttp.ClientError, TlsFileError) as exc:
            return web.json_response({"error": f"forwarding to {gate.target}: {exc}"}, status=502)
