"""An aiohttp test client on a real socket for a model-server app."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from model_servers.server import make_app


async def app_client(models: Any, **options: Any) -> TestClient:
    """Serve `make_app(models, **options)` on 127.0.0.1 and return a started client."""
    client = TestClient(TestServer(make_app(models, **options), host="127.0.0.1"))
    await client.start_server()
    return client
