"""The control plane's admin API (aiohttp): status of the config and of every node."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web


def make_admin_app(status: Callable[[], dict[str, Any]]) -> web.Application:
    async def get_status(_: web.Request) -> web.Response:
        return web.json_response(status())

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/status", get_status)
    app.router.add_get("/healthz", healthz)
    return app
