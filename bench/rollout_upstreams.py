"""Test upstreams for rollouts: one aiohttp server per version, in a thread of its own,
answering iris inference requests like a model server, with the failure rate and latency
that the caller sets (and may change while it runs). Used by tests/test_rollout_e2e.py
and bench/rollout_reaction.py."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from aiohttp import web


@dataclass
class Behaviour:
    """How one version answers: every `fail_every`-th request with a 500 (0: never), each
    after `delay` seconds."""

    fail_every: int = 0
    delay: float = 0.005
    served: int = 0


class Upstreams:
    """One aiohttp server per version on the given ports, in a thread of its own; each
    answers like a model server (`model_version` in the body) as its `Behaviour` says."""

    def __init__(self, ports: dict[str, int]):
        self.behaviour = {version: Behaviour() for version in ports}
        self.ports = ports
        self.loop = asyncio.new_event_loop()
        self.runners: list[web.AppRunner] = []
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def _app(self, version: str) -> web.Application:
        async def infer(_: web.Request) -> web.Response:
            b = self.behaviour[version]
            b.served += 1
            await asyncio.sleep(b.delay)
            if b.fail_every and b.served % b.fail_every == 0:
                return web.json_response({"error": "injected failure"}, status=500)
            return web.json_response({"model_name": "iris", "model_version": version})

        async def ready(_: web.Request) -> web.Response:
            return web.json_response({"ready": True})

        app = web.Application()
        app.router.add_post("/v2/models/iris/infer", infer)
        app.router.add_get("/v2/health/ready", ready)
        return app

    async def _start(self) -> None:
        for version, port in self.ports.items():
            runner = web.AppRunner(self._app(version), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            self.runners.append(runner)

    async def _stop(self) -> None:
        for runner in self.runners:
            await runner.cleanup()

    def __enter__(self) -> Upstreams:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
