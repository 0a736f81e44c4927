"""An aiohttp test client on a real socket for a model-server app."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from model_servers.server import make_app


async def app_client(models: Any, **options: Any) -> TestClient:
    """Serve `make_app(models, **options)` on 127.0.0.1 and return a started client."""
    client = TestClient(TestServer(make_app(models, **options), host="127.0.0.1"))
    await client.start_server()
    return client


async def poll(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 20) -> None:
    """Wait until `condition()` holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.01)
