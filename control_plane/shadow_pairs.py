"""Pair a shadowing canary's answers with the primary's, from the model servers' records.

Model servers started with `--record-answers N` keep their newest answers with each
request's `x-request-id` (`GET /v2/answers?since=&limit=`, docs/model-server.md); Envoy
sends the same id to the primary and to its mirror. During a rollout's shadow phase the
control plane polls every endpoint of the baseline and of the canary over HTTP (so model
servers may run on other hosts), matches answers by request id, compares them tensor by
tensor (`analysis.compare_outputs`) and keeps the outcome with the time it was paired.
The controller reads `agreement()` over its window (the `ShadowComparisons` protocol).

Everything is bounded: unmatched answers (the baseline answers every request, the canary
only the mirrored ones) are kept per side up to `max_pending`, oldest dropped first; paired
outcomes up to `max_pairs`; disagreeing examples up to `max_examples` per model.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import aiohttp

from control_plane.analysis import compare_outputs
from control_plane.config import Endpoint, RolloutShadow
from control_plane.rollout import ShadowStats

log = logging.getLogger(__name__)


@dataclass
class _Model:
    pending: dict[str, OrderedDict[str, list[dict]]] = field(
        default_factory=lambda: {"primary": OrderedDict(), "shadow": OrderedDict()}
    )
    outcomes: deque[tuple[float, bool]] = field(default_factory=deque)
    examples: deque[tuple[float, dict[str, Any]]] = field(default_factory=deque)


@dataclass
class ShadowPairs:
    clock: Callable[[], float]
    token: str | None = None
    _: KW_ONLY
    max_pending: int = 20_000
    max_pairs: int = 100_000
    max_examples: int = 20
    limit: int = 1000
    _models: dict[str, _Model] = field(default_factory=dict, init=False)
    # endpoint -> (epoch, cursor)
    _cursors: dict[str, tuple[str, int]] = field(default_factory=dict, init=False)
    _session: aiohttp.ClientSession | None = field(default=None, init=False)
    tls: ssl.SSLContext | None = field(default=None, init=False)  # upstream_tls client side

    # -- reading answers ---------------------------------------------------------------

    async def _fetch(self, endpoint: str) -> list[dict]:
        """The answers an endpoint recorded since the last poll (all of them after a
        restart of that server, which changes its epoch)."""
        if self._session is None:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._session = aiohttp.ClientSession(
                headers=headers, timeout=aiohttp.ClientTimeout(total=5)
            )
        epoch, cursor = self._cursors.get(endpoint, ("", 0))
        answers: list[dict] = []
        while True:
            scheme, options = ("https", {"ssl": self.tls}) if self.tls else ("http", {})
            url = f"{scheme}://{endpoint}/v2/answers?since={cursor}&limit={self.limit}"
            async with self._session.get(url, **options) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"{url} answered {resp.status}: {await resp.text()}")
                page = await resp.json()
            if page["epoch"] != epoch:  # the first poll, or the server restarted
                restarted, epoch = bool(epoch), page["epoch"]
                if restarted:  # its cursors start again: read it from the start
                    cursor = 0
                    continue
            answers += page["answers"]
            cursor = page["next"]
            if len(page["answers"]) < self.limit:
                break
        self._cursors[endpoint] = (epoch, cursor)
        return answers

    async def poll(
        self,
        model: str,
        primary: tuple[str, Iterable[Endpoint]],
        shadow: tuple[str, Iterable[Endpoint]],
        tolerance: RolloutShadow,
    ) -> None:
        """Read every endpoint of both versions once and pair what matches."""
        sides = {"primary": primary, "shadow": shadow}
        jobs = [
            (side, version, str(ep))
            for side, (version, endpoints) in sides.items()
            for ep in endpoints
        ]
        results = await asyncio.gather(
            *(self._fetch(endpoint) for _, _, endpoint in jobs), return_exceptions=True
        )
        for (side, version, endpoint), answers in zip(jobs, results, strict=True):
            if isinstance(answers, BaseException):
                log.warning("shadow pairs: cannot read answers of %s: %s", endpoint, answers)
                continue
            for a in answers:
                if a["model"] == model and a["version"] == version:
                    self._add(model, side, a["request_id"], a["outputs"], tolerance)

    def _add(
        self, model: str, side: str, request_id: str, outputs: list[dict], tol: RolloutShadow
    ) -> None:
        m = self._models.setdefault(model, _Model())
        other = "shadow" if side == "primary" else "primary"
        match = m.pending[other].pop(request_id, None)
        if match is None:
            pending = m.pending[side]
            pending[request_id] = outputs
            while len(pending) > self.max_pending:
                pending.popitem(last=False)
            return
        primary, shadow = (outputs, match) if side == "primary" else (match, outputs)
        now = self.clock()
        difference = compare_outputs(primary, shadow, tol)
        m.outcomes.append((now, difference is None))
        while len(m.outcomes) > self.max_pairs:
            m.outcomes.popleft()
        if difference is not None:
            example = {
                "request_id": request_id,
                "difference": difference,
                "primary": primary,
                "shadow": shadow,
            }
            m.examples.append((now, example))
            while len(m.examples) > self.max_examples:
                m.examples.popleft()

    # -- the controller's view -----------------------------------------------------------

    def agreement(
        self, model: str, primary: str, shadow: str, since: float, until: float | None = None
    ) -> ShadowStats:
        m = self._models.get(model)
        if m is None:
            return ShadowStats(0, 0)
        end = self.clock() if until is None else until

        def inside(t: float) -> bool:
            return since <= t < end or (until is None and t == end)

        agreed = [ok for t, ok in m.outcomes if inside(t)]
        examples = tuple(e for t, e in m.examples if inside(t))
        return ShadowStats(len(agreed), sum(agreed), examples)

    def forget(self, model: str) -> None:
        """Drop a model's records (its shadow phase is over)."""
        self._models.pop(model, None)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
