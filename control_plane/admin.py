"""The control plane's admin API (aiohttp).

Reads are open (the API binds to 127.0.0.1 by default); writes need
`Authorization: Bearer <token>` and are refused when no token is configured.

- `GET /status`: config state, snapshot versions, per version its role and healthy/total
  endpoints (`versions`, from the control plane's probes), and per node what it was sent,
  ACKed and rejected.
- `GET /endpoints`, `POST /endpoints`, `DELETE /endpoints`: endpoints registered at run
  time; the body is `{"model": ..., "version": ..., "address": "ip:port"}`.
- `GET /traffic[?history=1]`: per model and version, the last 10 s and 60 s of traffic
  as Envoy reported it (see docs/telemetry.md).
- `GET /rollouts`: per model its rollout's phase, step, canary weight, reason and history
  of decisions (see docs/rollouts.md). `POST /rollouts/MODEL/pause|resume|promote|abort`
  acts on one (404: no rollout, 409: not in a phase where the action applies).
- `PUT /autoscaling`: the autoscaler's last decision per version, reported by the
  supervisor that acts on them (`{"model/version": {"desired": n, "ready": n, ...}}`);
  shown in `GET /status` (`autoscale`) and on `/metrics`.
- `GET /metrics`: Prometheus text. `GET /ui`: the live dashboard (one static page).
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry

from control_plane.config import Endpoint, parse_endpoint
from control_plane.endpoints import UnknownVersion
from control_plane.metrics import CONTENT_TYPE, exposition
from control_plane.rollout import NoRollout, RolloutController, RolloutError

DASHBOARD = Path(__file__).with_name("ui") / "index.html"


class Plane(Protocol):
    def status(self) -> dict[str, Any]: ...
    def registered(self) -> list[dict[str, str]]: ...
    def register(self, model: str, version: str, ep: Endpoint) -> bool: ...
    def deregister(self, model: str, version: str, ep: Endpoint) -> bool: ...
    def traffic(self, history: bool = False) -> dict[str, Any]: ...
    def rollout_status(self) -> dict[str, Any]: ...
    def rollout_action(self, model: str, action: str) -> dict[str, Any]: ...
    def report_autoscaling(self, decisions: dict[str, dict[str, Any]]) -> None: ...


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _parse_endpoint(body: Any) -> tuple[str, str, Endpoint]:
    if not isinstance(body, dict) or not all(
        isinstance(body.get(k), str) for k in ("model", "version", "address")
    ):
        raise ValueError('the body must be {"model": str, "version": str, "address": "ip:port"}')
    return body["model"], body["version"], parse_endpoint(body["address"])


DECISION_FIELDS = {
    "desired": int,
    "ready": int,
    "stable_concurrency": (int, float),
    "panic_concurrency": (int, float),
    "panic": bool,
    "reason": str,
}


def _parse_decisions(body: Any) -> dict[str, dict[str, Any]]:
    """`{"model/version": {desired, ready, stable_concurrency, panic_concurrency, panic,
    reason}}`, checked field by field (ValueError names the first problem)."""
    if not isinstance(body, dict):
        raise ValueError('the body must be {"model/version": {"desired": n, ...}}')
    decisions = {}
    for key, d in body.items():
        if key.count("/") != 1 or not isinstance(d, dict):
            raise ValueError(f"{key!r}: expected 'model/version' with an object")
        for name, kind in DECISION_FIELDS.items():
            value = d.get(name)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"{key}.{name}: missing or of the wrong type")
        decisions[key] = {name: d[name] for name in DECISION_FIELDS}
    return decisions


def make_admin_app(
    plane: Plane, token: str | None, metrics: CollectorRegistry | None = None
) -> web.Application:
    def authorized(request: web.Request) -> web.Response | None:
        if not token:
            return _error(
                403,
                "writes are disabled: start the control plane with an admin "
                "token (--admin-token-file or INFERGATE_ADMIN_TOKEN)",
            )
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return _error(401, "missing or wrong bearer token")
        return None

    async def get_status(_: web.Request) -> web.Response:
        return web.json_response(plane.status())

    async def rollouts(_: web.Request) -> web.Response:
        return web.json_response({"rollouts": plane.rollout_status()})

    async def rollout_action(request: web.Request) -> web.Response:
        if denied := authorized(request):
            return denied
        model = request.match_info["model"]
        try:
            status = plane.rollout_action(model, request.match_info["action"])
        except NoRollout as exc:
            return _error(404, str(exc))
        except RolloutError as exc:
            return _error(409, str(exc))
        return web.json_response({"model": model, "rollout": status})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def list_endpoints(_: web.Request) -> web.Response:
        return web.json_response({"endpoints": plane.registered()})

    async def change_endpoint(request: web.Request) -> web.Response:
        if denied := authorized(request):
            return denied
        try:
            model, version, ep = _parse_endpoint(await request.json())
        except ValueError as exc:
            return _error(400, str(exc))
        if request.method == "POST":
            try:
                changed = plane.register(model, version, ep)
            except UnknownVersion as exc:
                return _error(404, str(exc))
        else:
            changed = plane.deregister(model, version, ep)
        return web.json_response(
            {"model": model, "version": version, "address": str(ep), "changed": changed}
        )

    async def report_autoscaling(request: web.Request) -> web.Response:
        if denied := authorized(request):
            return denied
        try:
            decisions = _parse_decisions(await request.json())
        except ValueError as exc:
            return _error(400, str(exc))
        plane.report_autoscaling(decisions)
        return web.json_response({"versions": sorted(decisions)})

    async def traffic(request: web.Request) -> web.Response:
        return web.json_response(plane.traffic(request.query.get("history") == "1"))

    async def get_metrics(_: web.Request) -> web.Response:
        body = exposition(metrics) if metrics else b""
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def dashboard(_: web.Request) -> web.Response:
        return web.FileResponse(DASHBOARD, headers={"Cache-Control": "no-store"})

    app = web.Application()
    app.router.add_get("/status", get_status)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/endpoints", list_endpoints)
    app.router.add_post("/endpoints", change_endpoint)
    app.router.add_delete("/endpoints", change_endpoint)
    app.router.add_get("/traffic", traffic)
    app.router.add_get("/rollouts", rollouts)
    actions = "|".join(RolloutController.ACTIONS)
    app.router.add_post(f"/rollouts/{{model}}/{{action:{actions}}}", rollout_action)
    app.router.add_put("/autoscaling", report_autoscaling)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/ui", dashboard)
    return app
