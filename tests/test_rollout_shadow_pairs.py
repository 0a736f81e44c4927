"""Shadow pairing over real HTTP: model-server-like `/v2/answers` endpoints backed by the
model servers' own `AnswerLog`, read by `ShadowPairs` as the control plane does."""

from __future__ import annotations

import ssl

import numpy as np
from aiohttp import web

from control_plane.config import Endpoint, RolloutShadow
from control_plane.shadow_pairs import ShadowPairs
from gateway.processes import free_port
from model_servers.answers import AnswerLog

TOLERANCE = RolloutShadow(rtol=1e-5, atol=1e-6)


class AnswerServer:
    """`GET /v2/answers?since=&limit=` as the model server answers it, on a free port;
    remembers the Authorization headers it saw."""

    def __init__(self, version: str):
        self.version = version
        self.log = AnswerLog(10_000)
        self.port = free_port()
        self.auth: set[str] = set()
        self.runner: web.AppRunner | None = None

    def answer(self, request_id: str, label: int, score: float) -> None:
        outputs = {"label": np.array([label]), "score": np.array([score])}
        self.log.add(request_id, "iris", self.version, None, outputs)

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> AnswerServer:
        async def answers(request: web.Request) -> web.Response:
            self.auth.add(request.headers.get("Authorization", ""))
            q = request.query
            return web.json_response(self.log.since(int(q["since"]), int(q["limit"])))

        app = web.Application()
        app.router.add_get("/v2/answers", answers)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=ssl_context).start()
        return self

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.port)


async def test_pairs_by_request_id_across_servers_and_compares_tensors():
    clock = [100.0]
    primaries = [await AnswerServer("v1").start(), await AnswerServer("v1").start()]
    shadow = await AnswerServer("v2").start()
    pairs = ShadowPairs(lambda: clock[0], "tok", limit=7)  # several pages per poll
    try:
        for i in range(100):
            primaries[i % 2].answer(f"r{i}", 1, 0.5)
            if i % 10 < 8:  # 80 of the 100 were mirrored
                label = 2 if i % 10 < 3 else 1  # 30 of those 80 disagree on the label
                shadow.answer(f"r{i}", label, 0.5 + 1e-9)  # floats within the tolerance
        shadow.answer("lost", 1, 0.5)  # no primary answer: never paired
        eps = [p.endpoint for p in primaries]
        await pairs.poll("iris", ("v1", eps), ("v2", [shadow.endpoint]), TOLERANCE)
        stats = pairs.agreement("iris", "v1", "v2", 100.0, 101.0)
        assert (stats.pairs, stats.agreeing) == (80, 50)
        example = stats.examples[0]
        assert example["request_id"] == "r31" and "label" in example["difference"]  # newest 20
        assert example["primary"][0]["data"] == [1] and example["shadow"][0]["data"] == [2]
        assert len(stats.examples) == 20  # bounded
        assert pairs.agreement("iris", "v1", "v2", 101.0, 102.0).pairs == 0  # other window

        clock[0] = 105.0  # a late shadow answer pairs with a primary answer kept pending
        shadow.answer("r8", 1, 0.5)
        await pairs.poll("iris", ("v1", eps), ("v2", [shadow.endpoint]), TOLERANCE)
        assert pairs.agreement("iris", "v1", "v2", 105.0).pairs == 1
        assert pairs.agreement("iris", "v1", "v2", 100.0).pairs == 81  # nothing read twice
        assert shadow.auth == {"Bearer tok"}
    finally:
        await pairs.close()
        for server in (*primaries, shadow):
            assert server.runner is not None
            await server.runner.cleanup()


async def test_a_restarted_server_is_read_from_the_start_and_pending_answers_are_bounded():
    primary, shadow = await AnswerServer("v1").start(), await AnswerServer("v2").start()
    pairs = ShadowPairs(lambda: 0.0, max_pending=10)
    try:
        for i in range(50):
            primary.answer(f"r{i}", 1, 0.5)
        for i in range(5):
            shadow.answer(f"old{i}", 1, 0.5)
        await pairs.poll("iris", ("v1", [primary.endpoint]), ("v2", [shadow.endpoint]), TOLERANCE)
        shadow.log = AnswerLog(100)  # the shadow server restarted: a new epoch, cursors from 1
        for i in range(37, 50):
            shadow.answer(f"r{i}", 1, 0.5)
        await pairs.poll("iris", ("v1", [primary.endpoint]), ("v2", [shadow.endpoint]), TOLERANCE)
        stats = pairs.agreement("iris", "v1", "v2", 0.0)
        assert (stats.pairs, stats.agreeing) == (10, 10)  # only the newest 10 primaries kept
    finally:
        await pairs.close()
        for server in (primary, shadow):
            assert server.runner is not None
            await server.runner.cleanup()
